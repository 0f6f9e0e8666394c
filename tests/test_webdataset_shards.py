"""WebDataset loose ends: ``inspect`` streams shards (the same JSON as the reader-based report,
the reader's errors, bounded memory), sharded extraction cuts ranks on shard boundaries when
that keeps them balanced, and gzip/bzip2/xz shards are decompressed once into the cache."""
from __future__ import annotations

import bz2
import errno
import gzip
import importlib.util
import io
import json
import lzma
import os
import tarfile
import tracemalloc
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from image_fixtures import PoolPixelTower, write_ok
from xmodal.cli import main
from xmodal.data import load_dataset
from xmodal.data import webdataset as wmod
from xmodal.data.base import CrossModalDataset, GroundTruth
from xmodal.data.features import extract_features
from xmodal.data.inspect import dataset_stats, inspect_dataset
from xmodal.data.webdataset import extraction_bounds, rank_cuts, write_shards
from xmodal.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


# fixtures ---------------------------------------------------------------------------------
def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def _recipes(root: Path, split: str, n: int, seed: int) -> CrossModalDataset:
    """``n`` image files; texts matching one to three images, some images without text,
    languages and fields, repeated captions: every measure of the report is exercised."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    paths = [write_ok(root / "img" / f"{split}{i}.png", seed=seed + i).name for i in range(n)]
    rng = np.random.default_rng(seed)
    t, i = [], []
    for text in range(n - 2):
        for image in rng.choice(n - 1, size=1 + text % 3, replace=False):  # image n-1 gets no text
            t.append(text)
            i.append(int(image))
    texts = n - 2
    return CrossModalDataset(
        name="recipes", split=split, image_ids=[f"{split}-im{k}" for k in range(n)],
        text_ids=[f"{split}-t{k}" for k in range(texts)], captions=[f"dish {k % 4}" for k in range(texts)],
        gt=GroundTruth.from_pairs(np.asarray(t), np.asarray(i), texts, n), image_paths=[f"img/{p}" for p in paths],
        root=root, langs=["en" if k % 3 else "es" for k in range(texts)],
        fields={"title": [f"title {k}" for k in range(texts)]})


@pytest.fixture(scope="module")
def wds_root(tmp_path_factory) -> Path:
    """Two splits of shards written by xmodal export (3 and 2 shards)."""
    root = tmp_path_factory.mktemp("wds")
    for split, n, shard_size in (("test", 9, 3), ("train", 6, 4)):
        source = _recipes(root / "src", split, n, 100 * n)
        write_shards(source, root / "wds" / split, shard_size=shard_size, progress=False)
        (root / f"{split}.json").write_text(json.dumps(dataset_stats(source)))
    return root / "wds"


def _reader_report(path, splits: list[str], **options) -> dict:
    return {s: dataset_stats(load_dataset("webdataset", path, s, **options)) for s in splits}


# inspect streams the shards ---------------------------------------------------------------
def test_streamed_inspect_is_the_reader_report(wds_root, monkeypatch):
    monkeypatch.setattr("xmodal.data.inspect.BLOCK_ROWS", 2)  # keys packed over many blocks
    report = inspect_dataset("webdataset", wds_root, progress=False)
    assert report["streamed"] is True and report["shards"] == {"test": 3, "train": 2}
    reader = _reader_report(wds_root, ["test", "train"])
    assert json.dumps(report["splits"], sort_keys=False) == json.dumps(reader, sort_keys=False)
    for split in ("test", "train"):  # the counts of the dataset the shards were written from
        source = json.loads((wds_root.parent / f"{split}.json").read_text())
        got = report["splits"][split]
        assert {k: got[k] for k in source if k not in ("languages", "duplicates", "missing_files")} == \
               {k: source[k] for k in source if k not in ("languages", "duplicates", "missing_files")}
        assert sorted(got["languages"].items()) == sorted(source["languages"].items())
        assert got["duplicates"]["captions"] == source["duplicates"]["captions"]
    test = report["splits"]["test"]
    assert test["positives_per_text"]["max"] == 3 and test["images_without_text"] >= 1
    assert test["languages"] == {"en": 4, "es": 3} and test["duplicates"]["captions"] == 3

    pattern = str(wds_root / "{split}" / "shard-{000000..000002}.tar")
    only = inspect_dataset("webdataset", pattern, splits=["test"], progress=False)
    assert list(only["splits"]) == ["test"] and only["splits"]["test"] == test and only["shards"] == {"test": 3}


def test_streamed_inspect_of_img2dataset_shards_with_caption_lines(tmp_path):
    for s in range(2):
        members = []
        for k in range(4):
            key = f"{s}{k:04d}"
            members += [(f"{key}.jpg", _jpeg(k)), (f"{key}.txt", f"a photo {k}\nanother {s}\n".encode())]
        members.append((f"{s}9999.jpg", _jpeg(9)))  # a sample without caption
        members.append((f"{s}9999.pyd", b"\x80never read"))
        _tar(tmp_path / f"part-{s}.tar", members)
    pattern = str(tmp_path / "part-{0..1}.tar")
    for text in ("one", "lines"):
        report = inspect_dataset("webdataset", pattern, options={"text": text}, progress=False)
        assert report["splits"] == _reader_report(pattern, ["all"], text=text)
    assert report["splits"]["all"]["texts"] == 16 and report["splits"]["all"]["images_without_text"] == 2
    assert report["splits"]["all"]["languages"] is None


def test_streamed_inspect_raises_the_readers_errors(tmp_path):
    def both(path, match):
        with pytest.raises(DataError, match=match) as reader:
            load_dataset("webdataset", path, "x")
        with pytest.raises(DataError) as streamed:
            inspect_dataset("webdataset", path, progress=False)
        assert str(streamed.value) == str(reader.value)

    def sample(key, obj):
        return [(f"{key}.jpg", _jpeg(0)), (f"{key}.json", json.dumps(obj).encode())]

    _tar(tmp_path / "a.tar", sample("k1", {"image_id": "X", "texts": [{"id": "t1", "caption": "c"}]})
         + sample("k2", {"image_id": "Y", "texts": [{"id": "t2", "caption": "c", "also": ["X", "nope"]}]}))
    both(tmp_path / "a.tar", r"a.tar::k2: text 't2' also matches image 'nope', which is in none")
    _tar(tmp_path / "b.tar", sample("k3", {"image_id": "Z", "texts": [{"id": "t3", "caption": "c"}]})
         + sample("k4", {"image_id": "X", "texts": [{"id": "t1", "caption": "c"}]}))
    both(str(tmp_path / "{a,b}.tar"), r"b.tar::k4: duplicate image id 'X' \(first at .*a.tar::k1\)")
    _tar(tmp_path / "c.tar", sample("k5", {"image_id": "W", "texts": [{"id": "t9", "caption": "c"}]})
         + sample("k6", {"image_id": "V", "texts": [{"id": "t8", "caption": "c"}, {"id": "t9", "caption": "d"}]}))
    both(tmp_path / "c.tar", r"c.tar::k6: duplicate text id 't9' \(first at .*c.tar::k5\)")
    _tar(tmp_path / "d.tar", [("k7.jpg", _jpeg(0)), ("k8.txt", b"no image")])
    both(tmp_path / "d.tar", r"d.tar: sample 'k8' has no image member")
    with pytest.raises(Exception, match="unknown option"):
        inspect_dataset("webdataset", tmp_path / "d.tar", options={"image_root": "/"}, progress=False)


def _big_shards(folder: Path, shards: int, per_shard: int, caption_bytes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img = _jpeg(0)
    for s in range(shards):
        members = []
        for k in range(per_shard):
            key = f"{s:03d}{k:05d}"
            members += [(f"{key}.jpg", img), (f"{key}.txt", (f"{key} " * (caption_bytes // 9)).encode())]
        _tar(folder / f"s-{s:03d}.tar", members)


def test_streamed_inspect_memory_stays_bounded(tmp_path):
    """Peak Python memory of the streamed report grows with one shard, not with the captions of
    all: 6 shards of 250 samples with 2 KB captions (3 MB of text)."""
    _big_shards(tmp_path / "big", 6, 250, 2048)
    inspect_dataset("webdataset", tmp_path / "big", progress=False)  # .idx sidecars, as any first read
    tracemalloc.start()
    try:
        streamed = inspect_dataset("webdataset", tmp_path / "big", progress=False)
        stream_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        reader = _reader_report(tmp_path / "big", ["all"])
        reader_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert streamed["splits"] == reader
    assert reader_peak > 3_000_000  # the reader holds every caption
    assert stream_peak < 1_000_000 and stream_peak * 4 < reader_peak, (stream_peak, reader_peak)


def test_inspect_webdataset_benchmark_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("inspect_wds_bench", ROOT / "benchmarks" / "inspect_webdataset.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--dry-run", "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["images"] == 600 and res["shards"] == 6 and res["same_report"] is True
    assert res["ratio_reader_over_stream"]["peak_rss_mb"] > 0


def test_cli_inspect_streams_shards(wds_root, capsys):
    assert main(["inspect", "--format", "webdataset", "--path", str(wds_root), "--json", "--no-progress",
                 "--split", "train"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["streamed"] is True and report["splits"] == _reader_report(wds_root, ["train"])
    assert main(["inspect", "--format", "webdataset", "--path", str(wds_root), "--no-progress"]) == 0
    assert "streamed" in capsys.readouterr().out


# ranks cut on shard boundaries ------------------------------------------------------------
def test_rank_cuts_snap_to_shards_when_balanced():
    starts = np.arange(0, 12, 4)  # 3 shards of 4 images
    assert rank_cuts(12, 2, 2, None) == [0, 6, 12]  # whole batches of 2
    assert rank_cuts(12, 2, 2, starts) == [0, 4, 12]  # whole shards: 4 vs 8, one batch above 6
    assert rank_cuts(12, 3, 2, starts) == [0, 4, 8, 12]
    assert rank_cuts(12, 2, 3, starts) == [0, 6, 12]  # only shard starts 0 and 12 begin a batch of 3
    # 4 shards of 5, batches of 2, 4 ranks: the batch-aligned shard starts 0, 10, 20 cannot be balanced
    assert rank_cuts(20, 4, 2, np.arange(0, 20, 5)) == rank_cuts(20, 4, 2, None) == [0, 6, 12, 16, 20]
    assert rank_cuts(7, 1, 3, np.array([0, 3])) == [0, 7]

    # 100 shards of 1024 images, batches of 64, 8 ranks: 12.5 shards a rank -> 12 or 13 whole shards
    cuts = rank_cuts(102_400, 8, 64, np.arange(0, 102_400, 1024))
    assert all(c % 1024 == 0 for c in cuts) and cuts[0] == 0 and cuts[-1] == 102_400
    assert sorted(set(np.diff(cuts).tolist())) == [12 * 1024, 13 * 1024]
    # shards of 1000: only every 8th shard start begins a batch of 64, too few to balance 8 ranks
    assert rank_cuts(100_000, 8, 64, np.arange(0, 100_000, 1000)) == rank_cuts(100_000, 8, 64, None)
    # 10 shards of 1024 on 3 ranks: 4/3/3 shards is 18% above the batch cuts' 3456 images
    assert rank_cuts(10_240, 3, 64, np.arange(0, 10_240, 1024)) == [0, 3456, 6848, 10_240]


def test_extraction_bounds_follow_the_datasets_shards(wds_root, tmp_path):
    test = load_dataset("webdataset", wds_root, "test")  # 9 images in shards of 3
    assert [extraction_bounds(test, r, 2, 1) for r in range(2)] == [(0, 6), (6, 9)]  # batch cut: 5
    # a selection that interleaves shards is cut on batches; a table on batches
    mixed = test.select_images([0, 4, 1, 5, 2, 6, 3, 7, 8])
    assert [extraction_bounds(mixed, r, 2, 1) for r in range(2)] == [(0, 5), (5, 9)]
    table = CrossModalDataset(name="t", split="x", image_ids=list("abcdefghi"), text_ids=["t"], captions=["c"],
                              gt=GroundTruth.from_pairs(np.array([0]), np.array([0]), 1, 9),
                              image_paths=[f"{k}.png" for k in "abcdefghi"], root=tmp_path)
    assert [extraction_bounds(table, r, 2, 2) for r in range(2)] == [(0, 6), (6, 9)]


# compressed shards ------------------------------------------------------------------------
_Codec = namedtuple("_Codec", "suffix compress")
CODECS = {"gzip": _Codec(".tar.gz", gzip.compress), "bzip2": _Codec(".tar.bz2", bz2.compress),
          "xz": _Codec(".tar.xz", lzma.compress)}


def _compress_folder(src: Path, dst: Path, codec: _Codec) -> list[Path]:
    dst.mkdir(parents=True)
    out = []
    for tar in sorted(src.glob("*.tar")):
        out.append(dst / (tar.stem + codec.suffix))
        out[-1].write_bytes(codec.compress(tar.read_bytes()))
    return out


@pytest.mark.parametrize("kind", ["gzip", "bzip2", "xz"])
def test_compressed_shards_read_as_the_plain_ones(wds_root, tmp_path, kind, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
    plain = load_dataset("webdataset", wds_root, "test")
    _compress_folder(wds_root / "test", tmp_path / "z" / "test", CODECS[kind])
    ds = load_dataset("webdataset", tmp_path / "z", "test")
    assert ds.image_ids == plain.image_ids and ds.text_ids == plain.text_ids and ds.captions == plain.captions
    assert ds.gt.dense().tolist() == plain.gt.dense().tolist()
    suffix = CODECS[kind].suffix
    assert ds.image_paths[0] == f"wds://shard-000000{suffix}::000000000.png"
    assert all(ds.meta["pixels"].read_bytes(i) == plain.meta["pixels"].read_bytes(i) for i in range(ds.num_images))
    assert ds.meta["pixels"].label(4) == f"{tmp_path / 'z' / 'test' / ('shard-000001' + suffix)}::000000004.png"
    named = [str(tmp_path / "z" / "test" / f"shard-00000{k}{suffix}") for k in range(3)]
    assert ds.meta["pixels"].shards_read() == named and ds.meta["shards"] == named
    assert len(list((tmp_path / "cache" / "webdataset" / "plain").glob("*.tar"))) == 3
    report = inspect_dataset("webdataset", tmp_path / "z", progress=False)
    assert report["splits"]["test"] == dataset_stats(plain)


def test_decompressed_copy_is_reused_and_remade_when_the_shard_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "plain").mkdir()
    for s in range(3):
        _tar(tmp_path / "plain" / f"shard-00000{s}.tar",
             [m for k in range(3) for m in ((f"{s}{k}.jpg", _jpeg(k)), (f"{s}{k}.txt", b"a caption"))])
    shards = _compress_folder(tmp_path / "plain", tmp_path / "z", CODECS["gzip"])
    first = load_dataset("webdataset", tmp_path / "z", "x")
    real = wmod._decompress
    calls = []
    monkeypatch.setattr(wmod, "_decompress", lambda *a: (calls.append(a[0].name), real(*a)))
    assert load_dataset("webdataset", tmp_path / "z", "x").image_ids == first.image_ids and calls == []

    # shard 1 now holds other samples: a new size and mtime, so its copy (and index) is remade
    _tar(tmp_path / "other.tar", [("zz.jpg", _jpeg(5)), ("zz.txt", b"a new caption")])
    shards[1].write_bytes(gzip.compress((tmp_path / "other.tar").read_bytes()))
    os.utime(shards[1], ns=(10**9, 10**9))
    again = load_dataset("webdataset", tmp_path / "z", "x")
    assert calls == ["shard-000001.tar.gz"] and "a new caption" in again.captions and again.num_images == 7

    shards[2].write_bytes(shards[2].read_bytes()[:-30])  # truncated
    with pytest.raises(DataError, match=r"shard-000002.tar.gz: corrupt or truncated gzip data"):
        load_dataset("webdataset", tmp_path / "z", "x")


def test_decompression_checks_free_space(wds_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
    _compress_folder(wds_root / "train", tmp_path / "z", CODECS["gzip"])
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(wmod.shutil, "disk_usage", lambda p: Usage(10**6, 10**6 - 100, 100))
    with pytest.raises(DataError, match=r"shard-000000.tar.gz: decompressing this gzip shard needs about "
                                        r"[\d,]+ bytes in .*plain, which has 100 free; point XMODAL_CACHE"):
        load_dataset("webdataset", tmp_path / "z", "x")
    assert main(["inspect", "--format", "webdataset", "--path", str(tmp_path / "z"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xmodal inspect: error: ") and "which has 100 free" in err and "\n" not in err
    assert not list((tmp_path / "cache").rglob("*.tar"))  # nothing half-written left behind
    monkeypatch.undo()

    def full_disk(shard, kind, tmp, compressed):
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(wmod, "_copy_decompressed", full_disk)
    with pytest.raises(DataError, match=r"shard-000000.tar.gz: no space left in .*plain while decompressing"):
        load_dataset("webdataset", tmp_path / "z", "x")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "afile" / "cache"))  # not a folder
    with pytest.raises(DataError, match=r"shard-000000.tar.gz: cannot write its decompressed copy in .*afile"):
        load_dataset("webdataset", tmp_path / "z", "x")


def test_extraction_from_gzip_shards_equals_the_plain_shards(wds_root, tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
    _compress_folder(wds_root / "train", tmp_path / "z", CODECS["gzip"])
    tower = PoolPixelTower(dim=4)
    a = extract_features(load_dataset("webdataset", wds_root, "train"), tower, tmp_path / "fa", batch_size=4,
                         dtype="float32", progress=False)
    b = extract_features(load_dataset("webdataset", tmp_path / "z", "x"), tower, tmp_path / "fb", batch_size=4,
                         dtype="float32", progress=False)
    assert a.ids == b.ids and a.valid.all() and b.valid.all()
    np.testing.assert_array_equal(a.pooled, b.pooled)


def test_compressed_shard_problems_name_the_compressed_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
    bad = _tar(tmp_path / "bad.tar", [("k.txt", b"x"), ("../evil.jpg", _jpeg(0))])
    (tmp_path / "bad.tar.gz").write_bytes(gzip.compress(bad.read_bytes()))
    with pytest.raises(DataError, match=r"bad\.tar\.gz: member '\.\./evil\.jpg': unsafe name"):
        load_dataset("webdataset", tmp_path / "bad.tar.gz", "x")
    (tmp_path / "bad.tar.gz").write_bytes(gzip.compress(b"not a tar file" * 100))
    os.utime(tmp_path / "bad.tar.gz", ns=(10**9, 10**9))
    with pytest.raises(DataError, match=r"bad\.tar\.gz: not a readable tar file"):
        load_dataset("webdataset", tmp_path / "bad.tar.gz", "x")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"notes.txt: not a tar shard \(xmodal reads \.tar, \.tar\.gz"):
        load_dataset("webdataset", str(tmp_path / "{bad.tar.gz,notes.txt}"), "x")
