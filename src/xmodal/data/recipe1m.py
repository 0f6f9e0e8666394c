"""Recipe1M: ``layer1.json`` (recipes) + ``layer2.json`` (their images).

layer1: ``[{"id", "title", "ingredients": [{"text"}], "instructions": [{"text"}],
"partition": "train"|"val"|"test", "url"}]``; layer2: ``[{"id", "images": [{"id", "url"}]}]``.
Images live under ``{root}/{partition}/{a}/{b}/{c}/{d}/{image_id}`` where ``a..d`` are the
first four characters of the image id (the released Recipe1M layout).

Texts are recipes (one per recipe): ``caption`` is the title, ``fields`` hold the title,
the ingredients and the instructions (list items joined with newlines). Recipes without any
image are dropped, as im2recipe does.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError, where
from .base import DATASETS, CrossModalDataset, GroundTruth
from .jsonstream import iter_json_array
from .table import bool_option, check_options, resolve_root

logger = logging.getLogger(__name__)

_OPTIONS = ("image_root", "layer1", "layer2", "first_image_only")
_SPLIT_ALIASES = {"dev": "val"}


def image_relpath(partition: str, image_id: str) -> str:
    """Path of an image inside the Recipe1M image root, e.g. ``val/e/f/3/d/ef3dc0de11.jpg``."""
    return "/".join([partition, *image_id[:4], image_id])


def _layer_paths(path: Path, layer1: str | Path, layer2: str | Path) -> tuple[Path, Path]:
    folder = path.parent if path.is_file() else path
    l1 = path if path.is_file() else folder / layer1
    l2 = Path(layer2) if Path(layer2).is_absolute() else folder / layer2
    for p in (l1, l2):
        if not p.is_file():
            raise DataError(f"{p}: not found (Recipe1M needs layer1.json and layer2.json)")
    return l1, l2


def _items(obj: Any, key: str, path: Path, field: str) -> list[str]:
    """The ``text`` of each entry of a list such as ``ingredients``."""
    value = obj.get(key)
    if not isinstance(value, list):
        raise DataError(f"{where(path, field=f'{field}.{key}')}expected a list of {{'text': ...}} objects")
    out = []
    for j, item in enumerate(value):
        text = item.get("text") if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{where(path, field=f'{field}.{key}[{j}].text')}expected a string")
        out.append(text.strip())
    return out


def _load_layer(path: Path) -> Iterator[Any]:
    """The layer's entries one at a time: the file is streamed, never parsed whole (a
    full-size layer1.json is 1.7 GB; parsed whole it took 9.9 GB, streamed the partition read
    keeps only its own recipes)."""
    return iter_json_array(path)


def splits(path: str | Path, *, layer1: str = "layer1.json") -> list[str]:
    """Partitions used in layer1."""
    l1 = Path(path) if Path(path).is_file() else Path(path) / layer1
    return sorted({str(r.get("partition")) for r in _load_layer(l1) if isinstance(r, dict)})


@DATASETS.register("recipe1m")
def read(path: str | Path, split: str, *, image_root: str | Path | None = None,
         layer1: str | Path = "layer1.json", layer2: str | Path = "layer2.json",
         first_image_only: bool = False, **unknown: Any) -> CrossModalDataset:
    """Read the recipes of one partition with their images.

    ``path`` is the folder with the layer files (or layer1.json itself). ``layer2`` may name
    Recipe1M+'s ``layer2+.json``. ``first_image_only`` keeps each recipe's first image only,
    the pairing im2recipe evaluates on.
    """
    check_options("recipe1m", unknown, _OPTIONS)
    first_image_only = bool_option("recipe1m", "first_image_only", first_image_only)
    l1, l2 = _layer_paths(Path(path), layer1, layer2)
    partition = _SPLIT_ALIASES.get(split, split)

    images_of = _read_images_of(l2)
    r = _read_recipes(l1, partition, images_of, first_image_only)
    if not r.text_ids:
        have = ", ".join(sorted(r.present)) or "(none)"
        raise DataError(f"{l1}: no recipes with images in partition {partition!r}; partitions present: {have}")
    if r.dropped:
        logger.info("recipe1m/%s: dropped %d recipes without images (kept %d)", partition, r.dropped,
                    len(r.text_ids))

    root = resolve_root(image_root, l1.parent)
    return CrossModalDataset(
        name="recipe1m",
        split=split,
        image_ids=r.image_ids,
        text_ids=r.text_ids,
        captions=r.titles,
        gt=GroundTruth.from_pairs(r.pairs_t, r.pairs_i, len(r.text_ids), len(r.image_ids)),
        image_paths=r.image_paths,
        fields={"title": list(r.titles), "ingredients": r.ingredients, "instructions": r.instructions},
        root=root,
        meta={"format": "recipe1m", "layer1": str(l1), "layer2": str(l2), "dropped_without_images": r.dropped},
    )


def _read_images_of(l2: Path) -> dict[str, list[str]]:
    """Recipe id -> its image file names, from layer2."""
    images_of: dict[str, list[str]] = {}
    for n, entry in enumerate(_load_layer(l2)):
        f = f"[{n}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise DataError(f"{where(l2, field=f + '.id')}expected an object with a string 'id'")
        imgs = entry.get("images")
        if not isinstance(imgs, list):
            raise DataError(f"{where(l2, field=f + '.images')}expected a list")
        ids = []
        for j, im in enumerate(imgs):
            if not isinstance(im, dict) or not isinstance(im.get("id"), str) or len(im["id"]) < 5:
                raise DataError(f"{where(l2, field=f'{f}.images[{j}].id')}expected an image file name such as "
                                "'ef3dc0de11.jpg'")
            ids.append(im["id"])
        images_of.setdefault(entry["id"], []).extend(ids)
    return images_of


@dataclasses.dataclass
class _Recipes:
    """The recipes of one partition that have images, their images and pairs, as read from layer1."""

    image_index: dict[str, int] = dataclasses.field(default_factory=dict)
    image_ids: list[str] = dataclasses.field(default_factory=list)
    image_paths: list[str] = dataclasses.field(default_factory=list)
    text_ids: list[str] = dataclasses.field(default_factory=list)
    titles: list[str] = dataclasses.field(default_factory=list)
    ingredients: list[str] = dataclasses.field(default_factory=list)
    instructions: list[str] = dataclasses.field(default_factory=list)
    pairs_t: list[int] = dataclasses.field(default_factory=list)
    pairs_i: list[int] = dataclasses.field(default_factory=list)
    present: set[str] = dataclasses.field(default_factory=set)
    dropped: int = 0


def _read_recipes(l1: Path, partition: str, images_of: dict[str, list[str]],
                  first_image_only: bool) -> _Recipes:
    """The recipes of ``partition`` in layer1 that have images (others counted as dropped)."""
    r = _Recipes()
    for n, rec in enumerate(_load_layer(l1)):
        f = f"[{n}]"
        if not isinstance(rec, dict):
            raise DataError(f"{where(l1, field=f)}expected a recipe object")
        part = rec.get("partition")
        if not isinstance(part, str):
            raise DataError(f"{where(l1, field=f + '.partition')}expected 'train', 'val' or 'test'")
        r.present.add(part)
        if part != partition:
            continue
        rid = rec.get("id")
        if not isinstance(rid, str) or not rid:
            raise DataError(f"{where(l1, field=f + '.id')}expected a string recipe id")
        imgs = images_of.get(rid, [])
        if not imgs:
            r.dropped += 1
            continue
        title = rec.get("title")
        if not isinstance(title, str):
            raise DataError(f"{where(l1, field=f + '.title')}expected a string")
        t = len(r.text_ids)
        r.text_ids.append(rid)
        r.titles.append(title.strip())
        r.ingredients.append("\n".join(_items(rec, "ingredients", l1, f)))
        r.instructions.append("\n".join(_items(rec, "instructions", l1, f)))
        for img in imgs[:1] if first_image_only else imgs:
            i = r.image_index.get(img)
            if i is None:
                i = r.image_index[img] = len(r.image_ids)
                r.image_ids.append(img)
                r.image_paths.append(image_relpath(part, img))
            r.pairs_t.append(t)
            r.pairs_i.append(i)
    return r
