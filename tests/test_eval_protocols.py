"""Protocols: COCO 1K folds / 5K, Flickr30K 1K, Recipe1M 1k / 10k subsets."""
from __future__ import annotations

import numpy as np
import pytest

import xmodal
from xmodal.errors import DataError
from xmodal.eval.metrics import METRIC_KEYS, as_ground_truth
from xmodal.eval.protocols import evaluate_protocol, list_protocols, protocol_subsets

from test_eval_metrics import naive_metrics, naive_ranks


def int_data(rng, n, m, d=8):
    return (rng.integers(-3, 4, size=(n, d)).astype(np.float32),
            rng.integers(-3, 4, size=(m, d)).astype(np.float32))


def test_protocol_names():
    assert list_protocols() == ["coco1k", "coco5k", "f30k1k", "full", "recipe10k", "recipe1k"]


def test_coco1k_folds_against_naive_reference():
    rng = np.random.default_rng(0)
    n, m = 5000, 5000
    img, txt = int_data(rng, n, m)
    mapping = rng.permutation(n)  # one caption per image, in shuffled order
    lists = [[int(i)] for i in mapping]
    lists[0] = [int(mapping[0]), (int(mapping[0]) + 1500) % n]  # a text whose images span two folds
    got = xmodal.evaluate_embeddings(img, txt, lists, "coco1k")

    gt = as_ground_truth(lists, n, m)
    pos_all = gt.dense().T  # (N, M)
    folds = []
    for f in range(5):
        ims = np.arange(1000 * f, 1000 * f + 1000)
        texts = np.flatnonzero(pos_all[ims].any(0))
        s = img[ims].astype(np.float64) @ txt[texts].astype(np.float64).T
        folds.append(naive_metrics(*naive_ranks(s, pos_all[np.ix_(ims, texts)])))
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(np.mean([f[k] for f in folds]), abs=1e-9), k


def test_coco5k_uses_first_5000_images_and_their_texts(caplog):
    rng = np.random.default_rng(1)
    n = 5200
    img = rng.standard_normal((n, 16)).astype(np.float32)
    txt = rng.standard_normal((n, 16)).astype(np.float32)
    mapping = rng.permutation(n)
    got = evaluate_protocol(img, txt, mapping, "coco5k", block_size=1000)
    keep = np.flatnonzero(mapping < 5000)
    want = xmodal.evaluate_embeddings(img[:5000], txt[keep], mapping[keep], block_size=333)
    assert got.metrics == pytest.approx(want, abs=1e-9)
    assert "first 5000 of 5200" in caplog.text
    with pytest.raises(DataError, match="at least 5000 images"):
        xmodal.evaluate_embeddings(img[:4999], txt[:10], np.arange(10), "coco5k")
    with pytest.raises(DataError, match="at least 5000 images"):
        xmodal.evaluate_embeddings(img[:1000], txt[:10], np.arange(10), "coco1k")


def test_f30k1k_requires_exactly_1000_images():
    rng = np.random.default_rng(2)
    img, txt = int_data(rng, 1000, 3000)
    mapping = np.repeat(np.arange(1000), 3)
    assert xmodal.evaluate_embeddings(img, txt, mapping, "f30k1k") == xmodal.evaluate_embeddings(img, txt, mapping)
    with pytest.raises(DataError, match="1000 images, the data has 999"):
        xmodal.evaluate_embeddings(img[:999], txt[:2997], mapping[:2997], "f30k1k")


def test_recipe1k_subsets_are_seeded_and_averaged():
    rng = np.random.default_rng(3)
    n = 1500
    img, txt = int_data(rng, n, n, d=6)
    mapping = np.arange(n)
    gt = as_ground_truth(mapping, n, n)
    a = evaluate_protocol(img, txt, mapping, "recipe1k", seed=0)
    again = protocol_subsets("recipe1k", gt, seed=0)
    other = protocol_subsets("recipe1k", gt, seed=1)
    assert all(np.array_equal(x.texts, y.texts) for x, y in zip(a.subsets, again))
    assert not any(np.array_equal(x.texts, y.texts) for x, y in zip(a.subsets, other))
    assert len(a.per_subset) == 10
    # medR is the mean of the per-subset medians
    assert a.metrics["t2i_medr"] == pytest.approx(np.mean([r["t2i_medr"] for r in a.per_subset]))
    # the subsets are numpy default_rng(seed) draws of 1,000 texts with their images
    draw = np.random.default_rng(0)
    for k, (sub, res) in enumerate(zip(a.subsets, a.per_subset)):
        texts = np.sort(draw.choice(n, size=1000, replace=False))
        np.testing.assert_array_equal(sub.texts, texts)
        np.testing.assert_array_equal(sub.images, texts)  # one-to-one data
        if k >= 3:
            continue  # the naive reference is slow; three subsets make the point
        s = img[texts].astype(np.float64) @ txt[texts].astype(np.float64).T
        want = naive_metrics(*naive_ranks(s, np.eye(1000, dtype=bool)))
        assert res == pytest.approx(want, abs=1e-9)


def test_recipe_subset_with_multi_image_texts_and_size_errors():
    rng = np.random.default_rng(4)
    gt_lists = [[int(i), int(i) + 1] if i % 3 == 0 else [int(i)] for i in range(1200)]
    img, txt = int_data(rng, 1201, 1200)
    gt = as_ground_truth(gt_lists, 1201, 1200)
    res = evaluate_protocol(img, txt, gt_lists, "recipe1k", seed=5)
    for sub in res.subsets:
        want = np.unique([i for t in sub.texts for i in gt_lists[t]])
        np.testing.assert_array_equal(sub.images, want)
    sub = res.subsets[0]
    pos = gt.dense().T[np.ix_(sub.images, sub.texts)]
    s = img[sub.images].astype(np.float64) @ txt[sub.texts].astype(np.float64).T
    assert res.per_subset[0] == pytest.approx(naive_metrics(*naive_ranks(s, pos)), abs=1e-9)
    with pytest.raises(DataError, match="at least 10000 texts"):
        xmodal.evaluate_embeddings(img, txt, gt_lists, "recipe10k")
    with pytest.raises(DataError, match="at least 1000 texts"):
        xmodal.evaluate_embeddings(img, txt[:999], gt_lists[:999], "recipe1k")
