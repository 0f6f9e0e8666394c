"""The one dataset model every format maps to.

A :class:`CrossModalDataset` is one split: a list of images (ids, and either file paths
or rows of a feature array), a list of texts (ids, caption strings, optional language and
named fields), and a many-to-many ground truth :class:`GroundTruth` giving, for every text,
the set of images it belongs to. Nothing downstream assumes positional arithmetic such as
"caption i belongs to image i // 5": everything goes through ``gt``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import ConfigError, DataError
from ..registry import Registry


@dataclass(frozen=True)
class GroundTruth:
    """Text -> images relation in CSR form.

    ``indices[indptr[t]:indptr[t + 1]]`` are the image indices text ``t`` belongs to.
    """

    indptr: np.ndarray  # (M + 1,) int64
    indices: np.ndarray  # (nnz,) int64
    num_images: int

    def __post_init__(self) -> None:
        indptr = np.ascontiguousarray(self.indptr, dtype=np.int64)
        indices = np.ascontiguousarray(self.indices, dtype=np.int64)
        object.__setattr__(self, "indptr", indptr)
        object.__setattr__(self, "indices", indices)
        if indptr.ndim != 1 or len(indptr) < 1 or indptr[0] != 0 or indptr[-1] != len(indices):
            raise DataError("ground truth: malformed CSR index pointer")
        if np.any(np.diff(indptr) < 0):
            raise DataError("ground truth: index pointer must be non-decreasing")
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_images):
            bad = int(np.flatnonzero((indices < 0) | (indices >= self.num_images))[0])
            text = int(np.searchsorted(indptr, bad, side="right") - 1)
            raise DataError(
                f"ground truth: text {text} maps to image {int(indices[bad])}, "
                f"outside 0..{self.num_images - 1}"
            )

    # construction -------------------------------------------------------------------
    @classmethod
    def from_map(cls, mapping: np.ndarray | Sequence[Sequence[int]] | Sequence[int],
                 num_images: int, *, allow_empty: bool = False) -> "GroundTruth":
        """Build from a 1-D int array (one image per text) or a list of lists of image indices."""
        if isinstance(mapping, np.ndarray) and mapping.ndim == 1:
            if mapping.dtype.kind not in "iu":
                raise DataError(f"text-to-image map must hold integers, got dtype {mapping.dtype}")
            idx = mapping.astype(np.int64)
            return cls(np.arange(len(idx) + 1, dtype=np.int64), idx, num_images)
        if isinstance(mapping, np.ndarray):
            raise DataError(f"text-to-image map must be 1-D, got shape {mapping.shape}")
        lists = list(mapping)
        if lists and all(isinstance(x, (int, np.integer)) for x in lists):
            return cls.from_map(np.asarray(lists, dtype=np.int64), num_images)
        lengths = np.zeros(len(lists) + 1, dtype=np.int64)
        flat: list[int] = []
        for t, imgs in enumerate(lists):
            if isinstance(imgs, (int, np.integer)):
                imgs = [imgs]
            try:
                items = [int(i) for i in imgs]
            except (TypeError, ValueError):
                raise DataError(f"text-to-image map entry {t}: expected a list of integers, got {imgs!r}") from None
            if not items and not allow_empty:
                raise DataError(f"text-to-image map entry {t}: text has no image")
            if any(isinstance(i, bool) for i in imgs):
                raise DataError(f"text-to-image map entry {t}: booleans are not image indices")
            items = sorted(set(items))
            flat.extend(items)
            lengths[t + 1] = len(items)
        return cls(np.cumsum(lengths), np.asarray(flat, dtype=np.int64), num_images)

    @classmethod
    def from_pairs(cls, text_idx: np.ndarray, image_idx: np.ndarray, num_texts: int,
                   num_images: int) -> "GroundTruth":
        """Build from parallel arrays of (text, image) pairs; duplicates are removed."""
        t = np.asarray(text_idx, dtype=np.int64)
        i = np.asarray(image_idx, dtype=np.int64)
        if len(t):
            key = np.unique(t * max(num_images, 1) + i)
            t, i = key // max(num_images, 1), key % max(num_images, 1)
        counts = np.bincount(t, minlength=num_texts) if len(t) else np.zeros(num_texts, np.int64)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        return cls(indptr, i, num_images)

    # queries ------------------------------------------------------------------------
    @property
    def num_texts(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return len(self.indices)

    def images_of(self, t: int) -> np.ndarray:
        return self.indices[self.indptr[t]:self.indptr[t + 1]]

    def counts(self) -> np.ndarray:
        """Number of images per text."""
        return np.diff(self.indptr)

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """All positive pairs as ``(text_idx, image_idx)``."""
        t = np.repeat(np.arange(self.num_texts, dtype=np.int64), self.counts())
        return t, self.indices.copy()

    def transpose(self) -> "GroundTruth":
        """Image -> texts relation, same CSR layout (``num_images`` becomes the text count)."""
        t, i = self.pairs()
        return GroundTruth.from_pairs(i, t, self.num_images, self.num_texts)

    def first_image(self) -> np.ndarray:
        """For each text, its lowest-indexed image (-1 when it has none)."""
        out = np.full(self.num_texts, -1, dtype=np.int64)
        has = self.counts() > 0
        out[has] = self.indices[self.indptr[:-1][has]]
        return out

    def is_one_to_one_per_text(self) -> bool:
        return bool(np.all(self.counts() == 1))

    def subset(self, texts: np.ndarray, images: np.ndarray) -> "GroundTruth":
        """Restrict to the given texts and images (both re-indexed in the given order)."""
        texts = np.asarray(texts, dtype=np.int64)
        images = np.asarray(images, dtype=np.int64)
        remap = np.full(self.num_images, -1, dtype=np.int64)
        remap[images] = np.arange(len(images))
        starts, ends = self.indptr[texts], self.indptr[texts + 1]
        counts = ends - starts
        idx = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(texts) else np.zeros(0, np.int64)
        new_t = np.repeat(np.arange(len(texts)), counts)
        new_i = remap[self.indices[idx.astype(np.int64)]] if len(idx) else np.zeros(0, np.int64)
        keep = new_i >= 0
        return GroundTruth.from_pairs(new_t[keep], new_i[keep], len(texts), len(images))

    def dense(self) -> np.ndarray:
        """(M, N) boolean mask; for tests and small data only."""
        m = np.zeros((self.num_texts, self.num_images), dtype=bool)
        t, i = self.pairs()
        m[t, i] = True
        return m


def item_folds(gt: GroundTruth, folds: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split the items into ``folds`` groups for cross-fitting: ``(text_fold (M,), image_fold (N,))``.

    Texts and images linked by the ground truth (a caption and its images, the images of one
    emoji in two styles) form one connected component and always land in one fold, so no
    fold holds a positive of another fold's item. Components are shuffled with ``seed`` and
    dealt, each to the fold with the fewest texts so far (ties: the lowest fold), which keeps
    the folds within one component of each other in size. An image without a caption belongs to
    a component of its own.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"folds: expected an integer >= 2, got {folds!r}")
    m, n = gt.num_texts, gt.num_images
    parent = np.arange(m + n)  # union-find over texts (0..m-1) and images (m..m+n-1)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    t, i = gt.pairs()
    for a, b in zip(t.tolist(), (i + m).tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    comp = np.array([root(x) for x in range(m + n)], dtype=np.int64)
    labels, comp = np.unique(comp, return_inverse=True)  # components numbered 0..C-1
    if len(labels) < folds:
        raise ConfigError(f"folds={folds}: the data has only {len(labels)} groups of linked items")
    texts_per = np.bincount(comp[:m], minlength=len(labels))
    fold_of = np.empty(len(labels), dtype=np.int64)
    size = np.zeros(folds, dtype=np.int64)
    for c in np.random.default_rng(seed).permutation(len(labels)):
        f = int(np.argmin(size))
        fold_of[c] = f
        size[f] += texts_per[c]
    return fold_of[comp[:m]], fold_of[comp[m:]]


@dataclass
class CrossModalDataset:
    """One split of an image-text collection.

    Images are addressed by index ``0..num_images-1``; ``image_paths`` (files, relative to
    ``root`` unless absolute) and/or ``image_features`` (an array, possibly memory-mapped,
    whose first axis is aligned with the images) describe them. Texts likewise; ``fields``
    holds named parts of multi-field texts (e.g. title / ingredients / instructions).
    """

    name: str
    split: str
    image_ids: list[str]
    text_ids: list[str]
    captions: list[str]
    gt: GroundTruth
    image_paths: list[str] | None = None
    image_features: np.ndarray | None = None  # (N, D) pooled or (N, R, D) regions; or a lazy array-like
    image_boxes: np.ndarray | None = None  # (N, R, B) box / position features
    image_hashes: list[str] | None = None
    langs: list[str] | None = None
    fields: dict[str, list[str]] | None = None
    root: Path | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, m = len(self.image_ids), len(self.text_ids)
        if len(self.captions) != m:
            raise DataError(f"{self.name}/{self.split}: {m} text ids but {len(self.captions)} captions")
        if self.gt.num_texts != m or self.gt.num_images != n:
            raise DataError(
                f"{self.name}/{self.split}: ground truth is {self.gt.num_texts} texts x "
                f"{self.gt.num_images} images, dataset has {m} x {n}"
            )
        for name, seq in (("image_paths", self.image_paths), ("image_hashes", self.image_hashes)):
            if seq is not None and len(seq) != n:
                raise DataError(f"{self.name}/{self.split}: {name} has {len(seq)} entries for {n} images")
        for name, arr in (("image_features", self.image_features), ("image_boxes", self.image_boxes)):
            if arr is not None and arr.shape[0] != n:
                raise DataError(f"{self.name}/{self.split}: {name} has {arr.shape[0]} rows for {n} images")
        if self.langs is not None and len(self.langs) != m:
            raise DataError(f"{self.name}/{self.split}: langs has {len(self.langs)} entries for {m} texts")
        for key, vals in (self.fields or {}).items():
            if len(vals) != m:
                raise DataError(f"{self.name}/{self.split}: field {key!r} has {len(vals)} entries for {m} texts")

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    @property
    def num_texts(self) -> int:
        return len(self.text_ids)

    def image_path(self, i: int) -> Path:
        if self.image_paths is None or self.image_paths[i] is None:
            raise DataError(f"{self.name}/{self.split}: image {self.image_ids[i]!r} has no file path")
        p = Path(self.image_paths[i])
        return p if p.is_absolute() or self.root is None else self.root / p

    def select_texts(self, keep: np.ndarray | Sequence[int]) -> "CrossModalDataset":
        """A view with only the given texts (all images kept)."""
        keep = np.asarray(keep, dtype=np.int64)
        gt = self.gt.subset(keep, np.arange(self.num_images))
        pick = lambda seq: [seq[k] for k in keep]  # noqa: E731
        return replace(
            self,
            text_ids=pick(self.text_ids),
            captions=pick(self.captions),
            gt=gt,
            langs=pick(self.langs) if self.langs is not None else None,
            fields={k: pick(v) for k, v in self.fields.items()} if self.fields else None,
        )

    def select_images(self, keep: np.ndarray | Sequence[int], *, drop_orphan_texts: bool = True) -> "CrossModalDataset":
        """A view with only the given images; texts left without an image are dropped."""
        keep = np.asarray(keep, dtype=np.int64)
        gt = self.gt.subset(np.arange(self.num_texts), keep)
        meta = self.meta
        if hasattr(meta.get("pixels"), "select"):  # keep lazy pixel sources aligned with the images
            meta = {**meta, "pixels": meta["pixels"].select(keep)}
        ds = replace(
            self,
            image_ids=[self.image_ids[k] for k in keep],
            image_paths=[self.image_paths[k] for k in keep] if self.image_paths is not None else None,
            image_features=_rows(self.image_features, keep),
            image_boxes=_rows(self.image_boxes, keep),
            image_hashes=[self.image_hashes[k] for k in keep] if self.image_hashes is not None else None,
            gt=gt,
            meta=meta,
        )
        if drop_orphan_texts:
            ds = ds.select_texts(np.flatnonzero(gt.counts() > 0))
        return ds

    def holdout(self, folds: int, fold: int, seed: int = 0, *, keep: str = "rest") -> "CrossModalDataset":
        """The items outside fold ``fold`` of :func:`item_folds` (``keep="rest"``), or inside it
        (``keep="fold"``): training data for an out-of-fold model, and what it may score."""
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
            raise ConfigError(f"fold: expected an integer in 0..{folds - 1}, got {fold!r}")
        if keep not in ("rest", "fold"):
            raise ConfigError(f"keep: expected rest or fold, got {keep!r}")
        text_fold, image_fold = item_folds(self.gt, folds, seed)
        inside = keep == "fold"
        ds = self.select_images(np.flatnonzero((image_fold == fold) == inside), drop_orphan_texts=False)
        return ds.select_texts(np.flatnonzero((text_fold == fold) == inside))

    def filter_lang(self, lang: str) -> "CrossModalDataset":
        if self.langs is None:
            if lang in ("en", "any"):
                return self
            raise DataError(f"{self.name}/{self.split}: texts carry no language, cannot select {lang!r}")
        if lang == "any":
            return self
        keep = [k for k, code in enumerate(self.langs) if code == lang]
        if not keep:
            have = ", ".join(sorted(set(self.langs)))
            raise DataError(f"{self.name}/{self.split}: no texts in language {lang!r}; available: {have}")
        return self.select_texts(keep)

    def summary(self) -> str:
        return (f"{self.name}/{self.split}: {self.num_images} images, {self.num_texts} texts, "
                f"{self.gt.nnz} positive pairs")


def _rows(arr, keep: np.ndarray):
    """Rows ``keep`` of a feature array; lazy arrays (``.subset``) stay lazy, full memmaps stay views."""
    if arr is None:
        return None
    subset = getattr(arr, "subset", None)
    if callable(subset):
        return subset(keep)
    if len(keep) == arr.shape[0] and np.array_equal(keep, np.arange(arr.shape[0])):
        return arr
    return arr[keep]


Reader = Callable[..., CrossModalDataset]
#: Dataset readers by format name; each is ``read(path, split, **options) -> CrossModalDataset``.
DATASETS: Registry[CrossModalDataset] = Registry("dataset format")


#: names a format's reader resolves to a dataset shipped with the package, not to a file:
#: ``load_dataset("emoji", "emoji", split)`` reads the embedded emoji data (unless a file or
#: folder of that name is in the working directory, which the reader then reads)
PACKAGED_NAMES: dict[str, tuple[str, ...]] = {"emoji": ("emoji",)}

#: formats whose ``path`` may be a pattern naming several files (WebDataset shards
#: ``shards-{000000..000099}.tar``); their reader checks the files it names
PATTERN_FORMATS: set[str] = set()


def load_dataset(fmt: str, path: str | Path, split: str, **options) -> CrossModalDataset:
    """Read one split of a dataset in the named format (readers register when
    :mod:`xmodal.data` is imported, which importing this module does first)."""
    path = Path(path)
    if not path.exists() and str(path) not in PACKAGED_NAMES.get(fmt, ()) and fmt not in PATTERN_FORMATS:
        raise DataError(f"{path}: no such file or folder")
    return DATASETS.create(fmt, path, split, **options)


def list_formats() -> list[str]:
    """The registered dataset formats (``data.format`` in a config)."""
    return DATASETS.names()


def ids_to_index(ids: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, i in enumerate(ids):
        out.setdefault(i, k)
    return out
