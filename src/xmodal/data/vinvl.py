"""VinVL / Oscar region features in TSV, with captions in JSON.

Feature file (``features.tsv``; Oscar's ``TSVFile``), one image per line, either::

    img_key \\t num_boxes \\t base64(float32[num_boxes, 2054])            (VinVL, coco_ir)
    img_key \\t {"num_boxes": n, "features": base64(float32[n, 2054])}    (Oscar captioning)

2054 = 2048 visual features + 6 box values (x1, y1, x2, y2, w, h, normalised). Beside it, an
optional ``features.lineidx`` (byte offset of every line) and ``imageid2idx.json`` (key ->
line number) let rows be found without scanning the file; without them the file is scanned
once. Rows are decoded lazily through :class:`TsvRegionFeatures`.

Captions: Oscar ships ``{split}_captions.pt`` (a pickle), which is never unpickled here;
convert it once to ``{split}_captions.json`` (``{"img_key": ["caption", ...]}``, see
docs/data.md). A COCO caption file (``{"annotations": [{"image_id", "caption", "id"}]}``),
a list of ``{"image_id", "caption"}`` or a ``{split}.caption.tsv`` (``key \\t JSON list``)
work too. Image key lists (``test_img_keys.tsv``, ``test_img_keys_1k.tsv``) select the images.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import DataError, where
from .base import DATASETS, CrossModalDataset, GroundTruth
from .table import check_options, int_option, progress_bar, read_json

logger = logging.getLogger(__name__)

_OPTIONS = ("features", "captions", "img_keys", "max_regions", "feature_dim")


# feature rows -----------------------------------------------------------------------------
def _decode_row(line: bytes, path: Path, lineno: int) -> tuple[str, np.ndarray]:
    """Key and ``(num_boxes, row_dim)`` float32 array of one TSV line."""
    loc = where(path, lineno)
    cols = line.rstrip(b"\r\n").split(b"\t")
    key = cols[0].decode("utf-8", "replace")
    try:
        if len(cols) >= 3:
            num, blobs = int(cols[1]), [cols[-1]]
        elif len(cols) == 2:
            info = json.loads(cols[1])
            if isinstance(info, dict):
                num, blobs = int(info["num_boxes"]), [info["features"]]
            elif isinstance(info, list):  # Oscar's per-box format: [{"feature": base64}, ...]
                num, blobs = len(info), [box["feature"] for box in info]
            else:
                raise ValueError("expected a JSON object with num_boxes and features")
        else:
            raise DataError(f"{loc}expected 'key<TAB>num_boxes<TAB>base64' or 'key<TAB>{{json}}', got one column")
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{loc}malformed feature row for key {key!r}: {exc}") from None
    if num < 0:
        raise DataError(f"{loc}negative num_boxes {num} for key {key!r}")
    try:
        buf = b"".join(base64.b64decode(b, validate=True) for b in blobs)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"{loc}features of key {key!r} are not valid base64: {exc}") from None
    if len(buf) % 4:
        raise DataError(f"{loc}features of key {key!r}: {len(buf)} bytes is not a whole number of float32")
    flat = np.frombuffer(buf, dtype=np.float32)
    if num == 0:
        if flat.size:
            raise DataError(f"{loc}key {key!r} has num_boxes 0 but {flat.size} values")
        return key, flat.reshape(0, 0)
    if flat.size % num:
        raise DataError(f"{loc}key {key!r}: {flat.size} values do not split into {num} boxes")
    return key, flat.reshape(num, flat.size // num)  # (num_boxes, row_dim)


class TsvRegionFeatures:
    """Lazy ``(N, R, W)`` float32 array over image rows of a VinVL/Oscar feature TSV.

    Each access reads and decodes only the rows asked for. ``part="features"`` exposes the
    first ``feature_dim`` values of every box, ``part="boxes"`` the remaining ones (the 6 box
    values in VinVL). Images with more than ``R = max_regions`` boxes keep the first R (as
    Oscar truncates to ``max_img_seq_length``); fewer are padded with all-zero regions.
    Indexing with an int gives ``(R, W)``; a slice, int list/array or bool mask gives
    ``(k, R, W)``; :meth:`subset` gives a lazy view of some images and :meth:`regions` the
    unpadded rows of one. Holds no open file, so it pickles into DataLoader workers.
    """

    dtype = np.dtype(np.float32)
    ndim = 3

    def __init__(self, path: str | Path, offsets: np.ndarray, keys: list[str], lines: np.ndarray,
                 row_dim: int, *, max_regions: int = 50, feature_dim: int = 2048,
                 part: str = "features") -> None:
        if part not in ("features", "boxes"):
            raise ValueError(f"part must be 'features' or 'boxes', got {part!r}")
        self.path = Path(path)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.keys = list(keys)
        self.lines = np.asarray(lines, dtype=np.int64)
        self.row_dim = int(row_dim)
        self.max_regions = int(max_regions)
        self.feature_dim = int(feature_dim)
        self.part = part
        width = self.feature_dim if part == "features" else self.row_dim - self.feature_dim
        self.shape = (len(self.offsets), self.max_regions, width)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"TsvRegionFeatures({str(self.path)!r}, part={self.part!r}, shape={self.shape})"

    @property
    def boxes(self) -> "TsvRegionFeatures | None":
        """The box part of the same rows (``None`` when rows hold features only)."""
        if self.row_dim == self.feature_dim:
            return None
        return self._with(np.arange(len(self)), part="boxes")

    def _with(self, idx: np.ndarray, part: str | None = None) -> "TsvRegionFeatures":
        return TsvRegionFeatures(self.path, self.offsets[idx], [self.keys[i] for i in idx], self.lines[idx],
                                 self.row_dim, max_regions=self.max_regions, feature_dim=self.feature_dim,
                                 part=part or self.part)

    def subset(self, indices: Iterable[int] | np.ndarray) -> "TsvRegionFeatures":
        """A lazy view of the given images (nothing is decoded)."""
        return self._with(self._normalize(np.asarray(indices)))

    def _normalize(self, idx: np.ndarray) -> np.ndarray:
        n = len(self)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} for {n} images")
            return np.flatnonzero(idx)
        if idx.size and idx.dtype.kind not in "iu":
            raise IndexError(f"image indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"image index out of range for {n} images")
        return np.where(idx < 0, idx + n, idx)

    def regions(self, i: int) -> np.ndarray:
        """Unpadded ``(num_boxes, W)`` rows of image ``i`` (not truncated to ``max_regions``)."""
        return self._read(self._normalize(np.asarray([i])), pad=False)[0]

    def _read(self, idx: np.ndarray, *, pad: bool = True) -> list[np.ndarray] | np.ndarray:
        r, width = self.max_regions, self.shape[2]
        lo = 0 if self.part == "features" else self.feature_dim
        out = np.zeros((len(idx), r, width), dtype=np.float32) if pad else []
        with open(self.path, "rb") as f:
            for k, i in enumerate(idx.tolist()):
                f.seek(int(self.offsets[i]))
                key, rows = _decode_row(f.readline(), self.path, int(self.lines[i]))
                if key != self.keys[i]:
                    raise DataError(f"{where(self.path, int(self.lines[i]))}expected image key {self.keys[i]!r}, "
                                    f"found {key!r} (stale .lineidx or imageid2idx.json?)")
                if rows.shape[0] and rows.shape[1] != self.row_dim:
                    raise DataError(f"{where(self.path, int(self.lines[i]))}key {key!r} has {rows.shape[1]} "
                                    f"values per box, other rows have {self.row_dim}")
                part = rows[:, lo:lo + width] if rows.shape[0] else np.zeros((0, width), np.float32)
                if pad:
                    n = min(len(part), r)
                    out[k, :n] = part[:n]
                else:
                    out.append(part.copy())
        return out

    def __getitem__(self, index: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        if isinstance(index, (int, np.integer)):
            arr = self._read(self._normalize(np.asarray([index])))[0]
            return arr[rest] if rest else arr
        if isinstance(index, slice):
            idx = np.arange(len(self))[index]
        else:
            idx = self._normalize(np.asarray(index))
        arr = self._read(idx)
        return arr[(slice(None), *rest)] if rest else arr

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[:]
        return arr.astype(dtype) if dtype is not None else arr


# indexing the TSV -------------------------------------------------------------------------
def _read_lineidx(path: Path, size: int) -> np.ndarray:
    offsets = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                off = int(line)
            except ValueError:
                raise DataError(f"{where(path, n)}expected a byte offset, got {line.strip()[:40]!r}") from None
            if not 0 <= off < size:
                raise DataError(f"{where(path, n)}offset {off} is outside the feature file ({size} bytes)")
            offsets.append(off)
    return np.asarray(offsets, dtype=np.int64)


def _first_column(f, offset: int) -> str:
    """The key (text before the first tab) of the line starting at ``offset``."""
    f.seek(offset)
    head = bytearray()
    while chunk := f.read(256):
        cuts = [p for p in (chunk.find(b"\t"), chunk.find(b"\n")) if p >= 0]
        if cuts:
            head += chunk[:min(cuts)]
            break
        head += chunk
    return head.decode("utf-8", "replace")


def index_tsv(path: Path) -> tuple[dict[str, int], np.ndarray]:
    """``(row of each key, byte offset of each row)`` of a feature TSV.

    Uses ``{stem}.lineidx`` and ``imageid2idx.json`` when present (no scan of the big file),
    else reads the file once.
    """
    size = path.stat().st_size
    lineidx = path.with_suffix(".lineidx")
    mapping = path.parent / "imageid2idx.json"
    if lineidx.is_file():
        offsets = _read_lineidx(lineidx, size)
        if mapping.is_file():
            raw = read_json(mapping)
            if not isinstance(raw, dict):
                raise DataError(f"{mapping}: expected a JSON object mapping image key to row number")
            row_of = {}
            for key, row in raw.items():
                if not isinstance(row, int) or not 0 <= row < len(offsets):
                    raise DataError(f"{where(mapping, field=str(key))}row {row!r} is not a line of {path.name} "
                                    f"(0..{len(offsets) - 1})")
                row_of[str(key)] = row
            return row_of, offsets
        row_of = {}
        with open(path, "rb") as f:
            for row, off in enumerate(offsets.tolist()):
                row_of.setdefault(_first_column(f, off), row)
        return row_of, offsets
    logger.info("%s: no %s beside it; scanning the file once to index its rows", path, lineidx.name)
    row_of, offsets, pos = {}, [], 0
    with open(path, "rb") as f, progress_bar(f"indexing {path.name}", size) as advance:
        for line in f:
            if line.strip():
                key = line.split(b"\t", 1)[0].rstrip(b"\r\n").decode("utf-8", "replace")
                if key in row_of:
                    raise DataError(f"{where(path, len(offsets) + 1)}image key {key!r} repeats line "
                                    f"{row_of[key] + 1}")
                row_of[key] = len(offsets)
                offsets.append(pos)
            pos += len(line)
            advance(len(line))
    return row_of, np.asarray(offsets, dtype=np.int64)


# captions ---------------------------------------------------------------------------------
def _caption_list(value: Any, path: Path, key: str) -> list[str]:
    if isinstance(value, str):  # Oscar sometimes stores each list JSON-encoded
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [value]
    if not isinstance(value, list):
        raise DataError(f"{where(path, field=key)}expected a list of captions, got {type(value).__name__}")
    out = []
    for j, cap in enumerate(value):
        if isinstance(cap, dict):
            cap = cap.get("caption")
        if not isinstance(cap, str) or not cap.strip():
            raise DataError(f"{where(path, field=f'{key}[{j}]')}expected a non-empty caption string")
        out.append(cap.strip())
    return out


def load_captions(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Image key -> ``[(text_id, caption), ...]`` in file order."""
    if path.suffix == ".pt":
        raise DataError(f"{path}: Oscar's .pt caption files are pickles and are not loaded (unsafe); "
                        "convert it once to JSON, see docs/data.md (vinvl)")
    out: dict[str, list[tuple[str, str]]] = {}
    if path.suffix == ".tsv":
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                key, sep, rest = line.decode("utf-8").rstrip("\r\n").partition("\t")
                if not sep:
                    raise DataError(f"{where(path, n)}expected 'img_key<TAB>[captions as JSON]'")
                try:
                    caps = _caption_list(json.loads(rest), path, key)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where(path, n)}invalid JSON: {exc.msg}") from None
                have = out.setdefault(key, [])
                base = len(have)
                have.extend((f"{key}#{base + j}", c) for j, c in enumerate(caps))
        return out
    data = read_json(path)
    if isinstance(data, dict) and "annotations" in data:
        data = data["annotations"]
    if isinstance(data, list):  # COCO annotations or [{"image_id", "caption"}]
        for n, ann in enumerate(data):
            if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
                raise DataError(f"{where(path, field=f'[{n}]')}expected an object with image_id and caption")
            key = str(ann["image_id"])
            caps = out.setdefault(key, [])
            text_id = str(ann["id"]) if "id" in ann else f"{key}#{len(caps)}"
            if not ann["caption"].strip():
                raise DataError(f"{where(path, field=f'[{n}].caption')}empty caption")
            caps.append((text_id, ann["caption"].strip()))
        return out
    if isinstance(data, dict):
        for key, value in data.items():
            out[str(key)] = [(f"{key}#{j}", c) for j, c in enumerate(_caption_list(value, path, str(key)))]
        return out
    raise DataError(f"{path}: expected {{img_key: [captions]}}, a COCO caption file or a list of "
                    "{image_id, caption} objects")


def _read_keys(path: Path) -> list[tuple[str, int]]:
    keys = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            key = line.decode("utf-8").strip().split("\t", 1)[0]
            if key:
                keys.append((key, n))
    if not keys:
        raise DataError(f"{path}: no image keys")
    return keys


def _resolve(data_dir: Path, value: str | Path | None, candidates: list[str], what: str) -> Path | None:
    if value is not None:
        p = Path(value) if Path(value).is_absolute() else data_dir / value
        if not p.is_file():
            raise DataError(f"{p}: {what} file not found")
        return p
    for name in candidates:
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def _box_width(tsv: Path, offsets: np.ndarray, rows: np.ndarray, probe: int = 16) -> tuple[int | None, int]:
    """Values per box, from the first of the split's rows that has any box (``None`` if none do)."""
    with open(tsv, "rb") as f:
        for row in rows[:probe].tolist():
            f.seek(int(offsets[row]))
            _, arr = _decode_row(f.readline(), tsv, row + 1)
            if arr.shape[0]:
                return arr.shape[1], row
    return None, int(rows[0])


def splits(path: str | Path) -> list[str]:
    """Splits with a caption file in the data folder."""
    folder = Path(path).parent if Path(path).is_file() else Path(path)
    names = set()
    for pattern, cut in (("*_captions.json", "_captions.json"), ("*_captions.pt", "_captions.pt"),
                         ("*.caption.tsv", ".caption.tsv")):
        names.update(p.name[: -len(cut)] for p in folder.glob(pattern))
    return sorted(names)


@DATASETS.register("vinvl")
def read(path: str | Path, split: str, *, features: str | Path | None = None,
         captions: str | Path | None = None, img_keys: str | Path | None = None,
         max_regions: int = 50, feature_dim: int = 2048, **unknown: Any) -> CrossModalDataset:
    """Read one split of VinVL/Oscar features + captions; region features stay on disk (lazy).

    ``path`` is the data folder (captions, key lists) or the feature TSV itself. ``features``,
    ``captions`` and ``img_keys`` override the default files (relative to the data folder):
    ``features.tsv``, ``{split}_captions.json`` (or ``{split}.caption.tsv``) and
    ``{split}_img_keys.tsv`` (all captioned images when absent).
    """
    check_options("vinvl", unknown, _OPTIONS)
    max_regions = int_option("vinvl", "max_regions", max_regions)
    feature_dim = int_option("vinvl", "feature_dim", feature_dim)
    path = Path(path)
    if path.is_file():
        data_dir, tsv = path.parent, path
    else:
        data_dir = path
        tsv = _resolve(data_dir, features, ["features.tsv"], "features")
        if tsv is None:
            raise DataError(f"{data_dir}: no features.tsv; pass the feature file with the 'features' option")
    cap_file = _resolve(data_dir, captions, [f"{split}_captions.json", f"{split}.caption.tsv",
                                             f"{split}_caption.json"], "captions")
    if cap_file is None:
        pt = data_dir / f"{split}_captions.pt"
        if pt.is_file():
            load_captions(pt)  # raises the conversion hint
        raise DataError(f"{data_dir}: no captions for split {split!r} ({split}_captions.json); "
                        f"splits present: {', '.join(splits(data_dir)) or '(none)'}")
    caps = load_captions(cap_file)
    key_file = _resolve(data_dir, img_keys, [f"{split}_img_keys.tsv"], "img_keys")
    keys = _read_keys(key_file) if key_file else [(k, None) for k in caps]

    row_of, offsets = index_tsv(tsv)
    image_rows, image_ids, text_ids, texts, text_to_image = [], [], [], [], []
    seen: set[str] = set()
    for key, line in keys:
        if key in seen:
            raise DataError(f"{where(key_file, line)}image key {key!r} is listed twice")
        seen.add(key)
        if key not in caps:
            raise DataError(f"{where(key_file, line)}image key {key!r} has no captions in {cap_file.name}")
        if key not in row_of:
            src = where(key_file, line) if key_file else where(cap_file, field=key)
            raise DataError(f"{src}image key {key!r} is not in {tsv}")
        i = len(image_ids)
        image_ids.append(key)
        image_rows.append(row_of[key])
        for tid, cap in caps[key]:
            text_ids.append(tid)
            texts.append(cap)
            text_to_image.append(i)
    if not image_ids:
        raise DataError(f"{cap_file}: no images")
    rows = np.asarray(image_rows, dtype=np.int64)
    row_dim, row = _box_width(tsv, offsets, rows)
    if row_dim is None:
        row_dim = feature_dim  # no boxes in the first rows; assume features only
    elif row_dim < feature_dim:
        raise DataError(f"{where(tsv, row + 1)}boxes have {row_dim} values, fewer than feature_dim={feature_dim}")
    feats = TsvRegionFeatures(tsv, offsets[rows], image_ids, rows + 1, row_dim,
                              max_regions=max_regions, feature_dim=feature_dim)
    return CrossModalDataset(
        name=data_dir.name,
        split=split,
        image_ids=image_ids,
        text_ids=text_ids,
        captions=texts,
        gt=GroundTruth.from_map(np.asarray(text_to_image, dtype=np.int64), len(image_ids)),
        image_features=feats,
        image_boxes=feats.boxes,
        root=data_dir,
        meta={"format": "vinvl", "features": str(tsv), "captions": str(cap_file),
              "img_keys": str(key_file) if key_file else None, "row_dim": row_dim},
    )
