"""The ``ivfpq`` backend (IVF-PQ, optional OPQ, exact re-score from the memory map), its memory
estimate, the budget rule and ``xmodal index --backend ivfpq --memory-budget``."""
from __future__ import annotations

import numpy as np
import pytest

from xmodal.errors import ConfigError, XmodalError
from xmodal.index import Index
from xmodal.index.ivfpq import (auto_ivfpq_nlist, choose_params, describe_estimate, estimate_memory,
                                parse_size, resolve_params)

faiss = pytest.importorskip("faiss")


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    # FAISS's OpenMP loops spin badly on a loaded 2-core machine; one thread is faster there
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, d: int, seed: int, clusters: int = 40, latent: int = 4) -> np.ndarray:
    """Unit vectors from a Gaussian mixture, each cluster on its own low-dim subspace + noise.

    Real embeddings cluster and have a low intrinsic dimension; uniform Gaussian vectors would
    be the worst case for PQ and are not what an index of embeddings holds.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    bases = rng.standard_normal((clusters, latent, d)) / np.sqrt(d)
    c = rng.integers(0, clusters, n)
    z = rng.standard_normal((n, latent))
    x = centres[c] + 1.5 * np.einsum("nl,nld->nd", z, bases[c]) + 0.3 * rng.standard_normal((n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist())]))


@pytest.fixture(scope="module")
def data():
    x = clustered(6000, 32, seed=0)
    q = clustered(6200, 32, seed=0)[6000:]  # same mixture, other draws: held-out queries
    truth = np.argsort(-(q.astype(np.float64) @ x.T.astype(np.float64)), axis=1)[:, :10]
    return x, q, truth


@pytest.mark.parametrize("opq", [False, True])
def test_recall_against_exact_on_clustered_data(data, tmp_path, opq):
    x, q, truth = data
    args = {"nlist": 32, "m": 8, "nbits": 6, "nprobe": 8, "refine": 4, "opq": opq}
    with Index.create(tmp_path / "pq.idx", dim=32, backend="ivfpq", backend_args=args) as index:
        index.add(x, [f"r{i}" for i in range(len(x))])
    index = Index.open(tmp_path / "pq.idx")
    scores, rows = index.search(q, k=10)
    assert recall_at_10(rows, truth) >= 0.9
    # refined scores are the exact inner products of the rows returned, in descending order
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[rows]), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    # PQ scores alone are approximate: re-scoring more candidates is what buys the recall back
    _, pq_rows = index.search(q, k=10, refine=1)
    assert recall_at_10(pq_rows, truth) < recall_at_10(rows, truth)
    info = index._backend.info()
    assert (info["nlist"], info["m"], info["nbits"], info["code_size"]) == (32, 8, 6, 6)
    assert index.backend_args["opq"] is opq
    index.close()


def test_added_in_chunks_from_a_memory_map(data, tmp_path):
    x, q, truth = data
    src = tmp_path / "src.npy"
    np.save(src, x.astype(np.float16))
    mm = np.load(src, mmap_mode="r")
    index = Index.create(tmp_path / "c.idx", dim=32, backend="ivfpq", dtype="float16",
                         backend_args={"nlist": 16, "m": 8, "nbits": 6, "nprobe": 16, "refine": 8, "opq": False})
    for s in range(0, len(x), 2000):
        index.add(mm[s:s + 2000], [f"r{i}" for i in range(s, min(len(x), s + 2000))])
        index.commit()  # the first commit trains on what is there; later ones go into the lists
    assert index._backend.ntotal == len(x) and index._backend.trained_on == 2000
    _, rows = index.search(q, k=10)
    assert recall_at_10(rows, truth) >= 0.9
    index.close()


def test_estimate_memory_golden_values():
    p = {"nlist": 1024, "m": 16, "nbits": 8, "opq": False, "train_size": 50_000}
    est = estimate_memory(1_000_000, 128, p)
    assert est["codes"] == 16_000_000 and est["ids"] == 8_000_000
    assert est["coarse_centroids"] == 1024 * 128 * 4 and est["pq_centroids"] == 256 * 128 * 4
    assert est["opq_matrix"] == 0 and est["precomputed_table"] == 0
    assert est["resident"] == 16_000_000 + 8_000_000 + 1024 * 512 + 256 * 512
    assert est["list_growth_slack"] == 24_000_000
    assert est["train_sample"] == 3 * 50_000 * 512 + 50_000 * 12
    assert est["total"] == est["build_peak"] + est["store"] == est["build_peak"] + 150_000_000
    l2 = estimate_memory(1_000_000, 128, {**p, "opq": True}, metric="l2")
    assert l2["opq_matrix"] == 128 * 128 * 4 and l2["precomputed_table"] == 1024 * 16 * 256 * 4


def test_estimate_matches_the_built_index(data, tmp_path):
    x, _, _ = data
    args = {"nlist": 32, "m": 8, "nbits": 8, "opq": True, "nprobe": 8, "refine": 4}
    with Index.create(tmp_path / "e.idx", dim=32, backend="ivfpq", backend_args=args) as index:
        index.add(x, [f"r{i}" for i in range(len(x))])
    stored = (tmp_path / "e.idx" / "faiss.index").stat().st_size  # codes + ids + centroids + rotation
    resident = estimate_memory(len(x), 32, args)["resident"]
    assert abs(stored - resident) / resident < 0.1, (stored, resident)


def test_choose_params_fits_the_budget_and_prefers_bigger_codes():
    small = choose_params(10_000_000, 256, "3GB")
    big = choose_params(10_000_000, 256, "8GB")
    for p in (small, big):
        assert estimate_memory(10_000_000, 256, p)["total"] <= parse_size(p is small and "3GB" or "8GB")
        assert 256 % p["m"] == 0 and p["nlist"] == 4096 and p["nbits"] == 8 and p["opq"] is True
    assert big["m"] == 64 and small["m"] < big["m"]
    with pytest.raises(ConfigError, match="too small .* needs about"):
        choose_params(10_000_000, 256, "500MB")
    assert choose_params(1000, 16, "1GB")["nbits"] < 8  # too few vectors to train 256 centroids


def test_auto_nlist_is_a_power_of_two_with_enough_training_points():
    assert [auto_ivfpq_nlist(n) for n in (10, 1000, 1_000_000, 10_000_000)] == [1, 16, 1024, 4096]
    for n in (50, 5000, 123_456):
        nl = auto_ivfpq_nlist(n)
        assert nl & (nl - 1) == 0 and nl * 39 <= n
    assert resolve_params(1_000_000, 256, {})["m"] == 64


def test_parse_size():
    assert parse_size("4GB") == 4 << 30 and parse_size("512MiB") == 512 << 20
    assert parse_size("1.5g") == 3 << 29 and parse_size(1234) == 1234
    for bad in ("4XB", "lots", "0", "-1GB"):
        with pytest.raises(ConfigError, match="--memory-budget"):
            parse_size(bad)


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="opq='yes' must be true or false"):
        Index.create(tmp_path / "a", dim=32, backend="ivfpq", backend_args={"opq": "yes"})
    with pytest.raises(ConfigError, match="unknown backend_args key 'nprob'"):
        Index.create(tmp_path / "a", dim=32, backend="ivfpq", backend_args={"nprob": 4})
    x = clustered(300, 30, seed=1)
    index = Index.create(tmp_path / "b", dim=30, backend="ivfpq", backend_args={"m": 8, "nlist": 2})
    index.add(x, [str(i) for i in range(len(x))])
    with pytest.raises(ConfigError, match="m=8 must divide the dim 30"):
        index.search(x[:2], k=5)
    index = Index.create(tmp_path / "c", dim=30, backend="ivfpq", backend_args={"m": 5, "nlist": 2})
    index.add(x[:100], [str(i) for i in range(100)])
    with pytest.raises(ConfigError, match="nbits=8 needs at least 256 vectors"):
        index.commit()
    with pytest.raises(XmodalError, match="unknown search parameter"):
        Index.create(tmp_path / "d", dim=30, backend="ivfpq").search(x[:1], k=1, ef_search=3)


def test_convert_to_ivfpq_reports_the_plan_first(data, tmp_path):
    from xmodal.index.large import convert_to_ivfpq

    x, q, truth = data
    with Index.create(tmp_path / "g.idx", dim=32) as index:
        index.add(x, [f"r{i}" for i in range(len(x))])
    lines: list[str] = []
    params = convert_to_ivfpq(tmp_path / "g.idx", "64MB", opq=False, report=lines.append)
    assert "memory estimate" in lines[0] and f"nlist={params['nlist']}" in lines[0]
    index = Index.open(tmp_path / "g.idx")
    assert index.backend == "ivfpq" and index.backend_args["m"] == params["m"]
    assert recall_at_10(index.search(q, k=10)[1], truth) >= 0.9
    assert "resident" in describe_estimate(len(x), 32, params, estimate_memory(len(x), 32, params))


def test_cli_memory_budget_needs_ivfpq(tmp_path, capsys):
    from xmodal.cli import main

    rc = main(["index", str(tmp_path), "--data", "split:test", "--out", str(tmp_path / "o"),
               "--backend", "ivf", "--memory-budget", "4GB"])
    err = capsys.readouterr().err
    assert rc == 2 and "only applies to --backend ivfpq" in err and len(err.strip().splitlines()) == 1
    rc = main(["index", str(tmp_path), "--data", "split:test", "--out", str(tmp_path / "o"),
               "--backend", "ivfpq", "--memory-budget", "lots"])
    assert rc == 2 and "expected a size" in capsys.readouterr().err
