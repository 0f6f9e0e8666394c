"""Vector index: exact search vs brute force, FAISS backends, persistence, atomic commits, integrity."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xmodal.errors import ConfigError, DataError, XmodalError
from xmodal.index import Index, exact_search, list_backends
from xmodal.index import store

faiss = pytest.importorskip("faiss")

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ---------------------------------------------------------------------------------------------
# helpers


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, d: int, clusters: int = 20) -> np.ndarray:
    centres = unit(rng, clusters, d)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute(q: np.ndarray, x: np.ndarray, k: int, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Reference: full float64 score matrix, stable sort, -1 / -inf padding."""
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    s = q64 @ x64.T
    if metric == "l2":
        s = -((q64 ** 2).sum(1)[:, None] + (x64 ** 2).sum(1)[None] - 2 * s)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(s, order, 1)
    pad = k - order.shape[1]
    ids = np.pad(order, ((0, 0), (0, pad)), constant_values=-1)
    scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return scores, ids


def assert_topk(scores, ids, ref_scores, ref_ids, q, x, metric="ip", atol=1e-4):
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores.shape == ids.shape == ref_ids.shape
    np.testing.assert_allclose(scores, ref_scores, atol=atol)
    np.testing.assert_array_equal(ids == -1, ref_ids == -1)
    assert np.all(np.diff(np.where(ids >= 0, scores, -1e30), axis=1) <= 1e-6)  # descending
    # a returned id may differ from the reference only on a genuine tie: its true score must match
    for i, j in zip(*np.nonzero(ids != ref_ids)):
        true = brute(q[i:i + 1], x[ids[i, j]:ids[i, j] + 1], 1, metric)[0][0, 0]
        assert abs(true - ref_scores[i, j]) < atol
    for row in ids:
        real = row[row >= 0]
        assert len(set(real.tolist())) == len(real)


class ArraySource:
    """Minimal VectorSource over an array."""

    def __init__(self, x):
        self.x, self.dim = x, x.shape[1]

    def __len__(self):
        return len(self.x)

    def blocks(self, block_size, start=0):
        for s in range(start, len(self.x), block_size):
            yield s, self.x[s:s + block_size]

    def take(self, rows):
        return self.x[rows].astype(np.float32)


def make_index(path, x, backend="exact", start=0, **kw) -> Index:
    with Index.create(path, x.shape[1], backend=backend, **kw) as ix:
        ix.add(x, [f"img{i}" for i in range(start, start + len(x))],
               [{"path": f"images/{i}.jpg", "n": i} for i in range(start, start + len(x))])
    return ix


def resign(folder: Path, name: str) -> None:
    """Rewrite the manifest's size/sha256 of ``name`` so only structural checks can catch a change."""
    m = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    m["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny blocks make many tiny matmuls; on a busy 2-core box torch's thread pool then spends
    seconds in barriers. One thread keeps this file fast; the result does not depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# exact search


@pytest.mark.parametrize("block_size", [1, 7, 64, 333, 1000, 5000])
def test_exact_matches_brute_force(rng, block_size):
    x, q = unit(rng, 1000, 24), unit(rng, 37, 24)
    got = exact_search(q, ArraySource(x), 10, block_size=block_size, query_block=16)
    assert_topk(*got, *brute(q, x, 10), q, x)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_exact_k_larger_than_n_pads(rng, metric):
    x, q = rng.standard_normal((13, 8)).astype(np.float32), rng.standard_normal((5, 8)).astype(np.float32)
    scores, ids = exact_search(q, ArraySource(x), 20, metric=metric, block_size=4)
    assert_topk(scores, ids, *brute(q, x, 20, metric), q, x, metric)
    assert (ids[:, 13:] == -1).all() and np.isneginf(scores[:, 13:]).all()
    assert sorted(ids[0, :13].tolist()) == list(range(13))


def test_exact_empty_source(rng):
    scores, ids = exact_search(unit(rng, 3, 8), ArraySource(np.zeros((0, 8), np.float32)), 4)
    assert ids.shape == (3, 4) and (ids == -1).all() and np.isneginf(scores).all()


def test_index_exact_float16_and_l2(tmp_path, rng):
    x, q = unit(rng, 500, 16), unit(rng, 9, 16)
    ix = make_index(tmp_path / "h", x, dtype="float16", backend_args={"block_size": 77})
    x16 = x.astype(np.float16).astype(np.float32)  # what is stored
    assert_topk(*Index.open(tmp_path / "h").search(q, 15), *brute(q, x16, 15), q, x16)
    assert ix.vector(3).dtype == np.float32 and np.array_equal(ix.vector(3), x16[3])
    ix2 = make_index(tmp_path / "l2", x * 3, metric="l2")
    assert_topk(*ix2.search(q, 5), *brute(q, x * 3, 5, "l2"), q, x * 3, "l2")


# ---------------------------------------------------------------------------------------------
# FAISS backends


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_faiss_flat_equals_exact(tmp_path, rng, metric):
    x, q = unit(rng, 800, 32), unit(rng, 20, 32)
    exact = make_index(tmp_path / "e", x, metric=metric).search(q, 10)
    flat = make_index(tmp_path / "f", x, backend="flat", metric=metric)
    for ix in (flat, Index.open(tmp_path / "f")):
        scores, ids = ix.search(q, 10)
        np.testing.assert_allclose(scores, exact[0], atol=1e-4)
        assert_topk(scores, ids, *brute(q, x, 10, metric), q, x, metric)
    assert (tmp_path / "f" / "faiss.index").is_file()


@pytest.mark.parametrize("backend,params,floor", [("ivf", {"nprobe": 8}, 0.9), ("hnsw", {"ef_search": 64}, 0.9)])
def test_ann_recall_on_clustered_data(tmp_path, rng, backend, params, floor):
    data = clustered(rng, 3100, 32)  # queries from the same clusters as the data
    x, q = data[:3000], data[3000:]
    _, truth = brute(q, x, 10)
    ix = make_index(tmp_path / backend, x, backend=backend)
    reopened = Index.open(tmp_path / backend)
    for index in (ix, reopened):
        _, ids = index.search(q, 10, **params)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist())])
        assert recall >= floor, recall
    if backend == "ivf":  # more lists probed -> no worse, and all lists -> exact
        assert_topk(*reopened.search(q, 10, nprobe=10_000), *brute(q, x, 10), q, x)
        assert reopened.backend_args["nlist"] is None and 1 < json.loads(
            (tmp_path / "ivf" / "manifest.json").read_text())["backend_info"]["nlist"] <= 3000 // 39


def test_ivf_trains_late_and_retrains_on_growth(tmp_path, rng):
    x = clustered(rng, 2400, 16)
    ix = Index.create(tmp_path / "ivf", 16, backend="ivf")
    ix.add(x[:100], [str(i) for i in range(100)])
    ix.search(x[:1], 3)  # trains on what is there (nlist from 100 vectors)
    assert ix._backend.info() == {"nlist": 2, "trained_on": 100}
    ix.add(x[100:], [str(i) for i in range(100, 2400)])
    ix.commit()
    info = Index.open(tmp_path / "ivf")._backend.info()
    assert info["trained_on"] == 2400 and info["nlist"] == 61


def test_hnsw_incremental_add_and_rebuild(tmp_path, rng):
    data = clustered(rng, 1230, 16)
    x, q = data[:1200], data[1200:]
    make_index(tmp_path / "h", x[:700], backend="hnsw", backend_args={"M": 16, "ef_construction": 80})
    ix = Index.open(tmp_path / "h")
    ix.add(x[700:], [f"img{i}" for i in range(700, 1200)])
    ix.commit()
    ix = Index.open(tmp_path / "h")
    assert len(ix) == 1200 and ix._backend.index.ntotal == 1200 and ix.backend_args["M"] == 16
    _, ids = ix.search(q, 10, ef_search=200)
    _, truth = brute(q, x, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), truth.tolist())]) >= 0.9
    ix.rebuild("exact")
    ix.commit()
    assert not (tmp_path / "h" / "faiss.index").exists()
    reopened = Index.open(tmp_path / "h")
    assert reopened.backend == "exact"
    assert_topk(*reopened.search(q, 10), *brute(q, x, 10), q, x)
    # another backend in memory only: the stored one is untouched until commit
    assert Index.open(tmp_path / "h", backend="flat").backend == "flat"
    assert Index.open(tmp_path / "h").backend == "exact"


def test_missing_faiss_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_faiss(name, *a, **kw):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(XmodalError, match=r"pip install 'xmodal\[faiss\]'"):
        Index.create(tmp_path / "x", 8, backend="hnsw")
    Index.create(tmp_path / "y", 8)  # exact needs no FAISS


# ---------------------------------------------------------------------------------------------
# add / persistence


def test_add_roundtrip_and_persistence(tmp_path, rng):
    x, q = unit(rng, 300, 16), unit(rng, 7, 16)
    path = tmp_path / "idx"
    ref = {"run": "/runs/a", "checkpoint": "best", "config_hash": "abc"}
    ix = Index.create(path, 16, modality="text", model_ref=ref)
    assert not path.exists()  # nothing written before commit
    rows = ix.add(x[:100], [f"t{i}" for i in range(100)], [{"caption": f"c{i}"} for i in range(100)])
    assert rows == range(0, 100) and len(ix) == 100
    assert_topk(*ix.search(q, 5), *brute(q, x[:100], 5), q, x[:100])  # searchable before commit
    ix.commit()
    ix.add(x[100:200], [f"t{i}" for i in range(100, 200)], [{"caption": f"c{i}"} for i in range(100, 200)])
    assert_topk(*ix.search(q, 5), *brute(q, x[:200], 5), q, x[:200])  # committed + pending
    ix.commit()

    ix = Index.open(path, verify=True)
    assert (len(ix), ix.dim, ix.modality, ix.model_ref, ix.backend) == (200, 16, "text", ref, "exact")
    with ix:  # --add semantics: append to what is there, commit on exit
        ix.add(x[200:], [f"t{i}" for i in range(200, 300)])
    ix = Index.open(path)
    assert len(ix) == 300
    assert ix.ids_of([0, 150, 299]) == ["t0", "t150", "t299"]
    assert ix.metadata([5, 299]) == [{"caption": "c5"}, {}]
    assert ix.rows_of(["t42"]) == [42]
    np.testing.assert_array_equal(np.stack([ix.vector(i) for i in range(300)]), x)
    scores, ids = ix.search(q, 10)
    assert_topk(scores, ids, *brute(q, x, 10), q, x)
    assert ix.ids_of(ids)[2] == [f"t{r}" for r in ids[2]]
    m = json.loads((path / "manifest.json").read_text())
    assert m["count"] == 300 and m["version"] == 3 and m["dim"] == 16 and set(m["files"]) == {
        "vectors.npy", "ids.jsonl", "metadata.jsonl"}
    assert np.load(path / "vectors.npy", allow_pickle=False).shape == (300, 16)


def test_exception_in_with_block_does_not_commit(tmp_path, rng):
    x = unit(rng, 20, 8)
    make_index(tmp_path / "i", x[:10])
    with pytest.raises(RuntimeError):
        with Index.open(tmp_path / "i") as ix:
            ix.add(x[10:], [f"img{i}" for i in range(10, 20)])
            raise RuntimeError("boom")
    assert len(Index.open(tmp_path / "i")) == 10


def test_padding_and_lookup_shapes(tmp_path, rng):
    x = unit(rng, 3, 8)
    ix = make_index(tmp_path / "p", x)
    scores, ids = ix.search(x[0], 5)  # one (d,) query -> (1, k)
    assert ids.shape == (1, 5) and (ids[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()
    assert ix.ids_of(ids)[0][3:] == [None, None] and ix.metadata(ids)[0][4] is None
    assert ix.ids_of(int(ids[0, 0])) == "img0"
    with pytest.raises(XmodalError, match="out of range"):
        ix.metadata([3])
    for backend in ("exact", "flat", "ivf", "hnsw"):  # empty indexes commit, open, search, grow
        Index.create(tmp_path / backend, 8, backend=backend).commit()
        empty = Index.open(tmp_path / backend)
        s, i = empty.search(x, 2)
        assert (i == -1).all() and np.isneginf(s).all() and len(empty) == 0
        with empty:
            empty.add(x, ["a", "b", "c"])
        assert Index.open(tmp_path / backend).search(x[1], 1)[1].tolist() == [[1]]


def test_unicode_ids_and_metadata_roundtrip(tmp_path, rng):
    meta = [{"caption": "Ein Hund läuft \u2028 über die Wiese\nzweite Zeile", "path": "写真/猫.jpg"},
            {"caption": "🍕 pizza 🍕", "tags": ["a", "b"], "score": 0.5, "nested": {"x": None}},
            {}]
    ids = ["ünïcødé", "id with\nnewline", "😀"]
    with Index.create(tmp_path / "u", 8) as ix:
        ix.add(unit(rng, 3, 8), ids, meta)
    ix = Index.open(tmp_path / "u", verify=True)
    assert ix.metadata([0, 1, 2]) == meta and ix.ids_of([0, 1, 2]) == ids
    assert ix.rows_of(["😀"]) == [2]
    assert len((tmp_path / "u" / "metadata.jsonl").read_text(encoding="utf-8").splitlines()) == 3


def test_create_refuses_existing_and_overwrite_is_atomic(tmp_path, rng):
    x = unit(rng, 40, 8)
    make_index(tmp_path / "i", x[:10])
    with pytest.raises(XmodalError, match="already exists"):
        Index.create(tmp_path / "i", 8)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(XmodalError, match="not empty"):
        Index.create(tmp_path / "other", 8)
    new = Index.create(tmp_path / "i", 8, overwrite=True, backend="flat")
    new.add(x[10:], [f"n{i}" for i in range(30)])
    assert len(Index.open(tmp_path / "i")) == 10  # old index intact until commit
    new.commit()
    ix = Index.open(tmp_path / "i")
    assert len(ix) == 30 and ix.ids_of([0]) == ["n0"] and ix.backend == "flat"
    assert_topk(*ix.search(x[:4], 3), *brute(x[:4], x[10:], 3), x[:4], x[10:])


def test_concurrent_writer_is_detected(tmp_path, rng):
    x = unit(rng, 30, 8)
    make_index(tmp_path / "i", x[:10])
    a, b = Index.open(tmp_path / "i"), Index.open(tmp_path / "i")
    a.add(x[10:20], [f"a{i}" for i in range(10)])
    b.add(x[20:], [f"b{i}" for i in range(10)])
    a.commit()
    with pytest.raises(XmodalError, match="changed on disk"):
        b.commit()
    assert Index.open(tmp_path / "i").ids_of([19]) == ["a9"]


# ---------------------------------------------------------------------------------------------
# atomicity


def snapshot(path: Path, q: np.ndarray):
    ix = Index.open(path, verify=True)
    s, i = ix.search(q, 5)
    return len(ix), ix.ids_of(list(range(len(ix)))), ix.metadata(list(range(len(ix)))), s, i


@pytest.mark.parametrize("backend,fail_at", [("exact", "ids"), ("exact", "metadata"), ("exact", "vectors"),
                                             ("hnsw", "vectors"), ("hnsw", "faiss")])
def test_crash_while_staging_keeps_previous_version(tmp_path, rng, monkeypatch, backend, fail_at):
    x, q = unit(rng, 60, 8), unit(rng, 4, 8)
    path = tmp_path / "i"
    make_index(path, x[:40], backend=backend)
    before = snapshot(path, q)
    files_before = {p.name: p.read_bytes() for p in path.iterdir() if p.name != ".lock"}

    ix = Index.open(path)
    ix.add(x[40:], [f"img{i}" for i in range(40, 60)], [{"n": i} for i in range(40, 60)])
    if fail_at == "faiss":
        monkeypatch.setattr(type(ix._backend), "save", lambda self, p: (_ for _ in ()).throw(OSError("disk full")))
    else:
        real = store.Index._write_lines if fail_at != "vectors" else store.Index._write_vectors
        target = {"ids": "ids.jsonl.new", "metadata": "metadata.jsonl.new", "vectors": "vectors.npy.new"}[fail_at]

        def failing(self, p, *a):
            if Path(p).name == target:
                Path(p).write_bytes(b"partial")
                raise OSError("disk full")
            return real(self, p, *a)

        monkeypatch.setattr(store.Index, "_write_lines" if fail_at != "vectors" else "_write_vectors", failing)
    with pytest.raises(OSError, match="disk full"):
        ix.commit()
    monkeypatch.undo()
    after = snapshot(path, q)
    assert after[:3] == before[:3]
    np.testing.assert_array_equal(after[4], before[4])
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.name != ".lock"} == files_before
    ix.commit()  # the same object can retry: nothing was lost in memory either
    assert len(Index.open(path, verify=True)) == 60


def test_crash_during_roll_forward_finishes_on_open(tmp_path, rng, monkeypatch):
    x, q = unit(rng, 50, 8), unit(rng, 4, 8)
    path = tmp_path / "i"
    make_index(path, x[:30], backend="flat")
    ix = Index.open(path)
    ix.add(x[30:], [f"img{i}" for i in range(30, 50)])
    real_replace, calls = os.replace, []

    def flaky(src, dst):
        calls.append(Path(src).name)
        if Path(src).name == "ids.jsonl.new":  # after vectors.npy was already swapped in
            raise OSError("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", flaky)
    with pytest.raises(OSError, match="power cut"):
        ix.commit()
    monkeypatch.undo()
    assert "manifest.json.new" in os.listdir(path) and "vectors.npy" in calls[-2]
    with pytest.raises(XmodalError, match="reopen"):
        ix.add(x[:1], ["again"])
    reopened = Index.open(path, verify=True)  # rolls forward
    assert len(reopened) == 50 and reopened.ids_of([49]) == ["img49"]
    assert not [n for n in os.listdir(path) if n.endswith(".new")]
    assert_topk(*reopened.search(q, 5), *brute(q, x, 5), q, x)


HARD_CRASH = textwrap.dedent("""
    import os, sys, numpy as np
    sys.path.insert(0, {src!r})
    from xmodal.index import Index, store
    path, mode = sys.argv[1], sys.argv[2]
    ix = Index.open(path)
    x = np.random.default_rng(1).standard_normal((25, 8)).astype(np.float32)
    ix.add(x, ["new%d" % i for i in range(25)], [{{"n": i}} for i in range(25)])
    if mode == "staging":   # die half-way through writing the new vectors.npy
        real = store._HashingWriter.write
        def write(self, data):
            if self.size > 200:
                os._exit(3)
            return real(self, data)
        store._HashingWriter.write = write
    else:                   # die after the commit point, with only some files renamed
        real = os.replace
        def replace(src, dst):
            if str(src).endswith("ids.jsonl.new"):
                os._exit(3)
            return real(src, dst)
        store.os.replace = replace
    ix.commit()
""")


@pytest.mark.parametrize("mode,expected", [("staging", 30), ("rollforward", 55)])
def test_hard_crash_in_subprocess(tmp_path, rng, mode, expected):
    x = unit(rng, 30, 8)
    path = tmp_path / "i"
    make_index(path, x, backend="flat")
    script = tmp_path / "crash.py"
    script.write_text(HARD_CRASH.format(src=SRC))
    proc = subprocess.run([sys.executable, str(script), str(path), mode], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert any(n.endswith(".new") for n in os.listdir(path))  # it really died mid-commit
    ix = Index.open(path, verify=True)
    assert len(ix) == expected
    assert ix.ids_of([29]) == ["img29"]
    if expected == 55:
        assert ix.ids_of([54]) == ["new24"] and ix.metadata([54]) == [{"n": 24}]
    # the next commit clears leftovers and works
    ix.add(unit(rng, 1, 8), ["last"])
    ix.commit()
    assert len(Index.open(path, verify=True)) == expected + 1
    assert not [n for n in os.listdir(path) if n.endswith(".new")]


# ---------------------------------------------------------------------------------------------
# integrity


@pytest.fixture()
def built(tmp_path, rng):
    path = tmp_path / "i"
    make_index(path, unit(rng, 50, 8), backend="flat")
    return path


@pytest.mark.parametrize("name", ["vectors.npy", "ids.jsonl", "metadata.jsonl", "faiss.index", "manifest.json"])
def test_missing_file_is_named(built, name):
    (built / name).unlink()
    with pytest.raises(DataError, match=rf"{name}.*missing"):
        Index.open(built)


@pytest.mark.parametrize("name", ["vectors.npy", "ids.jsonl", "metadata.jsonl", "faiss.index"])
def test_truncated_file_is_named(built, name):
    data = (built / name).read_bytes()
    (built / name).write_bytes(data[:-7])
    with pytest.raises(DataError, match=rf"{name}.*bytes"):
        Index.open(built, verify="size")


@pytest.mark.parametrize("name", ["vectors.npy", "ids.jsonl", "metadata.jsonl", "faiss.index"])
def test_modified_file_fails_sha256(built, name):
    data = bytearray((built / name).read_bytes())
    data[-2] ^= 0x01
    (built / name).write_bytes(bytes(data))
    for verify in (True, "auto"):
        with pytest.raises(DataError, match=rf"{name}.*sha256"):
            Index.open(built, verify=verify)
    try:  # same size: only the hash is sure to tell; structure checks may or may not
        Index.open(built, verify="size")
    except DataError as e:
        assert name in str(e)


def test_structural_checks_name_the_file(built, rng):
    # more ids than rows (sizes re-signed so only the count check can catch it)
    with open(built / "ids.jsonl", "a", encoding="utf-8") as fh:
        fh.write('"extra"\n')
    resign(built, "ids.jsonl")
    with pytest.raises(DataError, match=r"ids\.jsonl.*51 ids.*50"):
        Index.open(built)


def test_wrong_dtype_and_shape_are_named(tmp_path, rng):
    path = tmp_path / "i"
    make_index(path, unit(rng, 10, 8))
    np.save(path / "vectors.npy", unit(rng, 10, 8).astype(np.float64))
    resign(path, "vectors.npy")
    with pytest.raises(DataError, match=r"vectors\.npy.*dtype float64"):
        Index.open(path)
    np.save(path / "vectors.npy", unit(rng, 9, 8))
    resign(path, "vectors.npy")
    with pytest.raises(DataError, match=r"vectors\.npy.*shape \(9, 8\)"):
        Index.open(path)


def test_metadata_count_and_faiss_count(tmp_path, rng):
    path = tmp_path / "i"
    make_index(path, unit(rng, 10, 8), backend="flat")
    lines = (path / "metadata.jsonl").read_text().splitlines()
    (path / "metadata.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    resign(path, "metadata.jsonl")
    with pytest.raises(DataError, match=r"metadata\.jsonl.*9 rows.*10"):
        Index.open(path)
    make_index(tmp_path / "j", unit(rng, 10, 8), backend="flat")
    other = faiss.IndexFlatIP(8)
    other.add(unit(rng, 4, 8))
    faiss.write_index(other, str(tmp_path / "j" / "faiss.index"))
    resign(tmp_path / "j", "faiss.index")
    with pytest.raises(DataError, match=r"faiss\.index.*4 vectors.*10"):
        Index.open(tmp_path / "j")
    (tmp_path / "j" / "faiss.index").write_bytes(b"garbage garbage")
    resign(tmp_path / "j", "faiss.index")
    with pytest.raises(DataError, match=r"faiss\.index.*cannot be read"):
        Index.open(tmp_path / "j")


def test_bad_manifest(built):
    m = json.loads((built / "manifest.json").read_text())
    (built / "manifest.json").write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(DataError, match=r"manifest\.json.*format_version.*upgrade"):
        Index.open(built)
    (built / "manifest.json").write_text(json.dumps({**m, "files": {**m["files"], "../evil": m["files"]["ids.jsonl"]}}))
    with pytest.raises(DataError, match="unknown file"):
        Index.open(built)
    (built / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json.*not valid JSON"):
        Index.open(built)
    with pytest.raises(XmodalError, match="no such index"):
        Index.open(built.parent / "nope")


def test_add_validation(tmp_path, rng):
    ix = Index.create(tmp_path / "i", 8, dtype="float16")
    ix.add(unit(rng, 2, 8), ["a", "b"])
    bad = unit(rng, 3, 8)
    bad[1, 2] = np.nan
    cases = [
        (lambda: ix.add(unit(rng, 2, 9), ["c", "d"]), r"dim 9.*dim 8"),
        (lambda: ix.add(bad, ["c", "d", "e"]), r"vector 1 \(id 'd'\).*NaN"),
        (lambda: ix.add(np.full((1, 8), 1e6, np.float32), ["c"]), "float16"),
        (lambda: ix.add(unit(rng, 2, 8), ["c"]), "2 vectors but 1 ids"),
        (lambda: ix.add(unit(rng, 2, 8), ["c", "a"]), "duplicate id 'a'"),
        (lambda: ix.add(unit(rng, 2, 8), ["c", "c"]), "duplicate id 'c'"),
        (lambda: ix.add(unit(rng, 1, 8), [3]), "ids must be strings"),
        (lambda: ix.add(unit(rng, 1, 8), ["c"], ["nope"]), "expected a dict"),
        (lambda: ix.add(unit(rng, 1, 8), ["c"], [{"x": object()}]), r"metadata\.jsonl.*row 2.*JSON"),
        (lambda: ix.add(unit(rng, 8, 1)[:, 0], ["c"]), "2-D"),
        (lambda: ix.add(np.array([["a"] * 8]), ["c"]), "numeric"),
    ]
    for fn, pattern in cases:
        with pytest.raises(DataError, match=pattern):
            fn()
    assert len(ix) == 2 and ix.ids_of([0, 1]) == ["a", "b"]  # failed adds change nothing
    import torch

    ix.add(torch.from_numpy(unit(rng, 2, 8)), ["t1", "t2"])  # tensors are accepted
    assert len(ix) == 4


def test_search_and_config_validation(tmp_path, rng):
    ix = make_index(tmp_path / "i", unit(rng, 20, 8), backend="ivf", backend_args={"nprobe": 2})
    q = unit(rng, 2, 8)
    for k in (0, -1, 10_001, 2.5, "3", True):
        with pytest.raises(XmodalError, match="k="):
            ix.search(q, k)
    assert ix.search(q, 10_001, max_k=20_000)[1].shape == (2, 10_001)
    with pytest.raises(XmodalError, match="query dim 9.*index dim 8"):
        ix.search(unit(rng, 2, 9), 3)
    with pytest.raises(XmodalError, match="got shape"):
        ix.search(q[None], 3)
    nan_q = q.copy()
    nan_q[1, 0] = np.inf
    with pytest.raises(XmodalError, match="query 1 has NaN"):
        ix.search(nan_q, 3)
    with pytest.raises(ConfigError, match="unknown search parameter 'ef_search'.*nprobe"):
        ix.search(q, 3, ef_search=3)
    with pytest.raises(ConfigError, match="nprobe=0"):
        ix.search(q, 3, nprobe=0)
    with pytest.raises(ConfigError, match="unknown backend_args key 'nprob'"):
        Index.create(tmp_path / "x", 8, backend="ivf", backend_args={"nprob": 3})
    with pytest.raises(XmodalError, match="unknown index backend 'annoy'.*exact, flat, hnsw, ivf"):
        Index.create(tmp_path / "x", 8, backend="annoy")
    for kw, pattern in [({"dim": 0}, "dim="), ({"metric": "cos"}, "metric="), ({"modality": "audio"}, "modality="),
                        ({"dtype": "int8"}, "dtype="), ({"model_ref": {"x": object()}}, "model_ref")]:
        with pytest.raises(ConfigError, match=pattern):
            Index.create(tmp_path / "x", **{"dim": 8, **kw})
    with pytest.raises(ConfigError, match="verify="):
        Index.open(tmp_path / "i", verify="md5")
    assert list_backends() == ["exact", "flat", "hnsw", "ivf", "ivfpq"]
