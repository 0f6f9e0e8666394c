"""Training data: deterministic batch order and the inputs each tower consumes.

Batch ``b`` of the run is a pure function of ``(seed, b)``: epoch ``e = b // batches_per_epoch``
shuffles the texts with ``default_rng([seed, e])`` and draws one positive image per text
from the same generator. A resumed run therefore sees exactly the batches an uninterrupted
run would, with no sampler state to save.

Multilingual training (X-MRS) draws, for every sample of a batch, one of its versions
(languages, translations, back-translated paraphrases). The versions of one sample are a
:class:`TextGroups` group (texts with the same positive images); a training split whose
``gt`` is a :class:`GroupedGroundTruth` makes :class:`BatchOrder` shuffle groups and draw
one language per sample, then one text of that language, with ``default_rng([seed,
step, ...])``: a pure function of the seed and the step again, so resume stays exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import torch

from .base import CrossModalDataset, GroundTruth
from ..errors import DataError
from ..models.base import TowerOutput


@dataclass
class Batch:
    text_idx: np.ndarray  # (B,) dataset text indices
    image_idx: np.ndarray  # (B,) the positive image drawn for each text
    pos_mask: torch.Tensor  # (B_img, B_txt) bool: image a is a positive of text b
    images: Any  # whatever the image side consumes (TowerOutput, pixels, ...)
    texts: Any  # whatever the text side consumes (TowerOutput, list[str], ...)


@dataclass(frozen=True)
class TextGroups:
    """Texts that are versions of one sample, grouped, with each version's language.

    Group ``g`` holds language blocks ``lang_ptr[g]:lang_ptr[g + 1]``; block ``b`` holds the
    texts ``members[member_ptr[b]:member_ptr[b + 1]]``, all in language ``block_lang[b]``.
    """

    lang_ptr: np.ndarray  # (G + 1,) int64
    member_ptr: np.ndarray  # (nblocks + 1,) int64
    members: np.ndarray  # (n,) int64 text indices
    block_lang: np.ndarray  # (nblocks,) int64 index into ``languages``
    languages: tuple[str, ...]
    #: relative weight of each language in the draw (None = uniform over a sample's languages)
    lang_weight: np.ndarray | None = None

    @property
    def num_groups(self) -> int:
        return len(self.lang_ptr) - 1

    @classmethod
    def by_positives(cls, gt: GroundTruth, langs: list[str] | None,
                     weights: dict[str, float] | None = None) -> "TextGroups":
        """Group the texts that have an image by their set of positive images.

        Translations and paraphrases of a text share its images, so they land in its group;
        groups are ordered by their first text, languages within a group by first appearance.
        ``weights`` gives languages a relative weight in the draw (others weigh 1), e.g.
        ``{"en": 4}`` to keep the source language frequent among many translations.
        """
        codes = list(dict.fromkeys(langs)) if langs is not None else ["und"]
        code_of = {c: k for k, c in enumerate(codes)}
        group_of: dict[bytes, int] = {}
        blocks: list[dict[int, list[int]]] = []
        for t in np.flatnonzero(gt.counts() > 0):
            key = gt.images_of(int(t)).tobytes()
            g = group_of.setdefault(key, len(blocks))
            if g == len(blocks):
                blocks.append({})
            lang = code_of[langs[t]] if langs is not None else 0
            blocks[g].setdefault(lang, []).append(int(t))
        lang_ptr, member_ptr, members, block_lang = [0], [0], [], []
        for by_lang in blocks:
            for lang, texts in by_lang.items():
                members.extend(texts)
                member_ptr.append(len(members))
                block_lang.append(lang)
            lang_ptr.append(len(block_lang))
        i64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
        lang_weight = None
        if weights:
            bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float)) or v <= 0}
            if bad:
                raise DataError(f"language weights must be positive numbers, got {bad}")
            lang_weight = np.asarray([float(weights.get(c, 1.0)) for c in codes])
        return cls(i64(lang_ptr), i64(member_ptr), i64(members), i64(block_lang), tuple(codes), lang_weight)

    def first_text(self) -> np.ndarray:
        """(G,) the first text of every group (its positives are the group's)."""
        return self.members[self.member_ptr[self.lang_ptr[:-1]]]

    def draw(self, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One text per group: a language among the group's (uniformly, or by ``lang_weight``),
        then one of its texts uniformly."""
        groups = np.asarray(groups, dtype=np.int64)
        lo, hi = self.lang_ptr[groups], self.lang_ptr[groups + 1]  # (B,) block ranges
        u = rng.random(len(groups))
        if self.lang_weight is None:
            block = lo + (u * (hi - lo)).astype(np.int64)  # (B,)
        else:  # weighted: invert the cumulative weight of the group's blocks
            cw = np.concatenate([[0.0], np.cumsum(self.lang_weight[self.block_lang])])  # (nblocks + 1,)
            target = cw[lo] + u * (cw[hi] - cw[lo])
            block = np.clip(np.searchsorted(cw, target, side="right") - 1, lo, hi - 1)
        size = self.member_ptr[block + 1] - self.member_ptr[block]  # (B,)
        return self.members[self.member_ptr[block] + (rng.random(len(groups)) * size).astype(np.int64)]


@dataclass(frozen=True)
class GroupedGroundTruth(GroundTruth):
    """A ground truth that also knows which texts are versions of one sample.

    :class:`BatchOrder` iterates over its groups and draws one version per sample and step.
    """

    groups: TextGroups | None = field(default=None, compare=False)

    @classmethod
    def of(cls, gt: GroundTruth, langs: list[str] | None,
           weights: dict[str, float] | None = None) -> "GroupedGroundTruth":
        return cls(gt.indptr, gt.indices, gt.num_images, TextGroups.by_positives(gt, langs, weights))


# salt for the per-step version draws, so they never share a stream with the epoch shuffles
_DRAW_STREAM = 0x58_4D_52_53


class BatchOrder:
    """Deterministic epochs of text indices, each with one sampled positive image.

    With a :class:`GroupedGroundTruth` the epochs are over groups (samples) and every
    batch draws one version of each sample (see the module docstring).
    """

    def __init__(self, gt: GroundTruth, batch_size: int, seed: int) -> None:
        self.groups = gt.groups if isinstance(gt, GroupedGroundTruth) else None
        if self.groups is not None:
            # epochs over samples; ``texts`` holds each group's first text for its positives
            self.texts = self.groups.first_text()
        else:
            self.texts = np.flatnonzero(gt.counts() > 0)
        if len(self.texts) < batch_size:
            unit = "samples (text groups)" if self.groups is not None else "texts"
            raise DataError(f"training split has {len(self.texts)} {unit} with an image, fewer than "
                            f"train.batch_size={batch_size}; lower the batch size")
        self.gt = gt
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = len(self.texts) // batch_size
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None
        if self.groups is not None:
            self._group_of_first = np.full(gt.num_texts, -1, dtype=np.int64)  # first text -> group
            self._group_of_first[self.texts] = np.arange(len(self.texts))

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
        if self.groups is None:
            return order[sl], images[sl]
        # order holds first texts; map back to groups and draw this step's versions
        groups = self._group_of_first[order[sl]]
        texts = self.groups.draw(groups, np.random.default_rng([self.seed, step, _DRAW_STREAM]))
        return texts, images[sl]


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


class FieldTexts:
    """Multi-field texts (recipes): ``{field: string}`` records for a multi-field text tower."""

    def __init__(self, fields: dict[str, list[str]], names: list[str]) -> None:
        self.fields = {f: fields[f] for f in names}

    def __len__(self) -> int:
        return len(next(iter(self.fields.values())))

    def __call__(self, idx: np.ndarray, device: Any = "cpu") -> list[dict[str, str]]:
        return [{f: vals[int(k)] for f, vals in self.fields.items()} for k in idx]


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
        from .images import open_image

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
