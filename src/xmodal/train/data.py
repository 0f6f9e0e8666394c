"""Training data: deterministic batch order and the inputs each tower consumes.

Batch ``b`` of the run is a pure function of ``(seed, b)``: epoch ``e = b // batches_per_epoch``
shuffles the texts with ``default_rng([seed, e])`` and draws one positive image per text
from the same generator. A resumed run therefore sees exactly the batches an uninterrupted
run would, with no sampler state to save.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ..data.base import CrossModalDataset, GroundTruth
from ..errors import DataError
from ..models.base import TowerOutput


@dataclass
class Batch:
    text_idx: np.ndarray  # (B,) dataset text indices
    image_idx: np.ndarray  # (B,) the positive image drawn for each text
    pos_mask: torch.Tensor  # (B_img, B_txt) bool: image a is a positive of text b
    images: Any  # whatever the image side consumes (TowerOutput, pixels, ...)
    texts: Any  # whatever the text side consumes (TowerOutput, list[str], ...)


class BatchOrder:
    """Deterministic epochs of text indices, each with one sampled positive image."""

    def __init__(self, gt: GroundTruth, batch_size: int, seed: int) -> None:
        counts = gt.counts()
        self.texts = np.flatnonzero(counts > 0)
        if len(self.texts) < batch_size:
            raise DataError(f"training split has {len(self.texts)} texts with an image, fewer than "
                            f"train.batch_size={batch_size}; lower the batch size")
        self.gt = gt
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = len(self.texts) // batch_size
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = self.texts[rng.permutation(len(self.texts))]
            counts = self.gt.counts()[order]
            pick = (rng.random(len(order)) * counts).astype(np.int64)  # which positive, per text
            images = self.gt.indices[self.gt.indptr[order] + pick]
            self._cache = (epoch, order, images)
        return self._cache[1], self._cache[2]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Text and image indices of global batch ``step``."""
        epoch, k = divmod(step, self.batches_per_epoch)
        order, images = self._epoch(epoch)
        sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
        return order[sl], images[sl]


def positive_mask(gt: GroundTruth, image_idx: np.ndarray, text_idx: np.ndarray) -> torch.Tensor:
    """``(len(image_idx), len(text_idx))`` bool: image a is one of text b's positives.

    Two captions of the same image in one batch are therefore not each other's negatives.
    """
    t, i = gt.pairs()
    keys = np.sort(t * gt.num_images + i)
    query = text_idx[None, :].astype(np.int64) * gt.num_images + image_idx[:, None]  # (Bi, Bt)
    pos = np.searchsorted(keys, query.ravel())
    pos = np.minimum(pos, len(keys) - 1)
    hit = (keys[pos] == query.ravel()).reshape(query.shape)
    return torch.from_numpy(hit)


class Inputs(Protocol):
    """Gives the model input for a set of item indices."""

    def __call__(self, idx: np.ndarray) -> Any: ...


class CachedOutputs:
    """Tower outputs computed once (frozen tower): pooled ``(N, D)`` and optional tokens."""

    def __init__(self, pooled: np.ndarray, tokens: np.ndarray | None = None,
                 mask: np.ndarray | None = None) -> None:
        self.pooled = pooled
        self.tokens = tokens
        self.mask = mask

    def __len__(self) -> int:
        return len(self.pooled)

    def __call__(self, idx: np.ndarray, device: torch.device | str = "cpu") -> TowerOutput:
        idx = np.asarray(idx)
        order = np.argsort(idx, kind="stable")  # sorted reads are much faster on memmaps
        inv = np.empty_like(order)
        inv[order] = np.arange(len(order))
        take = lambda a: torch.from_numpy(np.asarray(a[idx[order]])[inv]).to(device).float()  # noqa: E731
        pooled = take(self.pooled)  # (B, D)
        if self.tokens is None:
            return TowerOutput(tokens=pooled[:, None, :], pooled=pooled, mask=None)
        tokens = take(self.tokens)  # (B, N, D)
        mask = torch.from_numpy(np.asarray(self.mask[idx[order]])[inv]).to(device).bool() if self.mask is not None else None
        return TowerOutput(tokens=tokens, pooled=pooled, mask=mask)


class RawTexts:
    def __init__(self, captions: list[str]) -> None:
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)

    def __call__(self, idx: np.ndarray, device: Any = "cpu") -> list[str]:
        return [self.captions[int(k)] for k in idx]


class FeatureRows:
    """Rows of a dataset's own feature array (precomp / VinVL regions), as a float tensor."""

    def __init__(self, features: Any, boxes: Any | None = None) -> None:
        self.features = features
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.features)

    def __call__(self, idx: np.ndarray, device: Any = "cpu") -> Any:
        idx = np.asarray(idx)
        feats = torch.from_numpy(np.ascontiguousarray(self.features[idx], dtype=np.float32)).to(device)
        if self.boxes is None:
            return feats
        boxes = torch.from_numpy(np.ascontiguousarray(self.boxes[idx], dtype=np.float32)).to(device)
        return {"features": feats, "boxes": boxes}


class PixelImages:
    """Decoded, preprocessed pixels for a pixel tower that is being trained end to end."""

    def __init__(self, dataset: CrossModalDataset, preprocess: Callable[[Any], torch.Tensor]) -> None:
        from ..data.images import open_image

        self.dataset = dataset
        self.preprocess = preprocess
        self._open = open_image

    def __len__(self) -> int:
        return self.dataset.num_images

    def load(self, i: int):
        pixels = self.dataset.meta.get("pixels")
        if pixels is not None:
            return pixels[int(i)]
        return self._open(self.dataset.image_path(int(i)))

    def __call__(self, idx: np.ndarray, device: Any = "cpu") -> torch.Tensor:
        return torch.stack([self.preprocess(self.load(i)) for i in idx]).to(device)  # (B, 3, H, W)
