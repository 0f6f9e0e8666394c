"""Evaluation of pair scorers (ADAPT, alignment heads, cross-encoders).

A pair scorer needs both sides at once, so nothing can be indexed; two ways to rank:

- **Exact**: every item is encoded once (:func:`encode_reps`: regions, word features,
  small next to the score work), then the full ``N x M`` score matrix is computed tile by
  tile (``model.score`` on ``image_block x text_block``; the model bounds its own working
  memory inside a tile) and streamed into the exact rank engine
  (:func:`xmodal.eval.metrics.ranks_from_score_blocks`). No matrix beyond a tile is held.
- **Two-stage** (:func:`two_stage_ranks`): a first-stage *embedding* scorer shortlists the
  top ``k`` candidates of every query, in both directions, blockwise with ``topk``; the pair
  scorer re-scores only the shortlisted pairs (each distinct pair once, even when both
  directions shortlist it); candidates outside a shortlist keep their first-stage order
  after it. This is the usual "retrieve then re-rank" deployment; with ``k`` at least the
  number of candidates it is exact.

Rank semantics are the engine's: a query's rank counts the non-positive candidates placed
strictly before its best-placed positive.
"""
from __future__ import annotations

import logging
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..data.base import GroundTruth
from ..progress import make_progress
from ..errors import ConfigError, DataError
from ..models.base import PairScorer, TowerOutput

log = logging.getLogger(__name__)

#: Captions per tile of exact scoring (images per tile come from ``block_size``).
DEFAULT_TEXT_BLOCK = 1024
#: Pairs per call when re-scoring a shortlist.
RESCORE_CHUNK = 65536

RescoreFn = Callable[[np.ndarray, np.ndarray], Any]


# ------------------------------------------------------------------------------------------
# representations: encode once, concatenate, index
# ------------------------------------------------------------------------------------------
def _pad_dim1(t: torch.Tensor, length: int, value: Any) -> torch.Tensor:
    if t.dim() < 2 or t.shape[1] == length:
        return t
    pad = t.new_full((t.shape[0], length - t.shape[1], *t.shape[2:]), value)
    return torch.cat([t, pad], dim=1)


def concat_reps(parts: list[Any]) -> Any:
    """Concatenate per-batch representations along the item axis.

    Handles :class:`TowerOutput` (token axes padded to the longest batch, with a mask),
    tensors, and tuples / lists / dicts of those (e.g. an ensemble's per-member reps).
    """
    if not parts:
        raise DataError("no representations to concatenate (empty split?)")
    first = parts[0]
    if isinstance(first, TowerOutput):
        length = max(p.tokens.shape[1] for p in parts)
        ragged = any(p.tokens.shape[1] != length for p in parts)
        tokens = torch.cat([_pad_dim1(p.tokens, length, 0) for p in parts])  # (N, L, D)
        pooled = torch.cat([p.pooled for p in parts]) if first.pooled is not None else None
        mask = None
        if ragged or any(p.mask is not None for p in parts):
            masks = [p.mask if p.mask is not None else
                     torch.ones(p.tokens.shape[:2], dtype=torch.bool, device=p.tokens.device) for p in parts]
            mask = torch.cat([_pad_dim1(m, length, False) for m in masks])  # (N, L)
        return TowerOutput(tokens=tokens, pooled=pooled, mask=mask)
    if isinstance(first, torch.Tensor):
        if first.dim() >= 2 and len({p.shape[1] for p in parts}) > 1:
            length = max(p.shape[1] for p in parts)
            return torch.cat([_pad_dim1(p, length, False if p.dtype == torch.bool else 0) for p in parts])
        return torch.cat(parts)
    if isinstance(first, (tuple, list)):
        return type(first)(concat_reps([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: concat_reps([p[k] for p in parts]) for k in first}
    if first is None:
        return None
    raise TypeError(f"cannot concatenate representations of type {type(first).__name__}")


def take_reps(reps: Any, idx: slice | torch.Tensor | np.ndarray) -> Any:
    """Items ``idx`` (a slice, or integer indices) of a representation structure."""
    if isinstance(idx, np.ndarray):
        idx = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
    if isinstance(reps, TowerOutput):
        return TowerOutput(tokens=take_reps(reps.tokens, idx), pooled=take_reps(reps.pooled, idx),
                           mask=take_reps(reps.mask, idx))
    if isinstance(reps, torch.Tensor):
        return reps[idx] if isinstance(idx, slice) else reps.index_select(0, idx.to(reps.device))
    if isinstance(reps, (tuple, list)):
        return type(reps)(take_reps(r, idx) for r in reps)
    if isinstance(reps, dict):
        return {k: take_reps(v, idx) for k, v in reps.items()}
    if reps is None:
        return None
    raise TypeError(f"cannot index representations of type {type(reps).__name__}")


def _detach(reps: Any, device: torch.device | str) -> Any:
    if isinstance(reps, TowerOutput):
        return TowerOutput(*(_detach(t, device) for t in (reps.tokens, reps.pooled, reps.mask)))
    if isinstance(reps, torch.Tensor):
        return reps.detach().to(device)
    if isinstance(reps, (tuple, list)):
        return type(reps)(_detach(r, device) for r in reps)
    if isinstance(reps, dict):
        return {k: _detach(v, device) for k, v in reps.items()}
    return reps


def _progress(enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return nullcontext(None)
    return make_progress(transient=True)


@torch.inference_mode()
def encode_reps(fn: Callable[[Any], Any], inputs: Callable[[np.ndarray, Any], Any], n: int, *,
                batch_size: int = 256, description: str = "encoding", progress: bool | None = False,
                device: str | torch.device = "cpu") -> Any:
    """``fn(inputs(idx, device))`` over items ``0..n-1`` in batches, concatenated."""
    if n < 1:
        raise DataError(f"{description}: nothing to encode")
    parts = []
    with _progress(progress) as bar:
        task = bar.add_task(description, total=n) if bar else None
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(n, start + batch_size))
            parts.append(_detach(fn(inputs(idx, device)), device))
            if bar:
                bar.advance(task, len(idx))
    return concat_reps(parts)


# ------------------------------------------------------------------------------------------
# exact scoring
# ------------------------------------------------------------------------------------------
def _num_items(reps: Any) -> int:
    if isinstance(reps, TowerOutput):
        return int(reps.tokens.shape[0])
    if isinstance(reps, torch.Tensor):
        return int(reps.shape[0])
    if isinstance(reps, (tuple, list)) and reps:
        return _num_items(reps[0])
    if isinstance(reps, dict) and reps:
        return _num_items(next(iter(reps.values())))
    raise TypeError(f"cannot count items of {type(reps).__name__}")


def tile_score_fn(model: Any, image_reps: Any, text_reps: Any) -> Callable[[slice, slice], torch.Tensor]:
    """``fn(img_slice, txt_slice) -> (bi, bt)`` scores from ``model.score`` (no grad)."""
    def fn(si: slice, st: slice) -> torch.Tensor:
        with torch.inference_mode():
            return model.score(take_reps(image_reps, si), take_reps(text_reps, st))

    return fn


def score_matrix_blocks(model: Any, image_reps: Any, text_reps: Any, *, image_block: int = 256,
                        text_block: int = DEFAULT_TEXT_BLOCK) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """Yield ``(img_slice, txt_slice, scores)`` tiles covering the full ``N x M`` matrix.

    Memory is one tile; the model vectorises all pairs of a tile (no per-caption loop).
    """
    n, m = _num_items(image_reps), _num_items(text_reps)
    fn = tile_score_fn(model, image_reps, text_reps)
    for i0 in range(0, n, image_block):
        si = slice(i0, min(n, i0 + image_block))
        for t0 in range(0, m, text_block):
            st = slice(t0, min(m, t0 + text_block))
            yield si, st, fn(si, st)


def exact_ranks(model: Any, image_reps: Any, text_reps: Any, gt: GroundTruth, *, image_block: int = 256,
                text_block: int = DEFAULT_TEXT_BLOCK, progress: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-query ranks ``(i2t (N,), t2i (M,))`` from block scores of a pair scorer."""
    from .metrics import ranks_from_score_blocks

    n, m = _num_items(image_reps), _num_items(text_reps)
    # a tile holding positives is scored once and cached for the counting phase
    cache = 8 * min(n, image_block) * min(m, text_block) * max(1, _positive_tiles(gt, image_block, text_block))
    return ranks_from_score_blocks(tile_score_fn(model, image_reps, text_reps), n, m, gt,
                                   image_block=image_block, text_block=text_block, progress=progress,
                                   cache_bytes=min(cache, 1 << 30))


def _positive_tiles(gt: GroundTruth, ib: int, tb: int) -> int:
    t, i = gt.pairs()
    return len(np.unique((i // ib) * ((gt.num_texts + tb - 1) // tb) + t // tb))


# ------------------------------------------------------------------------------------------
# two-stage: first-stage shortlists, re-scored by the pair scorer
# ------------------------------------------------------------------------------------------
def _as_float_tensor(x: Any, name: str) -> torch.Tensor:
    from .metrics import check_embeddings

    check_embeddings(x, name)
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    t = t.float().contiguous()
    bad = ~torch.isfinite(t).all(1)
    if bool(bad.any()):  # finite float64 values beyond float32's range
        raise DataError(f"{name}: row {int(torch.nonzero(bad)[0])} overflows float32 (values too large)")
    return t


def shortlist(queries: torch.Tensor, candidates: torch.Tensor, rel: GroundTruth, k: int, *,
              block_size: int = 1024,
              names: tuple[str, str] = ("queries", "candidates")) -> dict[str, torch.Tensor]:
    """First-stage shortlists of every query, computed over query blocks.

    ``rel`` maps queries to their positive candidates (CSR, ``rel.num_images`` = number of
    candidates). Returns ``idx``/``vals`` (Q, k) top candidates by dot product (descending),
    ``pos`` (Q, k) whether each is a positive, ``thr`` (Q,) best positive first-stage score
    (-inf without positives) and ``rank`` (Q,) the first-stage rank (candidates scoring
    strictly above ``thr``; only computed, and only needed, for queries without a positive
    in their shortlist, else -1). Memory: one ``block_size x candidates`` score block. A
    non-finite score (inputs so large the product overflows) is a :class:`DataError` naming
    both rows by ``names``.
    """
    from .metrics import pair_label, score_checker

    check = score_checker(queries, candidates, lambda r, c_: pair_label((names[0], None), r, (names[1], None), c_))
    q, c = queries.shape[0], candidates.shape[0]
    k = min(int(k), c)
    out = {"idx": torch.empty(q, k, dtype=torch.long), "vals": torch.empty(q, k),
           "pos": torch.empty(q, k, dtype=torch.bool), "thr": torch.empty(q),
           "rank": torch.full((q,), -1, dtype=torch.long)}
    for a in range(0, q, block_size):
        b = min(q, a + block_size)
        s = queries[a:b] @ candidates.T  # (bq, C)
        if check is not None:
            check(s, a)
        lo, hi = int(rel.indptr[a]), int(rel.indptr[b])
        rows = torch.from_numpy(np.repeat(np.arange(b - a), np.diff(rel.indptr[a:b + 1]))).to(s.device)
        cols = torch.from_numpy(rel.indices[lo:hi]).to(s.device)
        thr = torch.full((b - a,), float("-inf"), dtype=s.dtype, device=s.device)
        thr.scatter_reduce_(0, rows, s[rows, cols], "amax")  # best positive score per query
        vals, idx = s.topk(k, dim=1)
        pos = torch.isin(torch.arange(b - a, device=s.device)[:, None] * c + idx, rows * c + cols)  # (bq, k)
        missing = torch.nonzero(~pos.any(1) & torch.isfinite(thr)).squeeze(1)
        if len(missing):  # no positive is a strictly-higher candidate, so no positive is counted
            out["rank"][a + missing.cpu()] = (s[missing] > thr[missing, None]).sum(1).cpu()
        for key, value in (("vals", vals), ("idx", idx), ("pos", pos), ("thr", thr)):
            out[key][a:b] = value.cpu()
    return out


def _final_ranks(sl: dict[str, torch.Tensor], rescored: torch.Tensor) -> np.ndarray:
    """Ranks after re-ranking a shortlist: re-scored shortlist first, then first-stage order."""
    pos, k = sl["pos"], sl["pos"].shape[1]
    best = rescored.masked_fill(~pos, float("-inf")).amax(1)  # (Q,)
    inside = ((rescored > best[:, None]) & ~pos).sum(1)
    # no positive shortlisted: all k shortlisted candidates, then the first-stage competitors
    # outside the shortlist (non-positives strictly above the best positive)
    outside = k + sl["rank"] - (sl["vals"] > sl["thr"][:, None]).sum(1)
    ranks = torch.where(pos.any(1), inside, outside)
    ranks[torch.isinf(sl["thr"])] = -1
    return ranks.numpy().astype(np.int64)


def two_stage_ranks(first_img_emb: Any, first_txt_emb: Any, rescore_fn: RescoreFn, gt: GroundTruth, k: int, *,
                    block_size: int = 1024, chunk: int = RESCORE_CHUNK,
                    progress: bool | None = None, fusion: float = 0.0) -> dict[str, Any]:
    """Ranks of a re-ranked first stage, both directions.

    ``first_img_emb`` (N, D) / ``first_txt_emb`` (M, D): first-stage embeddings (scored by
    dot product; normalise them for cosine). ``rescore_fn(image_idx, text_idx)`` returns
    the pair scorer's scores of the listed pairs. Each image shortlists its top ``k`` texts
    and each text its top ``k`` images; the union of the shortlisted pairs is re-scored once.
    ``fusion = w`` orders the shortlist by ``pair score + w * first-stage score`` (BLIP adds
    its ITC similarity to its ITM score this way); ``0`` orders by the pair score alone.
    Returns ``{"i2t_ranks", "t2i_ranks", "pairs_scored"}``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"rerank_k: expected a positive integer, got {k!r}")
    fusion = check_fusion(fusion)
    img = _as_float_tensor(first_img_emb, "first-stage image embeddings")
    txt = _as_float_tensor(first_txt_emb, "first-stage text embeddings")
    n, m = img.shape[0], txt.shape[0]
    if img.shape[1] != txt.shape[1]:
        raise DataError(f"first-stage image embeddings are {img.shape[1]}-d but text embeddings {txt.shape[1]}-d")
    if gt.num_images != n or gt.num_texts != m:
        raise DataError(f"ground truth is {gt.num_texts} texts x {gt.num_images} images, first-stage "
                        f"embeddings are {m} texts x {n} images")
    names = ("first-stage image embeddings", "first-stage text embeddings")
    i2t = shortlist(img, txt, gt.transpose(), k, block_size=block_size, names=names)  # images -> texts
    t2i = shortlist(txt, img, gt, k, block_size=block_size, names=names[::-1])  # texts -> images
    keys_i2t = torch.arange(n)[:, None] * m + i2t["idx"]  # (N, k1) pair key image * M + text
    keys_t2i = t2i["idx"] * m + torch.arange(m)[:, None]  # (M, k2)
    keys, inverse = torch.unique(torch.cat([keys_i2t.ravel(), keys_t2i.ravel()]), return_inverse=True)
    keys, inverse = keys.numpy(), inverse.numpy()  # sorted: pairs of one image are contiguous
    scores = np.empty(len(keys), dtype=np.float64)
    with _progress(progress) as bar:
        task = bar.add_task(f"re-scoring {len(keys)} pairs", total=len(keys)) if bar else None
        for s in range(0, len(keys), chunk):
            kk = keys[s:s + chunk]
            out = rescore_fn(kk // m, kk % m)
            out = out.detach().cpu().double().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float64)
            if out.shape != kk.shape:
                raise DataError(f"re-scoring returned shape {out.shape} for {len(kk)} pairs")
            scores[s:s + len(kk)] = out
            if bar:
                bar.advance(task, len(kk))
    if not np.all(np.isfinite(scores)):
        raise DataError("re-scoring returned NaN or inf")
    split = keys_i2t.numel()
    r_i2t = torch.from_numpy(scores[inverse[:split]]).view(keys_i2t.shape)
    r_t2i = torch.from_numpy(scores[inverse[split:]]).view(keys_t2i.shape)
    if fusion:
        r_i2t = fuse_scores(r_i2t, i2t["vals"], fusion)
        r_t2i = fuse_scores(r_t2i, t2i["vals"], fusion)
        if not (bool(torch.isfinite(r_i2t).all()) and bool(torch.isfinite(r_t2i).all())):
            raise DataError(f"fused scores (pair score + {fusion:g} x first-stage score) are not finite: "
                            "the scores or the fusion weight are too large")
    return {"i2t_ranks": _final_ranks(i2t, r_i2t), "t2i_ranks": _final_ranks(t2i, r_t2i),
            "pairs_scored": int(len(keys))}


def fuse_scores(pair_scores: Any, first_scores: Any, fusion: float) -> Any:
    """The fused two-stage order's scores: ``pair + fusion * first``, in float64 (BLIP-style).

    Torch tensors in, a float64 tensor out; anything else, a float64 array. Evaluation and
    search both order by this one formula."""
    if isinstance(pair_scores, torch.Tensor):
        return pair_scores.double() + fusion * torch.as_tensor(first_scores).to(pair_scores.device).double()
    return np.asarray(pair_scores, dtype=np.float64) + fusion * np.asarray(first_scores, dtype=np.float64)


def check_fusion(w: Any, name: str = "rerank_fusion") -> float:
    """A finite, non-negative weight of the first-stage score in a re-ranked order."""
    if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)) or not np.isfinite(w) or w < 0:
        raise ConfigError(f"{name}: expected a finite number >= 0 (weight of the first-stage score), got {w!r}")
    return float(w)


def pair_rescore_fn(model: Any, image_reps: Any, text_reps: Any) -> RescoreFn:
    """``fn(image_idx, text_idx) -> scores`` for listed pairs.

    Uses ``model.score_pairs`` when the model has it (one vectorised call per chunk);
    otherwise scores, per image, the block of its listed texts with ``model.score``.
    """
    def vectorised(ii: np.ndarray, tt: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return model.score_pairs(image_reps, text_reps, torch.from_numpy(ii), torch.from_numpy(tt))

    def per_image(ii: np.ndarray, tt: np.ndarray) -> np.ndarray:
        out = np.empty(len(ii), dtype=np.float64)
        order = np.argsort(ii, kind="stable")
        bounds = np.flatnonzero(np.diff(ii[order])) + 1
        with torch.inference_mode():
            for grp in np.split(order, bounds):
                s = model.score(take_reps(image_reps, ii[grp[:1]]), take_reps(text_reps, tt[grp]))  # (1, n)
                out[grp] = s[0].double().cpu().numpy()
        return out

    return vectorised if isinstance(model, PairScorer) and model.has_score_pairs() else per_image


# ------------------------------------------------------------------------------------------
# the entry point used by xmodal.eval.encode.evaluate_split
# ------------------------------------------------------------------------------------------
def evaluate_pair_scorer(model: Any, split: Any, *, protocol: str = "full", block_size: int = 256,
                         batch_size: int = 256, progress: bool | None = False,
                         device: str | torch.device = "cpu", return_ranks: bool = False, rerank_k: int = 0,
                         text_block: int = DEFAULT_TEXT_BLOCK, first_stage: tuple[Any, Any] | None = None,
                         seed: int = 0, rerank_fusion: float = 0.0) -> dict:
    """Metrics of a pair scorer on a prepared split (``.dataset``, ``.images``, ``.texts``).

    ``rerank_k = 0``: exact, the full score matrix in ``block_size x text_block`` tiles.
    ``rerank_k > 0``: two-stage; the first stage is ``first_stage = (image_emb, text_emb)``
    over the split's items, or else the model's ``first_stage_embeddings(img_reps, txt_reps)``;
    ``rerank_fusion = w`` adds ``w`` x the first-stage score to the pair score (see
    :func:`two_stage_ranks`). Every protocol subset is evaluated independently and averaged, as for embeddings.
    Returns ``{"metrics", "per_subset", "pairs_scored"}`` plus ``i2t_ranks`` / ``t2i_ranks``
    (every subset's ranks, concatenated) when ``return_ranks``.
    """
    from .metrics import check_block_size, metrics_from_ranks
    from .protocols import average_metrics, protocol_subsets

    block_size = check_block_size(block_size)
    text_block = check_block_size(text_block)
    if isinstance(rerank_k, bool) or not isinstance(rerank_k, (int, np.integer)) or rerank_k < 0:
        raise ConfigError(f"eval.rerank_k: expected a non-negative integer, got {rerank_k!r}")
    ds = split.dataset
    gt = ds.gt
    subsets = protocol_subsets(protocol, gt, seed=seed)
    t0 = time.perf_counter()
    img_reps = encode_reps(model.encode_image_reps, split.images, ds.num_images, batch_size=batch_size,
                           description="encoding images", progress=progress, device=device)
    txt_reps = encode_reps(model.encode_text_reps, split.texts, ds.num_texts, batch_size=batch_size,
                           description="encoding texts", progress=progress, device=device)
    t_encode = time.perf_counter() - t0
    first = None
    if rerank_k:
        if first_stage is not None:
            first = (_as_float_tensor(first_stage[0], "first-stage image embeddings"),
                     _as_float_tensor(first_stage[1], "first-stage text embeddings"))
        else:
            with torch.inference_mode():
                built_in = model.first_stage_embeddings(img_reps, txt_reps)
            if built_in is not None:
                first = tuple(e.float().cpu() for e in built_in)
        if first is None:
            raise ConfigError(f"eval.rerank_k={rerank_k}: {type(model).__name__} has no first stage; pass "
                              "first-stage embeddings (xmodal eval --first-stage RUN, or model.args.first_stage: "
                              "RUN where the model takes one) or use rerank_k: 0")
        if first[0].shape[0] != ds.num_images or first[1].shape[0] != ds.num_texts:
            raise DataError(f"first-stage embeddings are {first[0].shape[0]} images x {first[1].shape[0]} texts, "
                            f"the split {ds.name}/{ds.split} has {ds.num_images} x {ds.num_texts}")
    per_subset, ranks, scored = [], [], 0
    for sub in subsets:
        images = sub.images if sub.images is not None else np.arange(gt.num_images)
        texts = sub.texts if sub.texts is not None else np.arange(gt.num_texts)
        whole = sub.images is None and sub.texts is None
        g = gt if whole else gt.subset(texts, images)
        if g.nnz == 0:
            raise DataError(f"protocol {protocol}: subset {sub.name} has no positive pair")
        ir = img_reps if whole else take_reps(img_reps, images)
        tr = txt_reps if whole else take_reps(txt_reps, texts)
        if rerank_k:
            fi, ft = (first[0], first[1]) if whole else (first[0][images], first[1][texts])
            res = two_stage_ranks(fi, ft, pair_rescore_fn(model, ir, tr), g, int(rerank_k),
                                  block_size=block_size, progress=progress, fusion=rerank_fusion)
            r_i2t, r_t2i = res["i2t_ranks"], res["t2i_ranks"]
            scored += res["pairs_scored"]
        else:
            r_i2t, r_t2i = exact_ranks(model, ir, tr, g, image_block=block_size, text_block=text_block,
                                       progress=progress)
            scored += g.num_images * g.num_texts
        per_subset.append(metrics_from_ranks(r_i2t, r_t2i))
        ranks.append((r_i2t, r_t2i))
        log.debug("pair scorer %s %s: %s", protocol, sub.name, per_subset[-1])
    result: dict[str, Any] = {"metrics": average_metrics(per_subset), "per_subset": per_subset,
                              "pairs_scored": scored, "encode_seconds": t_encode}
    if return_ranks:
        result["i2t_ranks"] = np.concatenate([r[0] for r in ranks])
        result["t2i_ranks"] = np.concatenate([r[1] for r in ranks])
    return result
