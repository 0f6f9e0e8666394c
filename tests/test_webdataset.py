"""WebDataset shards: shards written here (images + captions) read back as the dataset they came
from, img2dataset-style shards written with the ``webdataset`` library, unsafe members refused,
resumable export, extraction from shards equal to extraction from the same images as a table,
and a 2-process gloo run whose ranks read disjoint shards."""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from image_fixtures import PoolPixelTower, write_corrupt_png, write_ok
from xmodal.cli import main
from xmodal.data import load_dataset
from xmodal.data.base import CrossModalDataset, GroundTruth
from xmodal.data.features import FeatureSet, extract_features, extract_features_sharded
from xmodal.data.webdataset import (expand_shards, extraction_bounds, iter_samples, rank_shards, shard_index,
                                    split_key, splits, write_shards)
from xmodal.distributed import DistEnv, session
from xmodal.errors import ConfigError, DataError
from xmodal.models.base import TowerOutput

WORLD = 2


# fixtures ---------------------------------------------------------------------------------
def _write_images(folder: Path, n: int, corrupt: tuple[int, ...] = ()) -> list[str]:
    """``n`` images: JPEG, PNG and a transparent PNG in turn (``corrupt``: scrambled PNGs)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        if i in corrupt:
            names.append(write_corrupt_png(folder / f"im{i}.png").name)
        elif i % 3 == 0:
            names.append(write_ok(folder / f"im{i}.jpg", seed=i, fmt="JPEG").name)
        elif i % 3 == 1:
            names.append(write_ok(folder / f"im{i}.png", seed=i).name)
        else:  # transparency: composited onto white by open_image, from a file or from a shard alike
            rgba = np.random.default_rng(i).integers(0, 256, (20, 24, 4), dtype=np.uint8)
            Image.fromarray(rgba, "RGBA").save(folder / f"im{i}.png")
            names.append(f"im{i}.png")
    return names


def _write_table(root: Path, n: int = 7, corrupt: tuple[int, ...] = ()) -> Path:
    names = _write_images(root / "img", n, corrupt)
    rows = [{"image": f"img/{name}", "caption": f"picture {i} caption {j}", "lang": "en" if j % 2 else "es"}
            for i, name in enumerate(names) for j in range(1 + i % 3)]
    with open(root / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "pairs.csv"


def _pairs(ds: CrossModalDataset) -> set[tuple[str, str]]:
    t, i = ds.gt.pairs()
    return {(ds.text_ids[a], ds.image_ids[b]) for a, b in zip(t.tolist(), i.tolist())}


def _tar(path: Path, members: list[tuple[str, bytes]], **info) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            for k, v in info.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data))
    return path


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


class PoolTower(PoolPixelTower):
    """The shared deterministic pixel tower (tests/image_fixtures.py), 5-d, cos weights."""

    def __init__(self) -> None:
        super().__init__(dim=5, weights="cos")


# reading back what was written ------------------------------------------------------------
def test_table_round_trip_through_shards(tmp_path, monkeypatch):
    table = load_dataset("table", _write_table(tmp_path), "test")
    manifest = write_shards(table, tmp_path / "wds" / "test", shard_size=3, progress=False)
    assert manifest["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert (manifest["images"], manifest["texts"]) == (7, 13)

    ds = load_dataset("webdataset", tmp_path / "wds", "test")
    assert ds.image_ids == table.image_ids and sorted(ds.text_ids) == sorted(table.text_ids)
    order = [table.text_ids.index(t) for t in ds.text_ids]
    assert ds.captions == [table.captions[k] for k in order] and ds.langs == [table.langs[k] for k in order]
    assert _pairs(ds) == _pairs(table)
    assert ds.image_paths[0] == "wds://shard-000000.tar::000000000.jpg"
    assert splits(tmp_path / "wds") == ["test"]
    # the same images, decoded from the shard or from the file (transparent PNG included)
    for i in range(ds.num_images):
        a, b = ds.meta["pixels"][i], Image.open(table.image_path(i))
        assert ds.meta["pixels"].read_bytes(i) == table.image_path(i).read_bytes()
        assert a.mode == "RGB" and a.size == b.size

    # brace pattern, and a second read that uses the .idx sidecars without scanning any tar
    assert all((tmp_path / "wds" / "test" / f"shard-00000{k}.tar.idx").is_file() for k in range(3))
    monkeypatch.setattr("xmodal.data.webdataset.scan_shard", lambda *a, **k: pytest.fail("index rebuilt"))
    again = load_dataset("webdataset", str(tmp_path / "wds" / "{split}" / "shard-{000000..000002}.tar"), "test")
    assert again.image_ids == ds.image_ids and _pairs(again) == _pairs(ds)
    sub = again.select_images([5, 1])  # the pixel accessor follows the selection
    assert sub.meta["pixels"].read_bytes(0) == table.image_path(5).read_bytes()


def test_several_images_per_text_fields_and_images_without_text(tmp_path):
    names = _write_images(tmp_path / "img", 5)
    # recipe-like: text 0 matches images 0 and 3, text 1 images 1, 2 and 3, texts 2 and 3 image 4
    gt = GroundTruth.from_pairs(np.array([0, 0, 1, 1, 1, 2, 3]), np.array([0, 3, 1, 2, 3, 4, 4]), 4, 5)
    ds = CrossModalDataset(name="recipes", split="val", image_ids=[f"img{i}" for i in range(5)],
                           text_ids=["r0", "r1", "r2", "r3"], captions=["soup", "cake", "tea", "tea\nwith\nlines"],
                           gt=gt, image_paths=[f"img/{n}" for n in names], root=tmp_path,
                           fields={"title": ["soup", "cake", "tea", "tea"], "steps": ["boil", "bake", "", "x\ny"]})
    write_shards(ds, tmp_path / "out", shard_size=2, progress=False)
    back = load_dataset("webdataset", tmp_path / "out", "anything")
    assert _pairs(back) == _pairs(ds)
    assert back.fields == {k: [v[ds.text_ids.index(t)] for t in back.text_ids] for k, v in ds.fields.items()}
    assert back.captions[back.text_ids.index("r3")] == "tea\nwith\nlines"


def test_packaged_pixels_export_as_lossless_png(tmp_path):
    emoji = load_dataset("emoji", "emoji", "val").select_images(np.arange(12))
    write_shards(emoji, tmp_path / "e", shard_size=5, progress=False)
    back = load_dataset("webdataset", tmp_path / "e", "val")
    assert back.image_ids == emoji.image_ids and _pairs(back) == _pairs(emoji)
    for i in (0, 7, 11):
        assert back.meta["pixels"].ext(i) == "png"
        np.testing.assert_array_equal(np.asarray(back.meta["pixels"][i]), np.asarray(emoji.meta["pixels"][i]))


def test_img2dataset_shards_written_with_the_webdataset_library(tmp_path):
    from webdataset import TarWriter

    for s in range(2):
        with TarWriter(str(tmp_path / f"part-{s:05d}.tar")) as sink:
            for k in range(3):
                key = f"{s:05d}{k:04d}"
                sink.write({"__key__": key, "jpg": _jpeg(10 * s + k), "txt": f"photo {s}-{k}",
                            "json": {"url": f"http://x/{key}.jpg", "key": key, "status": "success"},
                            "pyd": {"never": "decoded"}})
    ds = load_dataset("webdataset", str(tmp_path / "part-{00000..00001}.tar"), "train")
    assert ds.image_ids == [f"{s:05d}{k:04d}" for s in range(2) for k in range(3)]
    assert ds.text_ids == ds.image_ids and ds.captions[4] == "photo 1-1"
    assert ds.gt.dense().tolist() == np.eye(6, dtype=bool).tolist()
    assert np.asarray(ds.meta["pixels"][4]).shape == (12, 10, 3)
    assert ds.name == "part"
    streamed = list(iter_samples(ds.meta["shards"]))  # the webdataset library's own streaming, raw bytes
    assert [x["__key__"] for x in streamed] == ds.image_ids and streamed[0]["pyd"][:1] == b"\x80"

    # and xmodal's shards stream through webdataset.WebDataset, keys and bytes intact
    out = tmp_path / "again"
    write_shards(ds, out, shard_size=4, progress=False)
    import webdataset as wds

    samples = list(wds.WebDataset([str(p) for p in expand_shards(out)], shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(6)]
    assert samples[4]["jpg"] == ds.meta["pixels"].read_bytes(4) and samples[4]["txt"] == b"photo 1-1"
    assert json.loads(samples[4]["json"])["image_id"] == "000010001"


def test_caption_lines_and_missing_captions(tmp_path):
    shard = _tar(tmp_path / "a.tar", [("k1.jpg", _jpeg(1)), ("k1.txt", b"one\ntwo\n\n"), ("k2.jpg", _jpeg(2)),
                                      ("k3.jpg", _jpeg(3)), ("k3.json", b'{"caption": "from json"}')])
    ds = load_dataset("webdataset", shard, "x", text="lines")
    assert ds.text_ids == ["k1#0", "k1#1", "k3"] and ds.captions == ["one", "two", "from json"]
    assert ds.gt.counts().tolist() == [1, 1, 1] and np.bincount(ds.gt.indices, minlength=3).tolist() == [2, 0, 1]
    with pytest.raises(ConfigError, match="option text must be one or lines"):
        load_dataset("webdataset", shard, "x", text="all")
    with pytest.raises(ConfigError, match="unknown option"):
        load_dataset("webdataset", shard, "x", image_root="/")


def test_duplicate_ids_and_unknown_images_are_errors(tmp_path):
    _tar(tmp_path / "a.tar", [("k1.jpg", _jpeg(0)), ("k1.json", b'{"image_id": "X", "texts": [{"id": "t", '
                                                                 b'"caption": "c", "also": ["nope"]}]}')])
    _tar(tmp_path / "b.tar", [("k9.jpg", _jpeg(1)), ("k9.json", b'{"image_id": "X"}')])
    with pytest.raises(DataError, match=r"a.tar::k1: text 't' also matches image 'nope', which is in none"):
        load_dataset("webdataset", tmp_path / "a.tar", "x")
    with pytest.raises(DataError, match=r"b.tar::k9: duplicate image id 'X' \(first at .*a.tar::k1\)"):
        load_dataset("webdataset", str(tmp_path / "{a,b}.tar"), "x")
    _tar(tmp_path / "c.tar", [("k1.jpg", _jpeg(0)), ("k1.json", b'{"texts": [{"id": "t", "caption": ""}]}')])
    with pytest.raises(DataError, match=r"c.tar::k1.json: texts\[0\]: field 'caption': expected non-empty text"):
        load_dataset("webdataset", tmp_path / "c.tar", "x")


# safety -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../evil.jpg", "/etc/evil.jpg", "a/../../b.jpg"])
def test_path_traversal_members_are_refused(tmp_path, name):
    shard = _tar(tmp_path / "bad.tar", [("k.txt", b"x"), (name, _jpeg(0))])
    with pytest.raises(DataError, match=r"bad\.tar: member .*unsafe name"):
        load_dataset("webdataset", shard, "x")


def test_links_huge_members_compressed_shards_and_samples_without_image(tmp_path):
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tf:
        ti = tarfile.TarInfo("k.jpg")
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(ti)
    with pytest.raises(DataError, match="link.tar: member 'k.jpg' is a link"):
        load_dataset("webdataset", link, "x")

    big = _tar(tmp_path / "big.tar", [("k.jpg", _jpeg(0)), ("k.txt", b"x" * 5000)])
    with pytest.raises(DataError, match=r"big.tar: member 'k.txt' is 5,000 bytes, above max_member_bytes=4,096"):
        load_dataset("webdataset", big, "x", max_member_bytes=4096)
    assert load_dataset("webdataset", big, "x").num_texts == 1  # builds the sidecar
    with pytest.raises(DataError, match="above max_member_bytes"):  # the limit applies to a cached index too
        load_dataset("webdataset", big, "x", max_member_bytes=4096)

    zst = tmp_path / "c.tar"
    zst.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 64)  # zstd magic: no decompressor in the standard library
    with pytest.raises(DataError, match="c.tar: zstd-compressed shard; xmodal decompresses gzip, bzip2 and xz"):
        load_dataset("webdataset", zst, "x")

    noimg = _tar(tmp_path / "noimg.tar", [("k.txt", b"caption"), ("k.npy", b"\x93NUMPY")])
    with pytest.raises(DataError, match=r"noimg.tar: sample 'k' has no image member .*members: npy, txt"):
        load_dataset("webdataset", noimg, "x")
    badtxt = _tar(tmp_path / "badtxt.tar", [("k.jpg", _jpeg(0)), ("k.txt", b"\xff\xfe\xfa")])
    with pytest.raises(DataError, match=r"badtxt.tar::k.txt: not UTF-8"):
        load_dataset("webdataset", badtxt, "x")
    with pytest.raises(DataError, match="no such shard"):
        load_dataset("webdataset", str(tmp_path / "shard-{0..3}.tar"), "x")


def test_pickle_members_are_never_decoded_and_bad_images_fail_cleanly(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    shard = _tar(tmp_path / "p.tar", [("k.jpg", b"not an image at all"), ("k.txt", b"hello"),
                                      ("k.pyd", pickle.dumps(Boom())), ("k.pickle", pickle.dumps(Boom()))])
    ds = load_dataset("webdataset", shard, "x")
    with pytest.raises(DataError, match=r"p.tar::k.jpg: not a recognised image file"):
        ds.meta["pixels"][0]
    assert ds.captions == ["hello"] and not (tmp_path / "pwned").exists()


def test_stale_index_is_rebuilt_and_readonly_folders_index_into_the_cache(tmp_path, monkeypatch):
    shard = _tar(tmp_path / "s.tar", [("a.jpg", _jpeg(0)), ("a.txt", b"first")])
    assert load_dataset("webdataset", shard, "x").captions == ["first"]
    _tar(shard, [("a.jpg", _jpeg(0)), ("a.txt", b"second, longer caption"), ("b.jpg", _jpeg(1))])
    os.utime(shard, ns=(1, 1))  # a new mtime even on coarse clocks
    assert load_dataset("webdataset", shard, "x").captions == ["second, longer caption"]

    from xmodal.data import webdataset as wmod

    real = wmod.atomic_write_text
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))

    def refuse_beside(path, text):
        if Path(path).parent == tmp_path:
            raise PermissionError("read-only")
        real(path, text)

    monkeypatch.setattr(wmod, "atomic_write_text", refuse_beside)
    other = _tar(tmp_path / "o.tar", [("a.jpg", _jpeg(0))])
    shard_index(other)
    assert not (tmp_path / "o.tar.idx").exists() and len(list((tmp_path / "cache" / "webdataset").glob("*.idx"))) == 1


# export -----------------------------------------------------------------------------------
def test_export_is_resumable_and_refuses_other_inputs(tmp_path):
    table = load_dataset("table", _write_table(tmp_path), "test")
    out = tmp_path / "out"
    write_shards(table, out, shard_size=2, progress=False)
    shards = sorted(out.glob("*.tar"))
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in shards}
    shards[1].unlink()
    (out / "manifest.json").unlink()  # as if interrupted while writing shard 1
    m = write_shards(table, out, shard_size=2, progress=False)
    assert m["shards_written_this_run"] == 1
    for p in shards:
        assert p.read_bytes() == before[p.name][0]  # deterministic bytes
        if p != shards[1]:
            assert p.stat().st_mtime_ns == before[p.name][1]  # finished shards were kept
    assert not list(out.glob(".*.tmp"))
    assert write_shards(table, out, shard_size=2, progress=False)["shards_written_this_run"] == 0

    with pytest.raises(DataError, match="holds shards of another export"):
        write_shards(table, out, shard_size=3, progress=False)
    assert len(write_shards(table, out, shard_size=3, overwrite=True, progress=False)["shards"]) == 3
    assert len(list(out.glob("*.tar"))) == 3


def test_export_missing_images(tmp_path):
    table = load_dataset("table", _write_table(tmp_path), "test")
    table.image_path(1).unlink()
    with pytest.raises(DataError, match=r"im1.png: no such image file .*skip_missing"):
        write_shards(table, tmp_path / "out", progress=False)
    m = write_shards(table, tmp_path / "out", skip_missing=True, progress=False)
    assert m["skipped_images"] == ["img/im1.png"] and m["dropped_texts"] == [table.text_ids[1], table.text_ids[2]]
    back = load_dataset("webdataset", tmp_path / "out", "test")
    assert back.num_images == 6 and back.num_texts == 11


def test_cli_export_and_inspect(tmp_path, capsys):
    csv_path = _write_table(tmp_path, n=4)
    out = tmp_path / "wds"
    assert main(["export", "--from-format", "table", "--from-path", str(csv_path), "--out", str(out),
                 "--shard-size", "3", "--no-progress"]) == 0
    assert "all: 4 images, 7 texts in 2 shard(s)" in capsys.readouterr().out
    assert main(["inspect", "--format", "webdataset", "--path", str(out), "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["splits"]["all"]["images"] == 4 and report["splits"]["all"]["languages"] == {"es": 5, "en": 2}
    assert main(["inspect", "--format", "webdataset", "--path", str(out / "all" / "shard-{000000..000009}.tar")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xmodal inspect: error: ") and "no such shard" in err and "\n" not in err


# extraction and ranks ---------------------------------------------------------------------
def test_extraction_from_shards_equals_extraction_from_the_table(tmp_path):
    table = load_dataset("table", _write_table(tmp_path, n=8, corrupt=(5,)), "test")
    write_shards(table, tmp_path / "wds" / "test", shard_size=3, progress=False)
    shards = load_dataset("webdataset", tmp_path / "wds", "test")
    a = extract_features(table, PoolTower(), tmp_path / "fa", batch_size=3, dtype="float32", progress=False)
    b = extract_features(shards, PoolTower(), tmp_path / "fb", batch_size=3, dtype="float32", progress=False)
    assert a.ids == b.ids and a.valid.tolist() == b.valid.tolist() == [i != 5 for i in range(8)]
    assert [s["index"] for s in b.skipped] == [5] and "shard-000001.tar::000000005.png" in b.skipped[0]["path"]
    np.testing.assert_array_equal(a.pooled, b.pooled)
    np.testing.assert_array_equal(a.grid, b.grid)
    # decoding worker processes read the shards too (the accessor pickles without open files)
    c = extract_features(shards, PoolTower(), tmp_path / "fc", batch_size=2, num_workers=2, dtype="float32",
                         progress=False)
    assert c.valid.tolist() == a.valid.tolist()
    np.testing.assert_array_equal(a.pooled, c.pooled)


class _Stop(Exception):
    pass


class StoppingTower(PoolTower):
    """Raises on its ``stop_at``-th batch: an interrupted extraction."""

    def __init__(self, stop_at: int) -> None:
        super().__init__()
        self.calls, self.stop_at = 0, stop_at

    def forward(self, x: torch.Tensor) -> TowerOutput:
        self.calls += 1
        if self.calls == self.stop_at:
            raise _Stop
        return super().forward(x)


def test_interrupted_extraction_from_shards_resumes(tmp_path):
    table = load_dataset("table", _write_table(tmp_path, n=9), "test")
    write_shards(table, tmp_path / "wds" / "test", shard_size=4, progress=False)
    shards = load_dataset("webdataset", tmp_path / "wds", "test")
    whole = extract_features(shards, PoolTower(), tmp_path / "whole", batch_size=2, dtype="float32", progress=False)
    with pytest.raises(_Stop):
        extract_features(shards, StoppingTower(3), tmp_path / "out", batch_size=2, dtype="float32", progress=False)
    again = load_dataset("webdataset", tmp_path / "wds", "test")  # a new process would read the shards again
    tower = StoppingTower(0)
    resumed = extract_features(again, tower, tmp_path / "out", batch_size=2, dtype="float32", progress=False)
    assert tower.calls == 3  # batches 3..5 of 5 (9 images by 2): the first two were kept
    np.testing.assert_array_equal(resumed.pooled, whole.pooled)
    np.testing.assert_array_equal(resumed.grid, whole.grid)


def test_rank_shards_are_contiguous_and_disjoint():
    shards = [f"s{k}" for k in range(5)]
    parts = [rank_shards(shards, DistEnv(rank=r, world_size=3)) for r in range(3)]
    assert parts == [["s0", "s1"], ["s2", "s3"], ["s4"]]
    with pytest.raises(DataError, match="2 shard\\(s\\) for 3 processes"):
        rank_shards(shards[:2], DistEnv(rank=0, world_size=3))
    assert split_key("dir/000001.seg.png") == ("dir/000001", "seg.png")


def _rank_worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    root = Path(tmp)
    with session("cpu") as (env, _):
        mine = load_dataset("webdataset", root / "wds", "test", shard_split="rank")
        part = extract_features(mine, PoolTower(), root / f"rank{env.rank}", batch_size=3, dtype="float32",
                                progress=False)
        full = load_dataset("webdataset", root / "wds", "test")
        extract_features_sharded(full, PoolTower(), root / "sharded", env=env, batch_size=2, dtype="float32",
                                 progress=False)
        (root / f"rank{env.rank}.json").write_text(json.dumps(
            {"shards": mine.meta["shards"], "opened": mine.meta["pixels"].shards_read(),
             "opened_sharded": full.meta["pixels"].shards_read(), "ids": part.ids,
             "bounds": extraction_bounds(full, env.rank, env.world_size, 2)}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_read_disjoint_shards(tmp_path):
    table = load_dataset("table", _write_table(tmp_path, n=12), "test")
    write_shards(table, tmp_path / "wds" / "test", shard_size=4, progress=False)  # 3 shards of 4 images
    mp.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    names = [[Path(s).name for s in r["shards"]] for r in ranks]
    assert names == [["shard-000000.tar", "shard-000001.tar"], ["shard-000002.tar"]]
    for r in ranks:
        assert r["opened"] == r["shards"]
    # sharded extraction in batches of 2: the batch cut (6) would split shard 1 between the ranks;
    # the ranks are cut at the shard (and batch) start 4 instead, so each opened whole shards only
    assert [r["bounds"] for r in ranks] == [[0, 4], [4, 12]]
    assert [[Path(s).name for s in r["opened_sharded"]] for r in ranks] == [
        ["shard-000000.tar"], ["shard-000001.tar", "shard-000002.tar"]]
    assert ranks[0]["ids"] + ranks[1]["ids"] == table.image_ids

    single = extract_features(table, PoolTower(), tmp_path / "single", batch_size=3, dtype="float32",
                              progress=False)
    parts = [FeatureSet.open(tmp_path / f"rank{r}") for r in range(WORLD)]
    np.testing.assert_array_equal(np.concatenate([p.pooled for p in parts]), single.pooled)
    merged = FeatureSet.open(tmp_path / "sharded", verify=True)
    assert merged.ids == single.ids
    np.testing.assert_array_equal(merged.pooled, single.pooled)
    np.testing.assert_array_equal(merged.grid, single.grid)


def test_training_reads_shards(tmp_path):
    """A frozen pixel tower + BiGRU run trains on shards named by a brace pattern with {split}."""
    from xmodal.config import load_config
    from xmodal.train.loop import train

    table = load_dataset("table", _write_table(tmp_path, n=8), "all")
    write_shards(table, tmp_path / "wds" / "all", shard_size=3, progress=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
name: wds
data:
  format: webdataset
  path: "{tmp_path}/wds/{{split}}/shard-{{000000..000002}}.tar"
  train_split: all
  val_split: all
  test_split: all
  eval_lang: any
model:
  type: dual_encoder
  embed_dim: 16
  image: {{name: efficientnet_lite0, args: {{image_size: 64}}, frozen: true}}
  text: {{name: bigru, args: {{word_dim: 8, out_dim: 16}}, frozen: false}}
loss: {{name: infonce}}
optim: {{name: adam, lr: 0.01}}
train: {{steps: 2, batch_size: 4, eval_every: 2, log_every: 2, tensorboard: false}}
""")
    summary = train(load_config(cfg), tmp_path / "run", progress=False)
    assert summary["steps"] == 2
    val = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in val if r["kind"] == "val" and 0 <= r["rsum"] <= 600]
