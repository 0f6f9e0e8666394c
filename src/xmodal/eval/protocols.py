"""The field's evaluation protocols as subsets of one split, averaged.

Every protocol is a list of :class:`Subset` (images and texts of the split, in their
original order) evaluated independently with the exact engine of :mod:`.metrics`; the
reported value of **every** metric (recalls, medR, meanR, rsum) is the mean over subsets.

- ``full``: everything, once.
- ``coco1k``: 5 folds of 1,000 images ``[1000 f, 1000 f + 1000)`` of the first 5,000 images,
  each with the texts that have an image in the fold (VSE++ / SCAN ``fold5``).
- ``coco5k``: the first 5,000 images and their texts.
- ``f30k1k``: Flickr30K test; the split must have exactly 1,000 images (anything else is
  an error rather than a silent truncation).
- ``recipe1k`` / ``recipe10k``: 10 random subsets of 1,000 / 10,000 texts (recipes) that
  have an image, each with its positive images, drawn with ``numpy.random.default_rng(seed)``;
  medR is the mean of the per-subset medians, as X-MRS and im2recipe report it.

Protocols that do not fit the data size raise :class:`~xmodal.errors.DataError`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.base import GroundTruth
from ..errors import DataError
from ..registry import Registry
from .metrics import (DEFAULT_BLOCK_SIZE, METRIC_KEYS, check_block_size, ranks_prepared,
                      metrics_from_ranks, prepare_inputs)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subset:
    """One evaluation unit: image and text indices into the split (``None`` = all)."""

    name: str
    images: np.ndarray | None = None
    texts: np.ndarray | None = None


@dataclass
class ProtocolResult:
    """Averaged metrics, plus each subset's own metrics in the same order as ``subsets``."""

    protocol: str
    metrics: dict[str, float]
    per_subset: list[dict[str, float]] = field(default_factory=list)
    subsets: list[Subset] = field(default_factory=list)


#: Protocol name -> ``fn(gt, *, seed) -> list[Subset]``.
PROTOCOLS: Registry[list[Subset]] = Registry("protocol")

COCO_TEST_IMAGES = 5000
COCO_FOLD_IMAGES = 1000
F30K_TEST_IMAGES = 1000
RECIPE_SUBSETS = 10


def list_protocols() -> list[str]:
    """Names accepted by ``protocol=``."""
    return PROTOCOLS.names()


def _texts_of_images(gt: GroundTruth, lo: int, hi: int) -> np.ndarray:
    """Texts with at least one image in ``[lo, hi)``, in original order."""
    t, i = gt.pairs()
    return np.unique(t[(i >= lo) & (i < hi)])


def _first_images(gt: GroundTruth, count: int, protocol: str) -> None:
    if gt.num_images < count:
        raise DataError(f"protocol {protocol}: needs at least {count} images, the data has {gt.num_images}")
    if gt.num_images > count:
        log.warning("protocol %s uses the first %d of %d images", protocol, count, gt.num_images)


@PROTOCOLS.register("full")
def _full(gt: GroundTruth, *, seed: int = 0) -> list[Subset]:
    return [Subset("full")]


@PROTOCOLS.register("coco5k")
def _coco5k(gt: GroundTruth, *, seed: int = 0) -> list[Subset]:
    _first_images(gt, COCO_TEST_IMAGES, "coco5k")
    return [Subset("5k", np.arange(COCO_TEST_IMAGES), _texts_of_images(gt, 0, COCO_TEST_IMAGES))]


@PROTOCOLS.register("coco1k")
def _coco1k(gt: GroundTruth, *, seed: int = 0) -> list[Subset]:
    _first_images(gt, COCO_TEST_IMAGES, "coco1k")
    folds = []
    for f in range(COCO_TEST_IMAGES // COCO_FOLD_IMAGES):
        lo, hi = f * COCO_FOLD_IMAGES, (f + 1) * COCO_FOLD_IMAGES
        folds.append(Subset(f"fold{f}", np.arange(lo, hi), _texts_of_images(gt, lo, hi)))
    return folds


@PROTOCOLS.register("f30k1k")
def _f30k1k(gt: GroundTruth, *, seed: int = 0) -> list[Subset]:
    if gt.num_images != F30K_TEST_IMAGES:
        raise DataError(f"protocol f30k1k: the Flickr30K test split has {F30K_TEST_IMAGES} images, "
                        f"the data has {gt.num_images}; use protocol 'full' for other sizes")
    return [Subset("1k")]


def _recipe(gt: GroundTruth, size: int, seed: int, protocol: str) -> list[Subset]:
    eligible = np.flatnonzero(gt.counts() > 0)
    if len(eligible) < size:
        raise DataError(f"protocol {protocol}: needs at least {size} texts with an image, "
                        f"the data has {len(eligible)}")
    rng = np.random.default_rng(seed)
    out = []
    for k in range(RECIPE_SUBSETS):
        texts = np.sort(rng.choice(eligible, size=size, replace=False))
        starts, ends = gt.indptr[texts], gt.indptr[texts + 1]
        images = np.unique(np.concatenate([gt.indices[s:e] for s, e in zip(starts, ends)]))
        out.append(Subset(f"subset{k}", images, texts))
    return out


@PROTOCOLS.register("recipe1k")
def _recipe1k(gt: GroundTruth, *, seed: int = 0) -> list[Subset]:
    return _recipe(gt, 1000, seed, "recipe1k")


@PROTOCOLS.register("recipe10k")
def _recipe10k(gt: GroundTruth, *, seed: int = 0) -> list[Subset]:
    return _recipe(gt, 10000, seed, "recipe10k")


def protocol_subsets(protocol: str, gt: GroundTruth, *, seed: int = 0) -> list[Subset]:
    """The subsets a protocol evaluates on this ground truth (raises if it does not fit)."""
    return PROTOCOLS.create(protocol, gt, seed=seed)


def average_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every metric over subsets (medR and meanR included, as the papers report)."""
    return {k: float(np.mean([r[k] for r in results])) for k in METRIC_KEYS}


@torch.no_grad()
def evaluate_protocol(image_emb: Any, text_emb: Any, text_to_images: Any, protocol: str = "full", *,
                      block_size: int = DEFAULT_BLOCK_SIZE, device: Any = None, dtype: Any = None,
                      seed: int = 0, progress: bool | None = None,
                      names: tuple[str, str, str] | None = None) -> ProtocolResult:
    """Evaluate embeddings under ``protocol`` and keep each subset's metrics.

    Inputs are checked and converted once; every subset is then evaluated by the streaming
    engine. See :func:`xmodal.eval.protocols.evaluate_embeddings` for the arguments; ``names``
    relabels the three inputs in error messages (the CLI passes file names).
    """
    block_size = check_block_size(block_size)
    if protocol not in PROTOCOLS:
        PROTOCOLS.get(protocol)  # raises, listing the choices
    kwargs = {"names": names} if names else {}
    img, txt, gt = prepare_inputs(image_emb, text_emb, text_to_images, device=device, dtype=dtype, **kwargs)
    subsets = protocol_subsets(protocol, gt, seed=seed)
    per_subset = []
    sides = tuple(names[:2]) if names else ("image embeddings", "text embeddings")
    for sub in subsets:
        if sub.images is None and sub.texts is None:
            i_sub, t_sub, g_sub = img, txt, gt
        else:
            images = sub.images if sub.images is not None else np.arange(gt.num_images)
            texts = sub.texts if sub.texts is not None else np.arange(gt.num_texts)
            i_sub = _rows(img, images)
            t_sub = _rows(txt, texts)
            g_sub = gt.subset(texts, images)
        if g_sub.nnz == 0:
            raise DataError(f"protocol {protocol}: subset {sub.name} has no positive pair")
        i2t, t2i = ranks_prepared(i_sub, t_sub, g_sub, block_size, progress, names=sides,
                                  rows_of=(sub.images, sub.texts))
        metrics = metrics_from_ranks(i2t, t2i)
        log.debug("protocol %s %s (%d images, %d texts): %s", protocol, sub.name,
                  g_sub.num_images, g_sub.num_texts, metrics)
        per_subset.append(metrics)
    return ProtocolResult(protocol, average_metrics(per_subset), per_subset, subsets)


def _rows(x: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """Rows ``idx`` of ``x``: a view for a contiguous range, a gather otherwise."""
    if len(idx) and idx[-1] - idx[0] + 1 == len(idx) and np.all(np.diff(idx) == 1):
        return x[int(idx[0]):int(idx[-1]) + 1]
    return x.index_select(0, torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)).to(x.device))


# -------------------------------------------------------------------------------------
# the public entry point
# -------------------------------------------------------------------------------------
def evaluate_embeddings(image_emb: Any, text_emb: Any, text_to_images: Any, protocol: str = "full", *,
                        block_size: int = DEFAULT_BLOCK_SIZE,
                        device: str | torch.device | None = None,
                        dtype: str | torch.dtype | None = None,
                        seed: int = 0,
                        progress: bool | None = None) -> dict[str, float]:
    """Exact image<->text retrieval metrics of embeddings under a named protocol.

    ``image_emb`` (N x D) and ``text_emb`` (M x D): numpy arrays or torch tensors, scored by
    dot product (normalise them first for cosine). ``text_to_images``: a 1-D int array (one
    image index per text), a list of lists of image indices, or a
    :class:`~xmodal.data.base.GroundTruth`. ``protocol``: ``full``, ``coco1k``, ``coco5k``,
    ``f30k1k``, ``recipe1k`` or ``recipe10k`` (see :mod:`xmodal.eval.protocols`); ``seed``
    drives the recipe subsets. Computation streams over ``block_size`` image rows on
    ``device`` (default: where tensor inputs live, else CPU) in ``dtype`` (``fp32``
    default, or ``bf16``).

    Returns a dict with exactly the keys of :data:`METRIC_KEYS` (recalls in percent).
    """
    return evaluate_protocol(image_emb, text_emb, text_to_images, protocol, block_size=block_size,
                             device=device, dtype=dtype, seed=seed, progress=progress).metrics
