"""``xmodal.index.pages``: memory-mapped pages released after use (RSS stays flat), ``NpyRows``
plain reads, and the index paths that use them (exact search, rebuild / ``convert_to_ivfpq``)."""
from __future__ import annotations

import numpy as np
import pytest

from xmodal.errors import DataError
from xmodal.index import Index, exact_search
from xmodal.index import pages
from xmodal.index.pages import NpyRows, gather_rows, release_rows

MB = 1 << 20


def rss_file_mb() -> float:
    """File-backed resident pages of this process (memory-mapped files), MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A 32 MiB float16 (65536, 256) file of unit vectors and the array itself."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((65536, 256)).astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    path = tmp_path_factory.mktemp("pages") / "x.npy"
    np.save(path, x)
    return path, x


def test_release_rows_drops_a_read_maps_pages_and_keeps_the_data(big):
    path, x = big
    m = np.load(path, mmap_mode="r")
    before = rss_file_mb()
    total = sum(float(m[s:s + 8192].astype(np.float32).sum()) for s in range(0, len(m), 8192))
    assert rss_file_mb() - before > 24  # a plain pass leaves the file mapped in RSS
    assert release_rows(m, min_bytes=0)
    assert rss_file_mb() - before < 4
    again = 0.0
    for s in range(0, len(m), 8192):  # released block by block: RSS stays at about one block
        again += float(m[s:s + 8192].astype(np.float32).sum())
        assert release_rows(m, s, s + 8192, min_bytes=0, drop_cache=True)
    assert rss_file_mb() - before < 8
    assert again == total and np.array_equal(m, x)  # released pages come back from the file


def test_only_big_read_only_memory_maps_are_released(big, tmp_path):
    path, x = big
    anon = np.array(x)
    assert not release_rows(anon, min_bytes=0) and np.array_equal(anon, x)  # never zero anonymous memory
    cow = np.load(path, mmap_mode="c")
    cow[0] = 0  # a private copy-on-write page: DONTNEED would lose it
    assert not release_rows(cow, min_bytes=0) and not cow[0].any()
    assert not release_rows(np.load(path, mmap_mode="r"))  # 32 MiB < RELEASE_MIN_BYTES
    assert not release_rows(np.load(path, mmap_mode="r"), 5, 5, min_bytes=0)


def test_gather_rows_keeps_the_resident_pages_under_a_budget(big, monkeypatch):
    path, x = big
    monkeypatch.setattr(pages, "RELEASE_MIN_BYTES", 0)
    monkeypatch.setattr(pages, "GATHER_ROWS", 512)
    rng = np.random.default_rng(1)
    growth = {}
    for budget in (1 << 40, 4 << 20):  # the control (never released), then a 4 MiB budget
        monkeypatch.setattr(pages, "GATHER_BUDGET", budget)
        m = np.load(path, mmap_mode="r")
        before = rss_file_mb()
        sample = np.sort(rng.choice(len(x), 6000, replace=False))  # a training sample: all over the file
        got = pages.gather_rows(m, sample)
        assert got.dtype == np.float32 and np.array_equal(got, x[sample].astype(np.float32))
        for _ in range(100):  # a query's re-scoring: 40 random rows at a time
            few = rng.integers(0, len(x), 40)
            np.testing.assert_array_equal(pages.gather_rows(m, few), x[few].astype(np.float32))
        growth[budget] = rss_file_mb() - before
        del m
    assert growth[1 << 40] > 24 and growth[4 << 20] < 10, growth
    np.testing.assert_array_equal(gather_rows(x, [3, 5]), x[[3, 5]].astype(np.float32))  # in memory: a plain gather


def test_npy_rows_reads_without_mapping(big, tmp_path):
    path, x = big
    exact_search(x[:2].astype(np.float32), NpyRows(path, stop=10), 1)  # torch's libraries mapped before measuring
    before = rss_file_mb()
    with NpyRows(path, reuse_buffer=True, drop_cache=True) as src:
        assert (len(src), src.dim, src.dtype) == (65536, 256, np.float16)
        seen = []
        for s, block in src.blocks(10_000):
            assert np.array_equal(block, x[s:s + len(block)])
            seen.append(s)
        assert seen == list(range(0, 65536, 10_000))
        np.testing.assert_array_equal(src.take(np.array([3, 65535, 3])), x[[3, 65535, 3]].astype(np.float32))
        q = x[:5].astype(np.float32)
        _, ids = exact_search(q, src, 3, block_size=8192)
        assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert rss_file_mb() - before < 4
    assert len(NpyRows(path, stop=100)) == 100


def test_npy_rows_bad_files_name_the_file(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="a.npy"):
        NpyRows(tmp_path / "a.npy")
    np.save(tmp_path / "b.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(DataError, match=r"b.npy.*2-D"):
        NpyRows(tmp_path / "b.npy")
    np.save(tmp_path / "c.npy", np.zeros((100, 8), np.float32))
    data = (tmp_path / "c.npy").read_bytes()
    (tmp_path / "c.npy").write_bytes(data[:-40])
    with pytest.raises(DataError, match=r"c.npy.*truncated"):
        NpyRows(tmp_path / "c.npy")


def _index(path, x):
    with Index.create(path, dim=x.shape[1], dtype="float16") as index:
        index.add(x, [f"r{i}" for i in range(len(x))])


def test_index_exact_search_keeps_rss_flat(big, tmp_path, monkeypatch):
    _, x = big
    _index(tmp_path / "e.idx", x)
    q = x[:4].astype(np.float32)
    growth = {}
    for limit in (1 << 40, 0):  # first without releasing (the control), then releasing
        monkeypatch.setattr(pages, "RELEASE_MIN_BYTES", limit)
        index = Index.open(tmp_path / "e.idx")
        before = rss_file_mb()
        _, ids = index.search(q, 5, block_size=8192)
        growth[limit] = rss_file_mb() - before  # measured while the memory map is still open
        assert ids[:, 0].tolist() == [0, 1, 2, 3]
        index.close()
    assert growth[1 << 40] > 24 and growth[0] < 8, growth


def test_convert_to_ivfpq_streams_from_the_map_and_equals_the_in_memory_build(big, tmp_path, monkeypatch):
    faiss = pytest.importorskip("faiss")
    from xmodal.index import store
    from xmodal.index.ivfpq import choose_params
    from xmodal.index.large import convert_to_ivfpq

    _, x = big
    x = x[:8000, :32]  # (8000, 32): a quick build
    x = (x.astype(np.float32) / np.linalg.norm(x.astype(np.float32), axis=1, keepdims=True)).astype(np.float16)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # deterministic k-means: the two builds must agree
    monkeypatch.setattr(pages, "RELEASE_MIN_BYTES", 0)
    released = []
    monkeypatch.setattr(store, "release_rows", lambda a, s, e: released.append((s, e)) or release_rows(a, s, e))
    try:
        _index(tmp_path / "m.idx", x)
        released.clear()
        inode = (tmp_path / "m.idx" / "vectors.npy").stat().st_ino
        params = convert_to_ivfpq(tmp_path / "m.idx", "64MB", opq=False, report=lambda _: None)
        assert params == choose_params(len(x), 32, "64MB", opq=False)
        assert [s for s, e in released if e > s] == list(range(0, len(x), 65536))  # every add block released
        assert (tmp_path / "m.idx" / "vectors.npy").stat().st_ino == inode  # vectors.npy is not rewritten
        with Index.create(tmp_path / "mem.idx", dim=32, dtype="float16", backend="ivfpq", backend_args=params) as ref:
            ref.add(x, [f"r{i}" for i in range(len(x))])  # the same build from rows held in memory
        q = x[:50].astype(np.float32)
        got, want = Index.open(tmp_path / "m.idx").search(q, 10), Index.open(tmp_path / "mem.idx").search(q, 10)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    finally:
        faiss.omp_set_num_threads(threads)


def test_mmap_release_benchmark_dry_run():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "mmap_release.py"
    proc = subprocess.run([sys.executable, str(script), "--dry-run"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout)
    assert res["released"]["search_rss_file_mb"] <= res["reference (no release)"]["search_rss_file_mb"] + 0.5
    assert set(res["ratio released / reference"]) == {"search", "gather"}
