"""Karpathy split files: ``dataset_coco.json``, ``dataset_flickr30k.json``, ``dataset_flickr8k.json``.

Each file is ``{"dataset": ..., "images": [{"filepath"?, "filename", "imgid", "split",
"sentences": [{"raw", "tokens", "sentid"}], "sentids", "cocoid"?}]}`` with ``split`` one of
train / val / test / restval (restval: COCO only). Images are read from an image root
(``filepath/filename`` for COCO, ``filename`` for Flickr); texts are the ``raw`` sentences.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError, where
from .base import DATASETS, CrossModalDataset, GroundTruth
from .table import bool_option, check_options, int_option, read_json, resolve_root

logger = logging.getLogger(__name__)

_OPTIONS = ("image_root", "restval_in_train", "max_captions_per_image")
_SPLIT_ALIASES = {"dev": "val"}


def find_json(path: Path) -> Path:
    """``path`` itself, or the one ``dataset_*.json`` inside the folder ``path``."""
    if path.is_file():
        return path
    found = sorted(path.glob("dataset_*.json")) if path.is_dir() else []
    if len(found) != 1:
        what = ", ".join(p.name for p in found) if found else "none"
        raise DataError(f"{path}: expected exactly one dataset_*.json in the folder, found {what}; "
                        "pass the JSON file itself")
    return found[0]


def _images(path: Path) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{where(path, field='images')}expected a JSON object with an 'images' list "
                        "(Karpathy split format)")
    return data["images"]


def _get(obj: Any, key: str, kind: type | tuple[type, ...], path: Path, field: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where(path, field=field)}missing")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where(path, field=field)}expected {getattr(kind, '__name__', kind)}, "
                        f"got {type(value).__name__}")
    return value


def splits(path: str | Path) -> list[str]:
    """Split names used in the file."""
    file = find_json(Path(path))
    return sorted({str(im.get("split")) for im in _images(file) if isinstance(im, dict) and "split" in im})


@DATASETS.register("karpathy")
def read(path: str | Path, split: str, *, image_root: str | Path | None = None,
         restval_in_train: bool = True, max_captions_per_image: int | None = None,
         **unknown: Any) -> CrossModalDataset:
    """Read one split of a Karpathy ``dataset_*.json`` (the file, or a folder holding one).

    ``split="train"`` includes the COCO ``restval`` images when ``restval_in_train`` (as
    VSE++ does); ``"dev"`` is an alias of ``"val"``. ``max_captions_per_image`` keeps the
    first k sentences per image (the SCAN/VSE++ COCO protocol uses 5).
    """
    check_options("karpathy", unknown, _OPTIONS)
    file = find_json(Path(path))
    restval_in_train = bool_option("karpathy", "restval_in_train", restval_in_train)
    if max_captions_per_image is not None:
        max_captions_per_image = int_option("karpathy", "max_captions_per_image", max_captions_per_image)
    wanted = {_SPLIT_ALIASES.get(split, split)}
    if split == "train" and restval_in_train:
        wanted.add("restval")

    images = _images(file)
    image_ids: list[str] = []
    image_paths: list[str] = []
    text_ids: list[str] = []
    captions: list[str] = []
    text_to_image: list[int] = []
    seen: dict[str, int] = {}
    present: set[str] = set()
    for n, im in enumerate(images):
        f = f"images[{n}]"
        im_split = _get(im, "split", str, file, f"{f}.split")
        present.add(im_split)
        if im_split not in wanted:
            continue
        filename = _get(im, "filename", str, file, f"{f}.filename")
        rel = f"{im['filepath']}/{filename}" if im.get("filepath") else filename
        image_id = str(im["cocoid"]) if "cocoid" in im else Path(filename).stem
        if image_id in seen:
            raise DataError(f"{where(file, field=f)}image id {image_id!r} also used by images[{seen[image_id]}]")
        seen[image_id] = n
        sentences = _get(im, "sentences", list, file, f"{f}.sentences")
        if max_captions_per_image is not None:
            sentences = sentences[:max_captions_per_image]
        i = len(image_ids)
        image_ids.append(image_id)
        image_paths.append(rel)
        for j, sent in enumerate(sentences):
            raw = _get(sent, "raw", str, file, f"{f}.sentences[{j}].raw").strip()
            if not raw:
                raise DataError(f"{where(file, field=f'{f}.sentences[{j}].raw')}empty sentence")
            sentid = sent.get("sentid")
            text_ids.append(str(sentid) if sentid is not None else f"{image_id}#{j}")
            captions.append(raw)
            text_to_image.append(i)
    if not image_ids:
        have = ", ".join(sorted(present)) or "(none)"
        raise DataError(f"{file}: no images in split {split!r}; splits present: {have}")

    root = resolve_root(image_root, file.parent)
    data_name = file.stem[len("dataset_"):] if file.stem.startswith("dataset_") else file.stem
    return CrossModalDataset(
        name=data_name,
        split=split,
        image_ids=image_ids,
        text_ids=text_ids,
        captions=captions,
        gt=GroundTruth.from_map(np.asarray(text_to_image, dtype=np.int64), len(image_ids)),
        image_paths=image_paths,
        root=root,
        meta={"format": "karpathy", "source": str(file), "splits": sorted(wanted)},
    )
