"""SCAN / VSE++ "precomp" folders: precomputed image features plus captions in order.

Layout of one split (``train``, ``dev``, ``test``, ``testall`` in SCAN's COCO data)::

    {split}_ims.npy    (N, R, D) region features or (N, D) pooled features
    {split}_caps.txt   one caption per line, k consecutive lines per image (k = lines / N)
    {split}_ids.txt    optional image ids, one line per image (or per caption, repeated k times)

The positional rule "captions ``c*k .. c*k+k-1`` belong to image ``c``" is the definition of
this format and is applied here only. VSE++'s layout stores one feature row per caption
(images repeated k times; SCAN/VSE++ handle it with ``im_div``): it is detected when the row
count equals the caption count and the first rows repeat, and the distinct images are taken
as a strided view of the memory map (no copy).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, where
from .base import DATASETS, CrossModalDataset, GroundTruth
from .table import check_options, int_option

logger = logging.getLogger(__name__)

_OPTIONS = ("caps_per_image",)
_MAX_REPEAT = 100  # longest run of identical leading rows taken as "one image repeated"
#: Bytes of the memory map checked for NaN / inf at a time (the file is never loaded whole).
SCAN_BYTES = 64 << 20


def _split_file(folder: Path, split: str, suffix: str) -> Path:
    return folder / f"{split}{suffix}"


def splits(path: str | Path) -> list[str]:
    """Splits with both ``{split}_ims.npy`` and ``{split}_caps.txt`` in the folder."""
    folder = Path(path)
    names = {p.name[: -len("_caps.txt")] for p in folder.glob("*_caps.txt")}
    return sorted(n for n in names if _split_file(folder, n, "_ims.npy").is_file())


def _resolve_split(folder: Path, split: str) -> str:
    if _split_file(folder, split, "_caps.txt").is_file():
        return split
    if split == "val" and _split_file(folder, "dev", "_caps.txt").is_file():
        return "dev"  # SCAN names its validation split "dev"
    have = ", ".join(splits(folder)) or "(none)"
    raise DataError(f"{folder}: no split {split!r} ({split}_caps.txt not found); splits present: {have}")


def _read_lines(path: Path, what: str) -> list[str]:
    """Stripped lines; trailing blank lines are ignored, inner blank lines are an error."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror}") from None
    lines = raw.split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    out: list[str] = []
    for n, line in enumerate(lines, 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise DataError(f"{where(path, n)}not UTF-8 text ({exc.reason} at column {exc.start + 1})") from None
        if not text:
            raise DataError(f"{where(path, n)}empty {what}")
        out.append(text)
    if not out:
        raise DataError(f"{path}: no {what}s in file")
    return out


def _load_features(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    try:
        feats = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:  # object arrays (pickles) or a corrupt header
        raise DataError(f"{path}: not a plain .npy array ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from None
    if not isinstance(feats, np.ndarray):
        raise DataError(f"{path}: expected a .npy array, got an archive")
    if feats.ndim not in (2, 3) or feats.dtype.kind not in "fiu":
        raise DataError(f"{path}: expected numeric features of shape (N, D) or (N, R, D), "
                        f"got {feats.dtype} {feats.shape}")
    if 0 in feats.shape[1:]:
        raise DataError(f"{path}: features of shape {feats.shape} are empty (every image needs at least "
                        "one value)")
    return feats


def _check_finite(feats: np.ndarray, path: Path) -> None:
    """Refuse NaN / inf features, naming the file and the row.

    Runs before the layout is inferred (NaN rows would not compare equal to their repeats).
    Reads the memory map in chunks of :data:`SCAN_BYTES`:
    one pass over the file, at memory speed when it is in the page cache (about 1 GB in
    0.1 s here), bounded memory whatever its size. Integer features are always finite.
    """
    if feats.dtype.kind != "f" or len(feats) == 0:
        return
    step = max(1, SCAN_BYTES // max(1, feats[0].nbytes))
    for start in range(0, len(feats), step):
        chunk = np.asarray(feats[start:start + step])
        ok = np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)  # (rows,)
        if not ok.all():
            row = start + int(np.flatnonzero(~ok)[0])
            raise DataError(f"{where(path)}row {row} has NaN or infinite values; precomputed image "
                            "features must be finite")


def _leading_run(feats: np.ndarray, start: int, limit: int) -> int:
    """How many rows from ``start`` on equal row ``start`` (at most ``limit``)."""
    first = feats[start]
    k = 1
    while k < limit and start + k < len(feats) and np.array_equal(feats[start + k], first):
        k += 1
    return k


def _infer_layout(feats: np.ndarray, num_caps: int, caps_per_image: int | None, ims: Path,
                  caps: Path) -> tuple[int, int]:
    """Return ``(k, stride)``: captions per image, and the row stride between distinct images."""
    rows = feats.shape[0]
    if caps_per_image is not None:
        k = caps_per_image
        if rows * k == num_caps:
            return k, 1
        if rows == num_caps and num_caps % k == 0:
            return k, k
        raise DataError(f"{caps}: {num_caps} captions do not fit {rows} feature rows in {ims.name} "
                        f"with caps_per_image={k}")
    if rows == num_caps:
        k = _leading_run(feats, 0, min(_MAX_REPEAT, rows))
        if k > 1:
            if num_caps % k:
                raise DataError(f"{ims}: rows repeat {k} times (one row per caption) but {num_caps} "
                                f"captions is not a multiple of {k}")
            return k, k
        return 1, 1
    if rows == 0 or num_caps % rows:
        raise DataError(f"{caps}: {num_caps} captions is not a multiple of the {rows} images in {ims.name}; "
                        "the precomp format needs the same number of captions for every image")
    return num_caps // rows, 1


def _check_repeats(feats: np.ndarray, k: int, ims: Path) -> None:
    """Spot-check the one-row-per-caption layout: first, middle and last groups repeat k times."""
    groups = feats.shape[0] // k
    for g in sorted({0, groups // 2, groups - 1}):
        if _leading_run(feats, g * k, k) != k:
            raise DataError(f"{ims}: rows {g * k}..{g * k + k - 1} should be one image repeated {k} times "
                            "(one row per caption) but differ; pass caps_per_image to set the layout")


def _read_ids(path: Path, num_images: int, num_caps: int, k: int) -> list[str]:
    ids = _read_lines(path, "image id")
    if len(ids) == num_images:
        return ids
    if len(ids) == num_caps:  # one id per caption: must be constant within each image's k lines
        grid = np.asarray(ids, dtype=object).reshape(num_images, k)  # (N, k)
        bad = np.flatnonzero((grid != grid[:, :1]).any(axis=1))
        if len(bad):
            img = int(bad[0])
            col = int(np.flatnonzero(grid[img] != grid[img, 0])[0])
            raise DataError(f"{where(path, img * k + col + 1)}image id {grid[img, col]!r} differs from "
                            f"{grid[img, 0]!r} on line {img * k + 1}; ids per caption must repeat {k} times")
        return list(grid[:, 0])
    raise DataError(f"{path}: {len(ids)} ids, expected one per image ({num_images}) or per caption ({num_caps})")


@DATASETS.register("precomp")
def read(path: str | Path, split: str, *, caps_per_image: int | None = None,
         **unknown: Any) -> CrossModalDataset:
    """Read one split of a SCAN/VSE++ precomp folder; features stay memory-mapped.

    ``caps_per_image`` forces k (else inferred: lines / rows, or the repeat length of the
    first rows when there is one row per caption).
    """
    check_options("precomp", unknown, _OPTIONS)
    if caps_per_image is not None:
        caps_per_image = int_option("precomp", "caps_per_image", caps_per_image)
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: the precomp format expects a folder with {{split}}_ims.npy and {{split}}_caps.txt")
    name = _resolve_split(folder, split)
    ims, caps = _split_file(folder, name, "_ims.npy"), _split_file(folder, name, "_caps.txt")
    feats = _load_features(ims)
    _check_finite(feats, ims)
    captions = _read_lines(caps, "caption")
    k, stride = _infer_layout(feats, len(captions), caps_per_image, ims, caps)
    if stride > 1:
        _check_repeats(feats, stride, ims)
        feats = feats[::stride]  # (N, ...) strided view of the memory map, no copy
        logger.info("%s: one feature row per caption; using every %d-th row as the %d images",
                    ims, stride, feats.shape[0])
    num_images = feats.shape[0]

    ids_path = _split_file(folder, name, "_ids.txt")
    image_ids = (_read_ids(ids_path, num_images, len(captions), k) if ids_path.is_file()
                 else [str(i) for i in range(num_images)])
    # The format's own definition: caption c belongs to image c // k.
    text_to_image = np.arange(len(captions), dtype=np.int64) // k
    text_ids = [f"{image_ids[i]}#{c % k}" for c, i in enumerate(text_to_image.tolist())]
    return CrossModalDataset(
        name=folder.name,
        split=split,
        image_ids=image_ids,
        text_ids=text_ids,
        captions=captions,
        gt=GroundTruth.from_map(text_to_image, num_images),
        image_features=feats,
        root=folder,
        meta={"format": "precomp", "file_split": name, "caps_per_image": k,
              "rows_per_caption": stride > 1, "features": str(ims)},
    )
