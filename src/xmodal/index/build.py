"""Index building: encode one side of a collection with a trained run into an :class:`Index`.

The library behind ``xmodal index``:

* :func:`build_index` encodes a split of the run's dataset, any ``FORMAT:PATH[:SPLIT]``
  dataset, or a folder of images into an index folder whose ``model_ref`` says which run,
  checkpoint, config and weights made the vectors.
* :func:`load_index_run` rebuilds that run (refusing one whose config or weights changed).

Only a model's ``encode_image`` / ``encode_text`` are used, so any :class:`EmbeddingScorer` works.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import ConfigError, DataError, XmodalError, where
from ..models.base import EmbeddingScorer, PairScorer, pixel_tower
from ..models.run import Run, checkpoint_dir, load, sha256_file
from ..progress import track
from .exact import list_backends
from .store import Index

log = logging.getLogger(__name__)

#: Suffixes indexed from a folder of images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


# ---------------------------------------------------------------------------------------------
# model reference


def model_ref(run: str | os.PathLike, checkpoint: str = "best") -> dict[str, Any]:
    """What identifies the vectors a run makes: absolute run path, checkpoint, config and weight hashes.

    ``checkpoint="latest"`` is resolved to the absolute folder of the current latest step,
    so that a run that keeps training does not silently change the model behind an index.
    """
    run = Path(run).resolve()
    ck = checkpoint_dir(run, checkpoint)
    weights = ck / "model.safetensors"
    config = run / "config.yaml" if (run / "config.yaml").is_file() else ck / "config.yaml"
    if not weights.is_file() or not config.is_file():
        raise XmodalError(f"{where(run)}no {checkpoint!r} checkpoint with model.safetensors and "
                          "config.yaml (is this an xmodal run folder?)")
    return {"run": str(run), "checkpoint": checkpoint if checkpoint == "best" else str(ck.resolve()),
            "config_hash": sha256_file(config), "weights_sha256": sha256_file(weights)}


def same_model(a: dict[str, Any] | None, b: dict[str, Any]) -> str | None:
    """None when ``a`` and ``b`` name the same model, else which field differs."""
    if a is None:
        return "model_ref (the index records none)"
    for key in ("run", "checkpoint", "config_hash", "weights_sha256"):
        if a.get(key) != b.get(key):
            return key
    return None


def check_embedding_model(run: Any) -> Any:
    """Refuse runs (or models) whose scores cannot be indexed (pair scorers without vectors)."""
    model = run.model if isinstance(run, Run) else run
    if isinstance(model, PairScorer) and not isinstance(model, EmbeddingScorer):
        raise ConfigError(f"{type(model).__name__} is a pair scorer: its scores need both sides at once, "
                          "so it has no vectors to index. Index with an embedding model (e.g. a dual "
                          "encoder) and re-rank its shortlist with the pair scorer")
    if not isinstance(model, EmbeddingScorer):
        raise ConfigError(f"{type(model).__name__} is not an embedding scorer (no encode_image/encode_text)")
    return run


def load_index_run(index: Index, run: str | os.PathLike | None = None) -> Run:
    """The run that made ``index``'s vectors, from its ``model_ref`` (or ``run``, if moved).

    Raises :class:`XmodalError` when the run is gone or its config / weights no longer match.
    """
    ref = index.model_ref
    if ref is None or "run" not in ref:
        if run is None:
            raise XmodalError(f"{where(index.path)}the index records no model (built with the library "
                              "without model_ref?); pass the run folder with --run")
        ref = {"run": str(run), "checkpoint": "best"}
        current = model_ref(run, "best")
    else:
        src = Path(run) if run is not None else Path(ref["run"])
        ck = ref.get("checkpoint", "best")
        if not src.is_dir():
            raise XmodalError(f"{where(src)}the run folder that built {index.path} is missing (moved?); "
                              "pass its new location with --run")
        current = model_ref(src, ck)
        for key in ("config_hash", "weights_sha256"):
            if key in ref and ref[key] != current[key]:
                what = "config.yaml" if key == "config_hash" else "weights"
                raise XmodalError(f"{where(index.path)}the run {src} has different {what} than when the index "
                                  "was built; rebuild the index with xmodal index")
    return check_embedding_model(load(current["run"], checkpoint=current["checkpoint"]))


# ---------------------------------------------------------------------------------------------
# data specs


@dataclass(frozen=True)
class DataSpec:
    """Parsed ``--data``: ``kind`` is ``split`` (of the run's dataset), ``dataset`` or ``folder``."""

    kind: str
    path: str = ""
    format: str = ""
    split: str = ""

    def describe(self) -> str:
        if self.kind == "folder":
            return f"folder {self.path}"
        if self.kind == "split":
            return f"split {self.split} of the run's dataset"
        return f"{self.format}:{self.path} split {self.split}"


def parse_data_spec(spec: str, default_split: str = "test") -> DataSpec:
    """``split:NAME``, ``FORMAT:PATH[:SPLIT]`` or a folder of images."""
    from ..data.base import list_formats

    if not spec or not spec.strip():
        raise ConfigError("--data is empty: give split:NAME, FORMAT:PATH[:SPLIT] or a folder of images")
    head, sep, rest = spec.partition(":")
    if sep and head == "split":
        if not rest:
            raise ConfigError(f"--data {spec!r}: split:NAME needs a split name (e.g. split:test)")
        return DataSpec("split", split=rest)
    if sep and head in list_formats():
        if not rest:
            raise ConfigError(f"--data {spec!r}: {head}:PATH[:SPLIT] needs a path")
        path, split = rest, default_split
        # ``PATH:SPLIT`` unless the whole rest names an existing file (a path with a colon)
        if ":" in rest and not Path(rest).exists():
            path, split = rest.rsplit(":", 1)
            if not split:
                raise ConfigError(f"--data {spec!r}: empty split after the last ':'")
        return DataSpec("dataset", path=path, format=head, split=split)
    if Path(spec).is_dir():
        return DataSpec("folder", path=spec)
    if Path(spec).exists():
        raise ConfigError(f"--data {spec!r}: a file; give FORMAT:{spec}[:SPLIT] (formats: "
                          f"{', '.join(list_formats())}), split:NAME or a folder of images")
    raise ConfigError(f"--data {spec!r}: no such folder, and not split:NAME or FORMAT:PATH[:SPLIT] "
                      f"(formats: {', '.join(list_formats())})")


def list_image_files(folder: Path) -> list[Path]:
    """Every image file (by suffix) under ``folder``, sorted by relative path."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


# ---------------------------------------------------------------------------------------------
# building an index


@dataclass
class BuildResult:
    path: Path
    modality: str
    added: int
    total: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def dataset_for(cfg: Any, spec: DataSpec, lang: str | None) -> tuple[Any, Any]:
    """(config whose ``data`` points at the spec's dataset, loaded split)."""
    from ..data.pipeline import load_split

    if spec.kind == "split":
        return cfg, load_split(cfg, spec.split, lang)
    # another dataset: the run's reader options only carry over to the same format
    options = dict(cfg.data.options) if spec.format == cfg.data.format else {}
    data = dataclasses.replace(cfg.data, format=spec.format, path=spec.path, options=options, train_options={})
    cfg2 = dataclasses.replace(cfg, data=data)
    return cfg2, load_split(cfg2, spec.split, lang)


def _batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(n, start + batch_size))


def _encode_dataset(model: Any, cfg: Any, spec: DataSpec, modality: str, lang: str | None,
                    batch_size: int, id_prefix: str, progress: bool) -> Iterator[tuple[torch.Tensor, list, list]]:
    from ..data.pipeline import head_inputs, image_inputs, text_inputs

    cfg2, ds = dataset_for(cfg, spec, lang)
    img_in, txt_in = head_inputs(cfg2, model)
    base = {"dataset": ds.name, "split": spec.split}
    if modality == "image":
        ds, inputs = image_inputs(cfg2, model, ds, img_in, progress)
        n, encode = ds.num_images, model.encode_image
    else:
        inputs = text_inputs(cfg2, model, ds, txt_in, progress)
        n, encode = ds.num_texts, model.encode_text
    if n == 0:
        raise DataError(f"{spec.describe()}: no {modality}s to index")
    captions = ImageCaptions(ds) if modality == "image" else None
    for idx in track(_batches(n, batch_size), f"encoding {modality}s", total=-(-n // batch_size), enabled=progress):
        vecs = encode(inputs(idx, "cpu")).float()  # (B, D)
        ids, meta = item_records(ds, idx, modality, base, id_prefix, captions)
        yield vecs, ids, meta


#: At most this many captions are stored with each indexed image, each cut to
#: :data:`MAX_CAPTION_CHARS` characters (with an ellipsis): enough to name it in search results.
MAX_IMAGE_CAPTIONS = 5
MAX_CAPTION_CHARS = 200


def short_caption(text: str, limit: int = MAX_CAPTION_CHARS) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters with "…"."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


class ImageCaptions:
    """For each image of a dataset, up to :data:`MAX_IMAGE_CAPTIONS` of its captions: the texts
    whose ground-truth positives include it, the most specific first (texts with fewer images,
    then dataset order). For the emoji dataset they are its names (labels) in the indexed
    language(s). Built once per dataset (one transpose of the ground truth)."""

    def __init__(self, ds: Any, limit: int = MAX_IMAGE_CAPTIONS) -> None:
        gt = ds.gt
        t, i = gt.pairs()  # (nnz,) each
        order = np.lexsort((t, gt.counts()[t], i))  # by image, then fewer positives, then text order
        self._texts = t[order]
        self._starts = np.searchsorted(i[order], np.arange(gt.num_images + 1))  # (N + 1,)
        self._captions = ds.captions
        self.limit = limit

    def __call__(self, image: int) -> list[str]:
        lo, hi = int(self._starts[image]), int(self._starts[image + 1])
        out: list[str] = []
        for t in self._texts[lo:hi].tolist():
            cap = short_caption(self._captions[t])
            if cap and cap not in out:
                out.append(cap)
                if len(out) == self.limit:
                    break
        return out


def item_records(ds: Any, idx: np.ndarray, modality: str, base: dict, id_prefix: str,
                 captions: ImageCaptions | None = None) -> tuple[list, list]:
    """Ids and metadata that an index stores for dataset items ``idx`` (images: id, path and
    ``captions``, see :class:`ImageCaptions`; captions: id, text and the ids of their images).

    ``captions``: the dataset's :class:`ImageCaptions` (pass it when calling batch by batch;
    built here otherwise)."""
    ids, meta = [], []
    if modality == "image" and captions is None:
        captions = ImageCaptions(ds)
    for i in idx.tolist():
        if modality == "image":
            m = {**base, "image_id": ds.image_ids[i]}
            if ds.image_paths is not None:
                m["path"] = str(ds.image_path(i))
            caps = captions(i)
            if caps:
                m["captions"] = caps
            ids.append(f"{id_prefix}{ds.image_ids[i]}")
        else:
            m = {**base, "text_id": ds.text_ids[i], "caption": ds.captions[i],
                 "image_ids": [ds.image_ids[j] for j in ds.gt.images_of(i).tolist()]}
            ids.append(f"{id_prefix}{ds.text_ids[i]}")
        meta.append(m)
    return ids, meta


def _encode_folder(model: Any, folder: Path, batch_size: int, id_prefix: str, progress: bool,
                   skipped: list[dict[str, str]]) -> Iterator[tuple[torch.Tensor, list, list]]:

    tower = pixel_tower(model, f"indexing the image folder {folder}")
    files = list_image_files(folder)
    if not files:
        raise DataError(f"{where(folder)}no images ({', '.join(IMAGE_SUFFIXES)}) under this folder")
    for idx in track(_batches(len(files), batch_size), "encoding images", total=-(-len(files) // batch_size),
                     enabled=progress):
        pixels, ids, meta = folder_images([files[i] for i in idx.tolist()], folder, tower, id_prefix, skipped)
        if pixels:
            yield model.encode_image(torch.stack(pixels)).float(), ids, meta  # (B, 3, H, W) -> (B, D)


def folder_images(paths: list[Path], folder: Path, tower: Any, id_prefix: str,
                  skipped: list[dict[str, str]]) -> tuple[list[torch.Tensor], list[str], list[dict]]:
    """Preprocessed pixels, ids (path under ``folder``) and metadata of image files; an
    unreadable file is logged and recorded in ``skipped`` instead."""
    from ..data.images import ImageLoadError, open_image

    pixels, ids, meta = [], [], []
    for path in paths:
        try:
            img = open_image(path)
        except ImageLoadError as e:
            log.warning("skipping %s: %s", e.path, e.reason)
            skipped.append({"path": e.path, "reason": e.reason})
            continue
        pixels.append(tower.preprocess(img))
        ids.append(f"{id_prefix}{path.relative_to(folder).as_posix()}")
        meta.append({"path": str(path.resolve()), "folder": str(folder.resolve())})
    return pixels, ids, meta


def check_build_args(data: "str | DataSpec", modality: str, batch_size: Any, backend: str | None) -> "DataSpec":
    """Validate what an index build is asked for; returns the parsed data spec."""
    if modality not in ("image", "text"):
        raise ConfigError(f"modality={modality!r}: choose image or text")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: must be a positive integer")
    if backend is not None and backend not in list_backends():
        raise ConfigError(f"--backend {backend!r}: choose one of {', '.join(list_backends())}")
    spec = parse_data_spec(data) if isinstance(data, str) else data
    if spec.kind == "folder" and modality == "text":
        raise ConfigError(f"--data {spec.path}: a folder of images has no captions; use --modality image")
    return spec


@torch.inference_mode()
def build_index(run: str | os.PathLike, data: str | DataSpec, out: str | os.PathLike, *,
                modality: str = "image", backend: str | None = None, add: bool = False,
                batch_size: int = 256, checkpoint: str = "best", lang: str | None = None,
                id_prefix: str | None = None, dtype: str = "float32", progress: bool = False) -> BuildResult:
    """Encode a collection with ``run``'s model into the index folder ``out``.

    ``data``: ``split:NAME``, ``FORMAT:PATH[:SPLIT]`` or a folder of images (see
    :func:`parse_data_spec`). ``modality="image"`` indexes images (for text queries),
    ``"text"`` the captions (for image queries). Dataset items get ids ``SPLIT/ITEM_ID`` (so
    splits can share an index), folder images their path relative to the folder; ``id_prefix``
    replaces that prefix. ``add=True`` appends to an existing index built by the same model.
    """
    t0 = time.perf_counter()
    spec = check_build_args(data, modality, batch_size, backend)
    out = Path(out)
    ref = model_ref(run, checkpoint)

    index: Index | None = None
    if add:
        index = Index.open(out, progress=progress)
        diff = same_model(index.model_ref, ref)
        if diff is not None:
            raise XmodalError(f"{where(out)}built by another model ({diff} differs: index has "
                              f"{(index.model_ref or {}).get(diff.split()[0])!r}); vectors of two models "
                              "cannot share an index")
        if index.modality != modality:
            raise XmodalError(f"{where(out)}is a {index.modality} index; cannot --add {modality}s to it")
        if backend is not None and backend != index.backend:
            raise XmodalError(f"{where(out)}uses the {index.backend!r} backend; --add keeps it (got --backend {backend})")
    elif (out / "manifest.json").exists():
        raise XmodalError(f"{where(out)}an index already exists here; pass --add to append to it, or choose another --out")

    run_ = check_embedding_model(load(ref["run"], checkpoint=ref["checkpoint"]))
    model, cfg = run_.model, run_.config
    if spec.kind == "folder":
        prefix = id_prefix or ""
    else:
        prefix = f"{spec.split}/" if id_prefix is None else id_prefix
    skipped: list[dict[str, str]] = []
    if spec.kind == "folder":
        chunks = _encode_folder(model, Path(spec.path), batch_size, prefix, progress, skipped)
    else:
        chunks = _encode_dataset(model, cfg, spec, modality, lang or cfg.data.eval_lang, batch_size, prefix, progress)
    added = 0
    for vecs, ids, meta in chunks:
        if index is None:
            index = Index.create(out, dim=vecs.shape[1], backend=backend or "exact", modality=modality,
                                 model_ref=ref, dtype=dtype, progress=progress)
        index.add(vecs.numpy(), ids, meta)
        added += len(ids)
    if index is None or added == 0:
        raise DataError(f"{spec.describe()}: nothing could be indexed ({len(skipped)} unreadable images)")
    index.commit()
    return BuildResult(out, modality, added, len(index), skipped, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------


#: how the emoji dataset's virtual image paths (``<asset folder>/emoji:/<style>/<unified>``)
#: appear in index metadata
EMOJI_MARK = "emoji:/"


def open_indexed_image(path: str) -> Any:
    """The image an index row's ``path`` names: a file, or an emoji of the packaged dataset."""
    if EMOJI_MARK in path:
        from ..data import emoji

        asset, _, image_id = path.partition(EMOJI_MARK)
        return emoji.open_uri(emoji.URI_SCHEME + image_id, asset.rstrip("/\\") or "emoji")
    from ..data.images import open_image

    return open_image(Path(path))
