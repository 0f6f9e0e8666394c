"""Pair-scorer evaluation: exact block scoring and two-stage re-ranking vs naive references."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from xmodal.data.base import CrossModalDataset, GroundTruth
from xmodal.errors import ConfigError
from xmodal.eval.protocols import evaluate_embeddings
from xmodal.eval.metrics import metrics_from_ranks
from xmodal.eval.pairs import (concat_reps, evaluate_pair_scorer, exact_ranks, score_matrix_blocks, take_reps,
                               two_stage_ranks)
from xmodal.models.adapt import Adapt
from xmodal.models.base import PairScorer, TowerOutput


# ---------------------------------------------------------------------------------------
# helpers: naive references, toy scorers, splits
# ---------------------------------------------------------------------------------------
def naive_ranks(scores: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-query ranks from a full (N, M) matrix and an (N, M) positives mask, by loops."""
    n, m = scores.shape
    i2t = np.full(n, -1)
    for i in range(n):
        if pos[i].any():
            best = scores[i][pos[i]].max()
            i2t[i] = sum(1 for t in range(m) if not pos[i, t] and scores[i, t] > best)
    t2i = np.full(m, -1)
    for t in range(m):
        if pos[:, t].any():
            best = scores[:, t][pos[:, t]].max()
            t2i[t] = sum(1 for i in range(n) if not pos[i, t] and scores[i, t] > best)
    return i2t, t2i


class DotScorer(PairScorer):
    """A pair scorer that is secretly a dot product (so the embedding engine is a reference)."""

    def __init__(self, with_pairs: bool = True) -> None:
        super().__init__()
        self.calls = 0
        self.with_pairs = with_pairs  # False: exercise the per-image fallback

    def has_score_pairs(self) -> bool:
        return self.with_pairs

    def encode_image_reps(self, images):
        return images

    def encode_text_reps(self, texts):
        return texts

    def score(self, img, txt):
        self.calls += 1
        return img @ txt.T

    def score_pairs(self, img, txt, ii, tt):
        return (img[ii] * txt[tt]).sum(1)


def make_split(img_inputs, txt_inputs, gt: GroundTruth):
    n, m = gt.num_images, gt.num_texts
    ds = CrossModalDataset(name="toy", split="test", image_ids=[f"i{k}" for k in range(n)],
                           text_ids=[f"t{k}" for k in range(m)], captions=[f"c{k}" for k in range(m)], gt=gt)
    return SimpleNamespace(dataset=ds, images=lambda idx, device="cpu": take_reps(img_inputs, idx),
                           texts=lambda idx, device="cpu": take_reps(txt_inputs, idx))


def random_gt(n: int, m: int, rng: np.random.Generator) -> GroundTruth:
    lists = [[int(rng.integers(n))] for _ in range(m)]
    lists[0] = [0, 1]  # a text with two images
    return GroundTruth.from_map(lists, n)


def small_adapt(direction: str, dim: int = 8) -> Adapt:
    torch.manual_seed(0)
    model = Adapt(None, None, dim, direction=direction, fused="eager", chunk_mb=0.05).double().eval()
    with torch.no_grad():
        model.adapt.fc_gamma.weight.mul_(4)  # make the adaptation matter
    return model


def adapt_inputs(n: int, m: int, dim: int, rng: np.random.Generator):
    regions = torch.from_numpy(rng.standard_normal((n, 5, dim)))
    rmask = torch.ones(n, 5, dtype=torch.bool)
    rmask[2, 3:] = False
    words = torch.from_numpy(rng.standard_normal((m, 4, dim)))
    wmask = torch.ones(m, 4, dtype=torch.bool)
    wmask[1, 2:] = False
    return (TowerOutput(regions, regions.mean(1), rmask), TowerOutput(words, words.mean(1), wmask))


# ---------------------------------------------------------------------------------------
# exact evaluation
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_exact_metrics_equal_naive_full_matrix(direction):
    rng = np.random.default_rng(1)
    n, m, dim = 11, 26, 8
    gt = random_gt(n, m, rng)
    img_in, txt_in = adapt_inputs(n, m, dim, rng)
    model = small_adapt(direction, dim)
    split = make_split(img_in, txt_in, gt)
    res = evaluate_pair_scorer(model, split, block_size=4, text_block=7, batch_size=5, return_ranks=True)
    # naive: encode everything in one go, score pair by pair, rank by loops
    with torch.no_grad():
        ir, tr = model.encode_image_reps(img_in), model.encode_text_reps(txt_in)
        full = np.array([[float(model.score(take_reps(ir, slice(i, i + 1)), take_reps(tr, slice(t, t + 1))))
                          for t in range(m)] for i in range(n)])
    i2t, t2i = naive_ranks(full, gt.dense().T)
    np.testing.assert_array_equal(res["i2t_ranks"], i2t)
    np.testing.assert_array_equal(res["t2i_ranks"], t2i)
    assert res["metrics"] == pytest.approx(metrics_from_ranks(i2t, t2i))
    assert res["pairs_scored"] == n * m


def test_score_matrix_blocks_cover_the_matrix_once():
    rng = np.random.default_rng(2)
    img, txt = torch.randn(9, 4), torch.randn(13, 4)
    model = DotScorer()
    seen = torch.zeros(9, 13, dtype=torch.int64)
    full = torch.zeros(9, 13)
    for si, st, block in score_matrix_blocks(model, img, txt, image_block=4, text_block=5):
        seen[si, st] += 1
        full[si, st] = block
    assert bool((seen == 1).all())
    torch.testing.assert_close(full, img @ txt.T)
    del rng


def test_protocol_subsets_match_the_embedding_engine():
    """coco1k through the pair path (5 folds) equals the embedding engine on the same scores."""
    rng = np.random.default_rng(3)
    n = 5000
    gt = GroundTruth.from_map(np.arange(n), n)  # one caption per image
    img = torch.from_numpy(rng.standard_normal((n, 16)).astype(np.float32))
    txt = img + 0.9 * torch.from_numpy(rng.standard_normal((n, 16)).astype(np.float32))
    split = make_split(img, txt, gt)
    res = evaluate_pair_scorer(DotScorer(), split, protocol="coco1k", block_size=512, text_block=1024)
    ref = evaluate_embeddings(img, txt, gt, protocol="coco1k")
    assert len(res["per_subset"]) == 5
    assert res["metrics"] == pytest.approx(ref)
    assert res["pairs_scored"] == 5 * 1000 * 1000


# ---------------------------------------------------------------------------------------
# two-stage
# ---------------------------------------------------------------------------------------
FIRST = np.array([[0.9, 0.1, 0.8, 0.7],   # first-stage scores, images x texts
                  [0.5, 0.6, 0.2, 0.4],
                  [0.3, 0.2, 0.1, 0.05]])
RESCORED = np.array([[0.1, 0.5, 0.9, 0.2],  # pair-scorer scores
                     [0.3, 0.2, 0.8, 0.1],
                     [0.0, 0.9, 0.4, 0.7]])
HAND_GT = GroundTruth.from_map(np.array([0, 0, 1, 2]), 3)  # texts 0, 1 -> image 0; 2 -> 1; 3 -> 2


def test_two_stage_hand_built_case():
    calls = []

    def rescore(ii, tt):
        calls.extend(zip(ii.tolist(), tt.tolist()))
        return RESCORED[ii, tt]

    res = two_stage_ranks(np.eye(3), FIRST.T.copy(), rescore, HAND_GT, k=2)
    # image 0: shortlist {t0, t2}, re-scored t2 (0.9) > t0 (0.1) -> rank 1
    # image 1: shortlist {t1, t0}, positive t2 outside -> after t0, t1 and t3 (0.4 > 0.2) -> 3
    # image 2: shortlist {t0, t1}; t2 stays ahead of the positive t3 outside the shortlist
    #          (first-stage order 0.1 > 0.05) although t3 re-scores higher (0.7 > 0.4) -> 3
    np.testing.assert_array_equal(res["i2t_ranks"], [1, 3, 3])
    # text 0: {i0, i1}, i1 re-scores higher -> 1; text 1: {i1, i2}, i0 outside -> 2
    # text 2: {i0, i1}, i0 re-scores higher -> 1; text 3: {i0, i1}, i2 outside -> 2
    np.testing.assert_array_equal(res["t2i_ranks"], [1, 2, 1, 2])
    assert res["pairs_scored"] == 9
    assert len(calls) == len(set(calls)) == 9  # each shortlisted pair re-scored exactly once


def test_two_stage_with_k_all_is_exact():
    rng = np.random.default_rng(4)
    n, m, dim = 10, 23, 8
    gt = random_gt(n, m, rng)
    img_in, txt_in = adapt_inputs(n, m, dim, rng)
    model = small_adapt("t2i", dim)
    split = make_split(img_in, txt_in, gt)
    first = (rng.standard_normal((n, 3)), rng.standard_normal((m, 3)))  # a useless first stage
    exact = evaluate_pair_scorer(model, split, block_size=4, return_ranks=True)
    two = evaluate_pair_scorer(model, split, block_size=4, return_ranks=True, rerank_k=max(n, m), first_stage=first)
    np.testing.assert_array_equal(two["i2t_ranks"], exact["i2t_ranks"])
    np.testing.assert_array_equal(two["t2i_ranks"], exact["t2i_ranks"])
    assert two["metrics"] == exact["metrics"]
    assert two["pairs_scored"] == n * m


@pytest.mark.parametrize("with_pairs,fusion", [(True, 0.0), (False, 0.0), (True, 0.7)])
def test_two_stage_matches_a_naive_rerank(with_pairs, fusion):
    """Small k against a literal implementation: sort shortlist by re-score (+ fusion x
    first-stage score), append the rest."""
    rng = np.random.default_rng(5)
    n, m, k = 12, 30, 4
    gt = random_gt(n, m, rng)
    first_img, first_txt = rng.standard_normal((n, 6)), rng.standard_normal((m, 6))
    img, txt = torch.from_numpy(rng.standard_normal((n, 5))), torch.from_numpy(rng.standard_normal((m, 5)))
    split = make_split(img, txt, gt)
    res = evaluate_pair_scorer(DotScorer(with_pairs), split, rerank_k=k, first_stage=(first_img, first_txt),
                               block_size=5, return_ranks=True, rerank_fusion=fusion)
    f, r, pos = first_img @ first_txt.T, (img @ txt.T).numpy(), gt.dense().T

    def rerank(first_row, re_row, pos_row):
        order = np.argsort(-first_row, kind="stable")
        short = sorted(order[:k], key=lambda c: -(re_row[c] + fusion * first_row[c]))
        final = list(short) + list(order[k:])
        hits = [j for j, c in enumerate(final) if pos_row[c]]
        return -1 if not hits else sum(1 for c in final[:hits[0]] if not pos_row[c])

    i2t = [rerank(f[i], r[i], pos[i]) for i in range(n)]
    t2i = [rerank(f[:, t], r[:, t], pos[:, t]) for t in range(m)]
    np.testing.assert_array_equal(res["i2t_ranks"], i2t)
    np.testing.assert_array_equal(res["t2i_ranks"], t2i)


def test_two_stage_uses_the_models_first_stage():
    rng = np.random.default_rng(6)
    n, m, dim = 8, 17, 8
    gt = random_gt(n, m, rng)
    img_in, txt_in = adapt_inputs(n, m, dim, rng)
    split = make_split(img_in, txt_in, gt)
    res = evaluate_pair_scorer(small_adapt("i2t", dim), split, rerank_k=3)
    assert 0 < res["pairs_scored"] <= (n + m) * 3
    assert set(res["metrics"]) >= {"rsum", "i2t_r1", "t2i_r1"}
    with pytest.raises(ConfigError):
        evaluate_pair_scorer(DotScorer(), split, rerank_k=-1)
    for bad in (-1.0, float("nan"), "1"):
        with pytest.raises(ConfigError, match="rerank_fusion"):
            evaluate_pair_scorer(DotScorer(), split, rerank_k=3, first_stage=(np.eye(n), np.ones((m, n))),
                                 rerank_fusion=bad)


# ---------------------------------------------------------------------------------------
# representation plumbing
# ---------------------------------------------------------------------------------------
def test_concat_reps_pads_ragged_tokens():
    a = TowerOutput(torch.ones(2, 3, 4), torch.ones(2, 4), None)
    b = TowerOutput(torch.full((1, 5, 4), 2.0), torch.full((1, 4), 2.0),
                    torch.tensor([[True, True, True, True, False]]))
    out = concat_reps([a, b])
    assert out.tokens.shape == (3, 5, 4)
    assert out.mask.tolist() == [[True] * 3 + [False] * 2] * 2 + [[True] * 4 + [False]]
    assert float(out.tokens[0, 3:].abs().sum()) == 0.0
    pair = concat_reps([(a, a.pooled), (b, b.pooled)])
    assert pair[1].shape == (3, 4)
    picked = take_reps(out, np.array([2, 0]))
    assert picked.tokens.shape == (2, 5, 4) and picked.mask[0].tolist() == [True] * 4 + [False]


def test_exact_ranks_accepts_ground_truth_directly():
    rng = np.random.default_rng(7)
    img, txt = torch.randn(6, 3), torch.randn(9, 3)
    gt = random_gt(6, 9, rng)
    i2t, t2i = exact_ranks(DotScorer(), img, txt, gt, image_block=4, text_block=4)
    ref = naive_ranks((img @ txt.T).numpy(), gt.dense().T)
    np.testing.assert_array_equal(i2t, ref[0])
    np.testing.assert_array_equal(t2i, ref[1])
