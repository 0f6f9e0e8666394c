"""xmodal index / search / retrieve-corpus on a tiny trained run, incl. resume after SIGKILL."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from train_fixtures import write_synthetic_precomp, write_tiny_config
from xmodal.cli import main
from xmodal.index.build import parse_data_spec
from xmodal.search import progress_path

COLORS = ["red", "green", "blue", "yellow", "black", "white", "pink", "brown"]
SHAPES = ["circle", "square", "star", "heart", "cross", "ring", "arrow", "moon"]


def _cli(capsys, *args):
    capsys.readouterr()
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _user_error(capsys, *args, match: str) -> str:
    rc, _, err = _cli(capsys, *args)
    assert rc == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert match in err, err
    return err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_run")
    data = write_synthetic_precomp(root / "data")
    cfg = write_tiny_config(root / "tiny.yaml", data, steps=60)
    assert main(["train", str(cfg), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def image_index(run_dir):
    out = run_dir.parent / "test.idx"
    assert main(["index", str(run_dir), "--data", "split:test", "--out", str(out), "--no-progress"]) == 0
    return out


def _test_captions(run_dir):
    caps = (run_dir.parent / "data" / "test_caps.txt").read_text().splitlines()
    return caps  # caption c describes test image c // 2


def test_data_spec_forms(tmp_path):
    assert parse_data_spec("split:test").kind == "split"
    s = parse_data_spec("table:data.csv:val")
    assert (s.kind, s.format, s.path, s.split) == ("dataset", "table", "data.csv", "val")
    s = parse_data_spec("emoji:emoji")
    assert (s.format, s.path, s.split) == ("emoji", "emoji", "test")
    assert parse_data_spec(str(tmp_path)).kind == "folder"


def test_index_then_search_text(run_dir, image_index, capsys):
    m = json.loads((image_index / "manifest.json").read_text())
    assert m["count"] == 40 and m["modality"] == "image"
    ref = m["model_ref"]
    assert ref["run"] == str(run_dir.resolve()) and ref["checkpoint"] == "best"
    assert len(ref["config_hash"]) == 64 and len(ref["weights_sha256"]) == 64
    meta = (image_index / "metadata.jsonl").read_text().splitlines()
    caps = _test_captions(run_dir)
    # precomp: no path; the image's captions (its texts in the ground truth) name it
    assert json.loads(meta[0]) == {"dataset": "data", "split": "test", "image_id": "0", "captions": caps[0:2]}
    hits = 0
    queries = list(range(0, 80, 5))  # 16 captions
    for c in queries:
        rc, out, _ = _cli(capsys, "search", image_index, caps[c], "-k", 5, "--json")
        assert rc == 0
        res = json.loads(out)
        assert res["query"] == caps[c] and [r["rank"] for r in res["results"]] == [1, 2, 3, 4, 5]
        scores = [r["score"] for r in res["results"]]
        assert scores == sorted(scores, reverse=True)
        # the right image, or one with the same colour and shape (an equally correct answer)
        wanted = caps[c]
        good = {i for i in range(40) if wanted in (caps[2 * i], caps[2 * i + 1])}
        hits += any(int(r["image_id"]) in good for r in res["results"])
    # chance of a correct image in the top 5 of 40 is about 5/40 per query
    assert hits / len(queries) > 0.5, hits

    # results name their image for people: its first caption ("label"), and all of them
    rc, out, _ = _cli(capsys, "search", image_index, caps[0], "-k", 3, "--json")
    for r in json.loads(out)["results"]:
        i = int(r["image_id"])
        assert r["captions"] == caps[2 * i:2 * i + 2] and r["label"] == caps[2 * i]

    # the rich table: a caption / name column (no file column: feature rows have no files)
    rc, out, _ = _cli(capsys, "search", image_index, caps[0], "-k", 3)
    assert rc == 0 and "test/" in out and "rank" in out and "caption / name" in out and "file" not in out
    top = json.loads(_cli(capsys, "search", image_index, caps[0], "-k", 1, "--json")[1])["results"][0]
    assert top["label"][:20] in out

    # the Python API gives the same ranking
    import xmodal

    run = xmodal.load(run_dir)
    assert run.kind == "embedding" and run.step is not None and run.path == Path(run_dir)
    model = run.model
    index = xmodal.Index.open(image_index)
    scores, rows = index.search(model.encode_text([caps[0]]), k=5)
    rc, out, _ = _cli(capsys, "search", image_index, caps[0], "-k", 5, "--json")
    assert index.ids_of(rows[0]) == [r["id"] for r in json.loads(out)["results"]]
    np.testing.assert_allclose(scores[0], [r["score"] for r in json.loads(out)["results"]], atol=1e-5)


def test_add_appends_and_refuses_another_run(run_dir, image_index, tmp_path, capsys):
    idx = tmp_path / "both.idx"
    shutil.copytree(image_index, idx)
    rc, out, err = _cli(capsys, "index", run_dir, "--data", "split:dev", "--out", idx, "--add", "--json")
    assert rc == 0, err
    assert json.loads(out)["total"] == 80 and json.loads(out)["added"] == 40
    ids = (idx / "ids.jsonl").read_text().splitlines()
    assert json.loads(ids[0]) == "test/0" and json.loads(ids[40]) == "dev/0"
    # the same split again: duplicate ids are refused, nothing is written
    _user_error(capsys, "index", run_dir, "--data", "split:dev", "--out", idx, "--add", match="duplicate id")
    assert json.loads((idx / "manifest.json").read_text())["count"] == 80
    # without --add an existing index is not touched
    _user_error(capsys, "index", run_dir, "--data", "split:dev", "--out", idx, match="--add")
    # another run (a copy elsewhere is another model reference) is refused
    other = tmp_path / "other_run"
    shutil.copytree(run_dir, other)
    _user_error(capsys, "index", other, "--data", "split:dev", "--out", idx, "--add", match="another model")
    # --add of texts into an image index
    _user_error(capsys, "index", run_dir, "--data", "split:train", "--out", idx, "--add", "--modality", "text",
                match="image index")
    # a run whose weights changed since indexing: search refuses it
    moved = tmp_path / "moved.idx"
    assert main(["index", str(other), "--data", "split:test", "--out", str(moved), "--no-progress"]) == 0
    w = other / "best" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\0")
    err = _user_error(capsys, "search", moved, "a red circle", match="")
    assert "different weights" in err or "checksum mismatch" in err, err  # the latter: checkpoint manifests


def test_text_index_and_same_modality_search(run_dir, tmp_path, capsys):
    idx = tmp_path / "texts.idx"
    rc, _, err = _cli(capsys, "index", run_dir, "--data", "split:test", "--out", idx, "--modality", "text",
                      "--backend", "flat")
    assert rc == 0, err
    m = json.loads((idx / "manifest.json").read_text())
    assert m["count"] == 80 and m["modality"] == "text" and m["backend"] == "flat"
    caps = _test_captions(run_dir)
    # text -> text is allowed, with a note: a caption finds itself (score ~1) first
    rc, out, err = _cli(capsys, "search", idx, caps[7], "-k", 3, "--json")
    assert rc == 0 and "note: text query against a text index" in err
    res = json.loads(out)
    assert res["index_modality"] == "text" and res["results"][0]["caption"] == caps[7]
    assert res["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert res["results"][0]["image_ids"] == [str(7 // 2)]
    # an image query needs a pixel model; this run reads feature rows
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "q.png")
    _user_error(capsys, "search", idx, "--image", tmp_path / "q.png", match="feature rows")
    # and so does indexing a folder of images
    _user_error(capsys, "index", run_dir, "--data", tmp_path, "--out", tmp_path / "f.idx", match="feature rows")


def _write_corpus(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            if i % 13 == 5:
                fh.write("   \n")  # blank: skipped, but counted in line numbers
            else:
                c, s, s2 = rng.integers(0, 8, 3)
                fh.write(f"a {COLORS[c]} {SHAPES[s]} beside a {SHAPES[s2]} ({i})\n")
    return path


def test_retrieve_corpus_end_to_end(run_dir, image_index, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red circle\n\nun cœur\u2028rouge ✓\n   \nstar that is blue\n", encoding="utf-8")
    out = tmp_path / "vokens.jsonl"
    rc, stdout, err = _cli(capsys, "retrieve-corpus", image_index, corpus, "--out", out, "-k", 4,
                           "--batch-size", 2, "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["sentences"] == 3 and summary["lines"] == 5
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in rows] == [1, 3, 5]
    assert rows[1]["text"] == "un cœur\u2028rouge ✓"  # escaped in the file: still one line a record
    assert len(out.read_text(encoding="utf-8").splitlines()) == 3
    index_ids = {json.loads(line) for line in (image_index / "ids.jsonl").read_text().splitlines()}
    for r in rows:
        assert len(r["ids"]) == 4 and set(r["ids"]) <= index_ids
        assert r["scores"] == sorted(r["scores"], reverse=True)
    # the same as searching each sentence on its own
    rc, one, _ = _cli(capsys, "search", image_index, "star that is blue", "-k", 4, "--json")
    assert [x["id"] for x in json.loads(one)["results"]] == rows[2]["ids"]
    assert not progress_path(out).exists()
    # a finished output is not overwritten by accident
    _user_error(capsys, "retrieve-corpus", image_index, corpus, "--out", out, match="--overwrite")
    before = out.read_bytes()
    assert main(["retrieve-corpus", str(image_index), str(corpus), "--out", str(out), "-k", "4",
                 "--batch-size", "2", "--overwrite"]) == 0
    assert out.read_bytes() == before


def test_retrieve_corpus_resumes_after_sigkill(run_dir, image_index, tmp_path, capsys):
    corpus = _write_corpus(tmp_path / "corpus.txt", 20_000)
    args = ["-k", "3", "--batch-size", "128"]
    ref = tmp_path / "ref.jsonl"
    assert main(["retrieve-corpus", str(image_index), str(corpus), "--out", str(ref), *args, "--no-progress"]) == 0

    out = tmp_path / "vokens.jsonl"
    side = progress_path(out)
    cmd = [sys.executable, "-m", "xmodal", "retrieve-corpus", str(image_index), str(corpus), "--out", str(out), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = json.loads(side.read_text())["lines_consumed"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 1000:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    state = json.loads(side.read_text())
    assert 0 < state["lines_consumed"] < 20_000  # it really was interrupted midway
    assert out.stat().st_size >= state["output_bytes"]
    # a batch half-written when the process died: cut off on resume
    with open(out, "ab") as fh:
        fh.write(b'{"line": 99999, "text": "half a li')

    # a corpus that changed since (same bytes, other mtime) is detected
    st = corpus.stat()
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _user_error(capsys, "retrieve-corpus", image_index, corpus, "--out", out, *args, match="corpus changed")
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))
    # so is a different k
    _user_error(capsys, "retrieve-corpus", image_index, corpus, "--out", out, "-k", "4", "--batch-size", "128",
                match="k differs")

    rc, stdout, err = _cli(capsys, "retrieve-corpus", image_index, corpus, "--out", out, *args, "--json")
    assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["resumed_from_line"] == state["lines_consumed"] + 1
    assert summary["new_sentences"] < summary["sentences"]
    assert not side.exists()
    assert out.read_bytes() == ref.read_bytes()
    assert summary["sentences"] == len(ref.read_bytes().splitlines()) == 20_000 - len(range(5, 20_000, 13))


def test_malformed_inputs(run_dir, image_index, tmp_path, capsys):
    idx = str(image_index)
    _user_error(capsys, "search", tmp_path / "nope.idx", "a red circle", match="no such index folder")
    _user_error(capsys, "search", idx, "   ", match="empty query")
    _user_error(capsys, "search", idx, match="empty query")
    _user_error(capsys, "search", idx, "a red circle", "-k", 0, match="-k 0")
    _user_error(capsys, "search", idx, "a red circle", "-k", 10**6, match="between 1 and")
    _user_error(capsys, "search", idx, "--image", tmp_path / "missing.png", match="missing.png")
    _user_error(capsys, "search", idx, "a query", "--image", tmp_path / "x.png", match="not both")
    _user_error(capsys, "retrieve-corpus", idx, tmp_path / "none.txt", "--out", tmp_path / "v.jsonl",
                match="no such corpus file")
    _user_error(capsys, "retrieve-corpus", idx, __file__, "--out", tmp_path / "v.jsonl", "-k", 0, match="-k 0")
    _user_error(capsys, "index", run_dir, "--data", "bogus:thing", "--out", tmp_path / "i", match="bogus:thing")
    _user_error(capsys, "index", run_dir, "--data", "split:test", "--out", tmp_path / "i", "--backend", "annoy",
                match="annoy")
    _user_error(capsys, "index", run_dir, "--data", "split:nosuch", "--out", tmp_path / "i", match="nosuch")
    _user_error(capsys, "index", tmp_path, "--data", "split:test", "--out", tmp_path / "i", match="run folder")
    assert not (tmp_path / "i").exists()
    # the real command line: one line on stderr, status 2
    proc = subprocess.run([sys.executable, "-m", "xmodal", "search", idx, "x", "-k", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_folder_index_with_pixel_model(tmp_path, capsys):
    """A frozen EfficientNet-lite0 (64 px) + BiGRU run, 3 steps; index a folder, search it."""
    from image_fixtures import train_pixel_run

    imgs, run = train_pixel_run(tmp_path)
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (imgs / "notes.txt").write_text("not an image")
    idx = tmp_path / "folder.idx"
    rc, out, err = _cli(capsys, "index", run, "--data", imgs, "--out", idx, "--json")
    assert rc == 0, err
    assert json.loads(out)["added"] == 8 and json.loads(out)["skipped"] == 1
    assert "broken.jpg" in err
    ids = [json.loads(x) for x in (idx / "ids.jsonl").read_text().splitlines()]
    assert ids == sorted(ids) and "sub/red1.png" in ids and len(ids) == 8
    rc, out, err = _cli(capsys, "search", idx, "a red picture", "-k", 8, "--json")
    assert rc == 0, err
    res = json.loads(out)["results"]
    assert len(res) == 8 and all(Path(r["path"]).is_file() for r in res)
    assert all(r["label"] == Path(r["path"]).name and "captions" not in r for r in res)  # a folder: file names
    rc, out, err = _cli(capsys, "search", idx, "a red picture", "-k", 2)
    assert rc == 0 and "caption / name" in out and "file" in out  # real files get a column
    # an image query against an image index (allowed, noted): the image finds itself first
    rc, out, err = _cli(capsys, "search", idx, "--image", imgs / "sub" / "blue1.png", "-k", 2, "--json")
    assert rc == 0 and "note: image query" in err
    top = json.loads(out)["results"][0]
    assert top["id"] == "sub/blue1.png" and top["score"] == pytest.approx(1.0, abs=1e-4)
    # a text index of the captions, searched with an image (the cross-modal direction)
    tidx = tmp_path / "caps.idx"
    assert main(["index", str(run), "--data", f"table:{tmp_path / 'data.csv'}:all", "--out", str(tidx),
                 "--modality", "text", "--no-progress"]) == 0
    rc, out, err = _cli(capsys, "search", tidx, "--image", imgs / "red0.png", "-k", 3, "--json")
    assert rc == 0 and "note" not in err
    assert all("caption" in r for r in json.loads(out)["results"])


def test_image_captions_at_index_time(run_dir, image_index, tmp_path):
    """Each indexed image stores up to 5 of its captions (most specific first, each cut to 200
    characters); the sharded build stores the same; an index without them still searches."""
    from xmodal.data import emoji
    from xmodal.data.base import CrossModalDataset, GroundTruth
    from xmodal.distributed import DistEnv
    from xmodal.index import Index
    from xmodal.index.build import MAX_CAPTION_CHARS, ImageCaptions, item_records, load_index_run
    from xmodal.index.sharded import build_index_sharded
    from xmodal.search import search_text

    # the emoji dataset: an image's caption is its name (the label), not its code
    ds = emoji.read("emoji", "test")
    ids, meta = item_records(ds, np.arange(4), "image", {"dataset": "emoji", "split": "test"}, "test/")
    assert ids[0] == f"test/{ds.image_ids[0]}"
    labels = emoji.open_pack("emoji").meta["text"]["en"]["label"]
    unified = emoji.open_pack("emoji").unified
    for m in meta:
        assert m["captions"] == [labels[unified.index(m["image_id"].split("/")[1])]], m
    # with tags as captions too, the name still comes first
    ds_all = emoji.read("emoji", "test", captions="all")
    first = ImageCaptions(ds_all)
    assert all(first(i)[0] == meta[i]["captions"][0] for i in range(4))

    # bounded: at most 5 captions, each at most 200 characters, the most specific first
    texts = [f"caption {t} " + "x" * 300 for t in range(7)] + ["shared by both images"]
    gt = GroundTruth.from_map([[0]] * 7 + [[0, 1]], 2)
    toy = CrossModalDataset(name="toy", split="test", image_ids=["a", "b"], text_ids=[str(t) for t in range(8)],
                            captions=texts, gt=gt)
    _, meta = item_records(toy, np.arange(2), "image", {}, "")
    assert len(meta[0]["captions"]) == 5 and all(len(c) == MAX_CAPTION_CHARS for c in meta[0]["captions"])
    assert meta[0]["captions"][0].startswith("caption 0 ") and meta[0]["captions"][0].endswith("…")
    assert meta[1]["captions"] == ["shared by both images"]

    # the sharded build (1 process here) writes the same metadata as build_index
    out = build_index_sharded(run_dir, "split:test", tmp_path / "sharded.idx", env=DistEnv())
    with Index.open(out.path) as a, Index.open(image_index) as b:
        assert a.metadata(np.arange(len(b))) == b.metadata(np.arange(len(b)))

    # an index written before captions were stored: results still come, named by their dataset id
    old = tmp_path / "old.idx"
    shutil.copytree(image_index, old)
    lines = [json.loads(x) for x in (old / "metadata.jsonl").read_text().splitlines()]
    (old / "metadata.jsonl").write_text("".join(json.dumps({k: v for k, v in m.items() if k != "captions"}) + "\n"
                                                for m in lines))
    index = Index.open(old, verify=False)
    res = search_text(index, load_index_run(index), "a red circle", 3)
    assert len(res) == 3 and all("captions" not in r and r["label"] == r["image_id"] for r in res)
