"""The streaming engine against an independent, naive full-matrix reference."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import xmodal
from xmodal.data.base import GroundTruth
from xmodal.errors import ConfigError, DataError, XmodalError
from xmodal.eval.metrics import (METRIC_KEYS, ranks_prepared, metrics_from_ranks, prepare_inputs,
                                 ranks_from_embeddings, ranks_from_score_blocks, ranks_from_scores)


# ------------------------------------------------------------------------------------------
# independent reference: full matrix, one argsort per query
# ------------------------------------------------------------------------------------------
def naive_ranks(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``scores`` (N images, M texts) and a boolean ``positives`` mask of the same shape.

    Each query sorts all candidates by descending score, positives first among equal scores
    (ties go to the positive), and its rank is the position of the first positive; a query
    without positives gets -1.
    """
    def direction(s: np.ndarray, p: np.ndarray) -> np.ndarray:
        out = np.full(len(s), -1)
        for q in range(len(s)):
            if p[q].any():
                order = np.lexsort((~p[q], -s[q]))
                out[q] = int(np.flatnonzero(p[q][order])[0])
        return out

    return direction(scores, positives), direction(scores.T, positives.T)


def naive_metrics(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        r = r[r >= 0]
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(1 for x in r if x < k) / len(r)
        out[f"{name}_medr"] = float(np.floor(np.median(r)) + 1)
        out[f"{name}_meanr"] = float(np.mean(r) + 1)
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def int_embeddings(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Small integers as float32: every dot product is exact, so ties are real ties."""
    return rng.integers(-3, 4, size=(n, d)).astype(np.float32)


def dense(gt: GroundTruth) -> np.ndarray:
    return gt.dense().T  # (N, M)


def check(img: np.ndarray, txt: np.ndarray, mapping, block_sizes=(7, 64, 10_000), **kw):
    gt = mapping if isinstance(mapping, GroundTruth) else None
    scores = img.astype(np.float64) @ txt.astype(np.float64).T
    if gt is None:
        from xmodal.eval.metrics import as_ground_truth

        gt = as_ground_truth(mapping, len(img), len(txt))
    ref = naive_ranks(scores, dense(gt))
    for bs in block_sizes:
        i2t, t2i = ranks_from_embeddings(img, txt, mapping, block_size=bs, **kw)
        np.testing.assert_array_equal(i2t, ref[0], err_msg=f"i2t, block {bs}")
        np.testing.assert_array_equal(t2i, ref[1], err_msg=f"t2i, block {bs}")
    got = xmodal.evaluate_embeddings(img, txt, mapping, block_size=block_sizes[1], **kw)
    want = naive_metrics(*ref)
    assert list(got) == list(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
    return ref


# ------------------------------------------------------------------------------------------
def test_one_positive_per_text():
    rng = np.random.default_rng(0)
    img, txt = int_embeddings(rng, 61, 12), int_embeddings(rng, 61, 12)
    ref = check(img, txt, np.arange(61), block_sizes=(1, 7, 64, 10_000))
    assert (ref[0] > 0).any() and (ref[0] == 0).any()  # a non-trivial ranking


def test_five_captions_per_image_in_shuffled_order():
    rng = np.random.default_rng(1)
    img = int_embeddings(rng, 40, 10)
    mapping = rng.permutation(np.repeat(np.arange(40), 5))
    txt = img[mapping] + rng.integers(-2, 3, size=(200, 10)).astype(np.float32)
    check(img, txt, mapping)


def test_varying_positives_per_text_and_images_without_text():
    rng = np.random.default_rng(2)
    n, m = 45, 130
    img, txt = int_embeddings(rng, n, 9), int_embeddings(rng, m, 9)
    lists = [sorted(rng.choice(n - 5, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(m)]
    i2t, t2i = check(img, txt, lists)
    assert (i2t[n - 5:] == -1).all()  # images 40..44 have no text: skipped as queries
    assert (i2t[: n - 5] >= 0).all() and (t2i >= 0).all()


def test_more_images_than_texts():
    # the engine streams the larger side; here that is the images
    rng = np.random.default_rng(12)
    n, m = 90, 40
    img, txt = int_embeddings(rng, n, 7), int_embeddings(rng, m, 7)
    lists = [sorted(rng.choice(n, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(m)]
    i2t, _ = check(img, txt, lists)
    assert (i2t == -1).any() and (i2t >= 0).any()


def test_ground_truth_with_empty_text_is_skipped():
    rng = np.random.default_rng(3)
    img, txt = int_embeddings(rng, 20, 6), int_embeddings(rng, 30, 6)
    t = np.arange(29)
    gt = GroundTruth.from_pairs(t, t % 20, 30, 20)  # text 29 has no image
    i2t, t2i = check(img, txt, gt)
    assert t2i[29] == -1


def test_gaussian_float_data_against_argsort():
    rng = np.random.default_rng(4)
    n, m, d = 80, 400, 32
    img = rng.standard_normal((n, d)).astype(np.float32)
    mapping = rng.integers(0, n, m)
    txt = (img[mapping] + 2.0 * rng.standard_normal((m, d))).astype(np.float32)
    s = img.astype(np.float64) @ txt.astype(np.float64).T
    pos = np.zeros((n, m), bool)
    pos[mapping, np.arange(m)] = True
    # plain descending argsort, as the seeds do
    t2i_ref = np.array([int(np.where(np.argsort(s[:, t])[::-1] == mapping[t])[0][0]) for t in range(m)])
    i2t_ref = np.array([min(np.where(np.argsort(s[i])[::-1] == j)[0][0] for j in np.flatnonzero(pos[i]))
                        if pos[i].any() else -1 for i in range(n)])
    i2t, t2i = ranks_from_embeddings(img, txt, mapping, block_size=17)
    # float32 products may reorder candidates within rounding of each other; allow only that
    gap_t = np.abs(s - s[mapping, np.arange(m)][None, :]) < 1e-4
    gap_t[mapping, np.arange(m)] = False
    slack_t = gap_t.sum(0)
    assert np.all(np.abs(t2i - t2i_ref) <= slack_t)
    assert np.mean(t2i == t2i_ref) > 0.99 and np.mean(i2t == i2t_ref) > 0.99


def test_ties_count_only_strictly_higher_non_positives():
    # image 1 duplicates image 0; texts 0 and 1 are both captions of image 0
    img = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=np.float32)
    txt = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    mapping = [0, 0, 2]
    i2t, t2i = ranks_from_embeddings(img, txt, mapping)
    # text 0: image 3 scores 2 (> 1, counted); image 1 ties with the positive (not counted)
    assert t2i.tolist() == [1, 1, 0]
    # image 0: its texts 0 and 1 tie with each other (both positive): rank 0
    # image 3: no text -> skipped; image 1, 2: image 1 has no text either
    assert i2t.tolist() == [0, -1, 0, -1]


def test_duplicate_float_images_tie_exactly():
    rng = np.random.default_rng(5)
    img = rng.standard_normal((50, 24)).astype(np.float32)
    txt = (img + 0.3 * rng.standard_normal((50, 24))).astype(np.float32)
    dup = np.concatenate([img, img[:10]])  # images 50..59 duplicate images 0..9
    base = ranks_from_embeddings(img, txt, np.arange(50), block_size=8)[1]
    with_dup = ranks_from_embeddings(dup, txt, np.arange(50), block_size=8)[1]
    # a duplicate of the positive ties with it and must never be counted
    s = img.astype(np.float64) @ txt.T.astype(np.float64)
    extra = np.array([(s[:10, t] > s[t, t]).sum() for t in range(50)])
    np.testing.assert_array_equal(with_dup, base + extra)


@pytest.mark.parametrize("sizes", [(70, 150), (150, 70)])
@pytest.mark.parametrize("kw", [{"window_cap": 0}, {"error_factor": 0.0},
                                {"counting": "mask_sum"}, {"counting": "mask_sum", "window_cap": 0}])
def test_fallbacks_and_counting_modes_are_exact(kw, sizes, caplog):
    rng = np.random.default_rng(6)
    n, m = sizes
    if "error_factor" not in kw:  # integer scores: non-positives tie with positives, filling the window
        img, txt = int_embeddings(rng, n, 5), int_embeddings(rng, m, 5)
    else:  # float scores: the gathered and block products differ in the last bits
        img = rng.standard_normal((n, 40)).astype(np.float32)
        txt = rng.standard_normal((m, 40)).astype(np.float32)
    mapping = rng.integers(0, n, m)
    i, t, gt = prepare_inputs(img, txt, mapping)
    want = ranks_prepared(i, t, gt, 16)
    if "error_factor" not in kw:  # exact integer scores: the naive reference applies directly
        ref = naive_ranks(img.astype(np.float64) @ txt.astype(np.float64).T, dense(gt))
        np.testing.assert_array_equal(want[0], ref[0])
        np.testing.assert_array_equal(want[1], ref[1])
    with caplog.at_level(logging.INFO, logger="xmodal.eval.metrics"):
        got = ranks_prepared(i, t, gt, 16, **kw)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert ("second" in caplog.text) == (kw != {"counting": "mask_sum"})


def test_bf16_close_to_fp32_on_separated_data():
    rng = np.random.default_rng(7)
    img = rng.standard_normal((300, 64)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    mapping = np.repeat(np.arange(300), 2)
    txt = img[mapping] + 0.08 * rng.standard_normal((600, 64)).astype(np.float32)
    a = xmodal.evaluate_embeddings(img, txt, mapping)
    b = xmodal.evaluate_embeddings(img, txt, mapping, dtype="bf16", block_size=50)
    for k in METRIC_KEYS:
        assert b[k] == pytest.approx(a[k], abs=1.0 if k != "rsum" else 3.0), k
    # bf16 path is exact with respect to its own (bf16) scores
    ib = torch.from_numpy(img).bfloat16().float().numpy()
    tb = torch.from_numpy(txt).bfloat16()
    s = (torch.from_numpy(ib).bfloat16() @ tb.T).float().numpy()
    pos = np.zeros((300, 600), bool)
    pos[mapping, np.arange(600)] = True
    ref = naive_ranks(s, pos)
    got = ranks_from_embeddings(img, txt, mapping, dtype="bf16", block_size=300)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
    i, t, gt = prepare_inputs(img, txt, mapping, dtype="bf16")
    got = ranks_prepared(i, t, gt, 128, counting="mask_sum")  # the GPU counting path
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])


def test_torch_inputs_and_ground_truth():
    rng = np.random.default_rng(8)
    img, txt = int_embeddings(rng, 30, 5), int_embeddings(rng, 60, 5)
    mapping = np.arange(60) % 30
    gt = GroundTruth.from_map(mapping, 30)
    a = xmodal.evaluate_embeddings(torch.from_numpy(img), torch.from_numpy(txt), gt, device="cpu")
    b = xmodal.evaluate_embeddings(img.astype(np.float64), txt, torch.from_numpy(mapping))
    assert a == b
    assert all(type(v) is float for v in a.values())
    c = xmodal.evaluate_embeddings(img, txt, mapping, block_size=7, progress=True)  # rich bar path
    assert c == a


def test_metrics_from_ranks_formulas():
    m = metrics_from_ranks(np.array([0, 1, 4, 9, 10, -1]), np.array([0, 3]))
    assert m["i2t_r1"] == 20.0 and m["i2t_r5"] == 60.0 and m["i2t_r10"] == 80.0
    assert m["i2t_medr"] == 5.0 and m["i2t_meanr"] == pytest.approx(5.8)
    assert m["t2i_medr"] == 2.0  # floor(median 1.5) + 1
    assert m["t2i_meanr"] == 2.5
    assert m["rsum"] == pytest.approx(20 + 60 + 80 + 50 + 100 + 100)
    with pytest.raises(DataError):
        metrics_from_ranks(np.array([-1]), np.array([0]))


# ------------------------------------------------------------------------------------------
# pair scorers
# ------------------------------------------------------------------------------------------
def test_score_blocks_with_non_dividing_tiles():
    rng = np.random.default_rng(9)
    n, m = 37, 83
    a, b = rng.standard_normal((n, 6)), rng.standard_normal((m, 6))
    lists = [rng.choice(n, size=rng.integers(1, 3), replace=False).tolist() for _ in range(m)]

    def score_fn(si: slice, st: slice) -> torch.Tensor:  # a non-dot-product "pair scorer"
        d = torch.cdist(torch.from_numpy(a[si]), torch.from_numpy(b[st]))
        return -torch.round(d * 4)  # coarse: plenty of ties

    full = score_fn(slice(0, n), slice(0, m)).numpy()
    from xmodal.eval.metrics import as_ground_truth

    ref = naive_ranks(full, dense(as_ground_truth(lists, n, m)))
    for ib, tb, cache in ((5, 9, 1 << 30), (37, 83, 0), (10, 1, 0), (1, 100, 64)):
        got = ranks_from_score_blocks(score_fn, n, m, lists, ib, tb, cache_bytes=cache)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    got = ranks_from_scores(full, lists, block_size=11)
    np.testing.assert_array_equal(got[1], ref[1])


def test_score_blocks_rejects_nondeterministic_scorer():
    gen = torch.Generator().manual_seed(0)

    def noisy(si: slice, st: slice) -> torch.Tensor:
        return torch.rand(si.stop - si.start, st.stop - st.start, generator=gen)

    with pytest.raises(DataError, match="deterministic"):
        ranks_from_score_blocks(noisy, 10, 20, np.arange(20) % 10, 4, 4, cache_bytes=0)
    with pytest.raises(DataError, match="shape"):
        ranks_from_score_blocks(lambda si, st: torch.zeros(2, 2), 10, 20, np.arange(20) % 10, 4, 4)


# ------------------------------------------------------------------------------------------
# input errors
# ------------------------------------------------------------------------------------------
GOOD_I = np.ones((4, 3), np.float32)
GOOD_T = np.ones((6, 3), np.float32)
GOOD_M = np.array([0, 1, 2, 3, 0, 1])


@pytest.mark.parametrize("img,txt,mapping,match", [
    (np.ones((4, 2), np.float32), GOOD_T, GOOD_M, "3-d"),
    (np.where(np.eye(4, 3) > 0, np.nan, 1).astype(np.float32), GOOD_T, GOOD_M, "row 0 contains NaN"),
    (GOOD_I, np.full((6, 3), np.inf, np.float32), GOOD_M, "text embeddings: row 0"),
    (np.ones((0, 3), np.float32), GOOD_T, GOOD_M, "empty"),
    (GOOD_I, GOOD_T, np.array([0, 1, 2, 4, 0, 1]), "outside 0..3"),
    (GOOD_I, GOOD_T, np.array([0, 1, -1, 3, 0, 1]), "outside 0..3"),
    (GOOD_I, GOOD_T, GOOD_M[:5], "5 entries but there are 6 texts"),
    (np.ones((4, 3), np.int64), GOOD_T, GOOD_M, "floating-point"),
    (np.ones(4, np.float32), GOOD_T, GOOD_M, "2-D"),
    (GOOD_I, GOOD_T, GOOD_M.astype(float), "integer"),
    (GOOD_I, GOOD_T, GOOD_M.reshape(2, 3), "1-D"),
    (GOOD_I, GOOD_T, [[0], [1], [2], [3], [True], [1]], "not an integer"),
    (GOOD_I, GOOD_T, [[0], [1], [2], [3], [], [1]], "empty"),
    (GOOD_I, GOOD_T, [[0], [1.5], [2], [3], [0], [1]], "not an integer"),
    (np.full((4, 3), 1e39), GOOD_T, GOOD_M, None),
])
def test_input_errors(img, txt, mapping, match):
    dtype = "bf16" if match is None else None
    with pytest.raises(DataError, match=match or "overflows"):
        xmodal.evaluate_embeddings(img, txt, mapping, dtype=dtype)


def test_config_errors():
    with pytest.raises(ConfigError):
        xmodal.evaluate_embeddings(GOOD_I, GOOD_T, GOOD_M, block_size=0)
    with pytest.raises(ConfigError):
        xmodal.evaluate_embeddings(GOOD_I, GOOD_T, GOOD_M, dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            xmodal.evaluate_embeddings(GOOD_I, GOOD_T, GOOD_M, device="cuda")
    with pytest.raises(XmodalError, match="choose one of"):
        xmodal.evaluate_embeddings(GOOD_I, GOOD_T, GOOD_M, protocol="coco2k")


def test_rank1_changes_counts_and_exact_sign_test():
    """Won/lost at rank 1 by brute force over queries; p against an enumeration of every
    outcome of the discordant queries' fair coin flips."""
    import itertools

    from xmodal.eval.metrics import rank1_changes

    rng = np.random.default_rng(0)
    for _ in range(20):
        q = int(rng.integers(1, 30))
        a, b = rng.integers(-1, 3, q), rng.integers(-1, 3, q)
        won = sum(1 for x, y in zip(a, b) if x >= 0 and y >= 0 and x != 0 and y == 0)
        lost = sum(1 for x, y in zip(a, b) if x >= 0 and y >= 0 and x == 0 and y != 0)
        got = rank1_changes(a, b)
        assert (got["won"], got["lost"]) == (won, lost)
        n = won + lost
        if n > 14:
            continue
        # two-sided: outcomes whose split is at least as uneven as the observed one
        extreme = sum(1 for flips in itertools.product((0, 1), repeat=n)
                      if abs(2 * sum(flips) - n) >= abs(won - lost))
        assert got["p"] == pytest.approx(min(1.0, extreme / 2**n))
    # a clear win and no change
    assert rank1_changes(np.array([1] * 12), np.array([0] * 12))["p"] == pytest.approx(2 / 2**12)
    assert rank1_changes(np.array([0, 1]), np.array([0, 1])) == {"won": 0, "lost": 0, "p": 1.0}
    big = rank1_changes(np.ones(3000, int), np.zeros(3000, int))  # 2**3000 does not overflow
    assert big["won"] == 3000 and 0.0 <= big["p"] < 1e-300
    with pytest.raises(DataError, match="3 vs 2 queries"):
        rank1_changes(np.zeros(3), np.zeros(2))
