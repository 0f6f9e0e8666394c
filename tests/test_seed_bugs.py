"""Known bugs in the seeds' evaluators, and xmodal getting those cases right.

Each test reimplements the buggy formula as published (sources named in each docstring),
builds a case where it returns a wrong number, and checks that xmodal returns the right one
(computed independently by the naive reference of ``test_eval_metrics``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import xmodal
from xmodal.eval.metrics import metrics_from_ranks, ranks_from_scores

from test_eval_metrics import naive_metrics, naive_ranks


# ------------------------------------------------------------------------------------------
# (a) UNITER / IAIS itm_eval: `(rank_txt == gt).nonzero()` keeps row indices as "ranks"
# ------------------------------------------------------------------------------------------
def uniter_image_retrieval(score_matrix: torch.Tensor, gt_img: torch.Tensor) -> dict[str, float]:
    """ChenRocks/UNITER and lancopku/IAIS ``utils/itm_eval.py::itm_eval`` (image retrieval):
    ``rank = (rank_txt == gt_img_j).nonzero()`` returns ``(row, col)`` pairs, and both the
    text's row index and the hit column are compared with K."""
    _, rank_txt = score_matrix.topk(10, dim=1)  # (texts, 10)
    gt_img_j = gt_img.unsqueeze(1).expand_as(rank_txt)
    rank = (rank_txt == gt_img_j).nonzero()
    n = len(gt_img)
    return {"r1": (rank < 1).sum().item() / n, "r5": (rank < 5).sum().item() / n,
            "r10": (rank < 10).sum().item() / n}


def test_uniter_counts_row_indices_as_hits():
    n_img = 12
    # text t's gold image sits at position 2, 0 and 7 of its ranking
    scores = torch.arange(n_img, 0, -1, dtype=torch.float32).repeat(3, 1)  # (3 texts, 12 images)
    gold_pos = [2, 0, 7]
    gt_img = torch.tensor(gold_pos)  # image j has score 12 - j, so image j is at position j
    buggy = uniter_image_retrieval(scores, gt_img)
    assert buggy["r1"] == pytest.approx(2 / 3)  # true: 1/3 (only text 1 hits at 1)
    assert buggy["r5"] == pytest.approx(5 / 3)  # more than 100 %

    i2t, t2i = ranks_from_scores(scores.T.numpy(), gt_img.numpy())  # xmodal: images x texts
    assert t2i.tolist() == gold_pos
    m = metrics_from_ranks(i2t, t2i)
    assert m["t2i_r1"] == pytest.approx(100 / 3) and m["t2i_r5"] == pytest.approx(200 / 3)
    assert m["t2i_r10"] == 100.0


# ------------------------------------------------------------------------------------------
# (b) Vokenization batchwise_recall: kthvalue(B - K) makes R@K really R@(K+1)
# ------------------------------------------------------------------------------------------
def vokenization_recall(lang: torch.Tensor, visn: torch.Tensor, recalls=(1, 5)) -> dict[int, float]:
    """airsplay/vokenization ``xmatching/metric.py::batchwise_recall`` (also jokieleung/Maria):
    ``kthvalue(negative_scores, batch_size - recall, dim=1)`` is the (K+1)-th largest score,
    and ``positive >= kth`` then accepts a positive ranked K+1."""
    b, length, dim = lang.shape
    visn = visn.unsqueeze(1)  # (B, 1, D)
    positive = (lang * visn).sum(-1)  # (B, L)
    negative = (lang.reshape(b, 1, length, dim) * visn.reshape(1, b, 1, dim)).sum(-1)  # (B, B, L)
    out = {}
    for k in recalls:
        kth, _ = torch.kthvalue(negative, b - k, dim=1)
        out[k] = (positive >= kth).float().mean().item()
    return out


def test_vokenization_recall_at_k_is_recall_at_k_plus_1():
    # every text's own image is second best: true R@1 = 0, the buggy R@1 = 100 %
    b = 6
    visn = torch.eye(b)
    lang = (0.6 * torch.eye(b) + 1.0 * torch.roll(torch.eye(b), 1, dims=1)).unsqueeze(1)  # (B, 1, B)
    assert vokenization_recall(lang, visn, (1,))[1] == 1.0
    m = xmodal.evaluate_embeddings(visn.numpy(), lang[:, 0].numpy(), np.arange(b))
    assert m["t2i_r1"] == 0.0

    rng = torch.Generator().manual_seed(0)
    b = 64
    visn = torch.randn(b, 16, generator=rng)
    lang = (visn + 1.5 * torch.randn(b, 16, generator=rng)).unsqueeze(1)
    buggy = vokenization_recall(lang, visn)
    _, t2i = xmodal.eval.ranks_from_embeddings(visn.numpy(), lang[:, 0].numpy(), np.arange(b))
    for k in (1, 5):
        assert buggy[k] == pytest.approx(np.mean(t2i < k + 1))  # it measures R@(K+1)
        assert buggy[k] != pytest.approx(np.mean(t2i < k))


# ------------------------------------------------------------------------------------------
# (c) ADAPT (retrieval.pytorch) i2t / t2i: caption c belongs to image c // 5
# ------------------------------------------------------------------------------------------
def adapt_i2t_t2i(sims: np.ndarray) -> dict[str, float]:
    """jwehrmann/retrieval.pytorch ``retrieval/train/evaluation.py`` ``i2t``/``t2i``:
    ``captions_per_image = ncaps // npts`` and captions ``[5 i, 5 i + 5)`` are image ``i``'s."""
    npts, ncaps = sims.shape
    cpi = ncaps // npts
    i2t = np.zeros(npts)
    for index in range(npts):
        inds = np.argsort(sims[index])[::-1]
        i2t[index] = min(np.where(inds == i)[0][0] for i in range(cpi * index, cpi * index + cpi))
    t2i = np.zeros(cpi * npts)
    for index in range(npts):
        for i in range(cpi):
            inds = np.argsort(sims.T[cpi * index + i])[::-1]
            t2i[cpi * index + i] = np.where(inds == index)[0][0]
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * len(np.where(r < k)[0]) / len(r)
        out[f"{name}_medr"] = np.floor(np.median(r)) + 1
        out[f"{name}_meanr"] = r.mean() + 1
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in (1, 5, 10))
    return out


def test_adapt_assumes_caption_order():
    rng = np.random.default_rng(0)
    n = 40
    img = rng.standard_normal((n, 16)).astype(np.float32)
    ordered = np.repeat(np.arange(n), 5)
    caps = (img[ordered] + 0.8 * rng.standard_normal((5 * n, 16))).astype(np.float32)
    truth = adapt_i2t_t2i(img.astype(np.float64) @ caps.T.astype(np.float64))  # right when ordered

    perm = rng.permutation(5 * n)  # the same captions, stored in another order
    shuffled_caps, shuffled_map = caps[perm], ordered[perm]
    buggy = adapt_i2t_t2i(img.astype(np.float64) @ shuffled_caps.T.astype(np.float64))
    assert buggy["rsum"] < truth["rsum"] - 100  # nonsense: positives taken by position

    ours = xmodal.evaluate_embeddings(img, shuffled_caps, shuffled_map)
    for k, v in truth.items():
        assert ours[k] == pytest.approx(v), k


# ------------------------------------------------------------------------------------------
# (d) OpenCLIP get_clip_metrics: ground truth = arange, one caption per image
# ------------------------------------------------------------------------------------------
def openclip_metrics(image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, float]:
    """mlfoundations/open_clip ``open_clip_train/train.py::get_clip_metrics``: row ``i`` of
    ``image_features`` is the one positive of text ``i`` (``torch.arange`` ground truth), so a
    dataset with 5 captions per image repeats each image 5 times and the other 4 captions and
    the 4 copies count as negatives."""
    logits_per_image = image_features @ text_features.t()
    logits = {"image_to_text": logits_per_image, "text_to_image": logits_per_image.t()}
    ground_truth = torch.arange(len(text_features)).view(-1, 1)
    out = {}
    for name, logit in logits.items():
        ranking = torch.argsort(logit, descending=True)
        preds = torch.where(ranking == ground_truth)[1].numpy()
        out[f"{name}_R@1"] = float(np.mean(preds < 1))
        out[f"{name}_median_rank"] = float(np.floor(np.median(preds)) + 1)
    return out


def test_openclip_assumes_one_caption_per_image():
    rng = np.random.default_rng(1)
    n = 50
    img = rng.standard_normal((n, 32)).astype(np.float32)
    mapping = np.repeat(np.arange(n), 5)
    caps = (img[mapping] + 0.5 * rng.standard_normal((5 * n, 32))).astype(np.float32)
    buggy = openclip_metrics(torch.from_numpy(img[mapping]), torch.from_numpy(caps))

    ours = xmodal.evaluate_embeddings(img, caps, mapping)
    pos = np.zeros((n, 5 * n), bool)
    pos[mapping, np.arange(5 * n)] = True
    truth = naive_metrics(*naive_ranks(img.astype(np.float64) @ caps.T.astype(np.float64), pos))
    assert ours == pytest.approx(truth)
    assert truth["i2t_r1"] == 100.0  # every image's best caption is one of its own
    # the arange ground truth wants one particular caption of the five
    assert buggy["image_to_text_R@1"] * 100 < truth["i2t_r1"] - 50
    assert buggy["image_to_text_median_rank"] > truth["i2t_medr"]
