"""Turn a config + model into per-split inputs: datasets, cached frozen-tower outputs.

Shared by training, ``xmodal eval`` and the demo, so that a split is prepared the same way
everywhere. Frozen pixel towers go through the feature cache (:mod:`xmodal.data.features`);
frozen text towers are run once over the captions and cached too.

Three ``data.train_options`` keys shape the training texts instead of going to the reader:
``translations`` (a translations file, or a list; see :mod:`xmodal.data.translations`)
adds every translated / back-translated row as another version of its source text;
``translation_langs`` keeps only the listed file languages; ``sample_lang: true`` makes each
training sample one group of versions (same positive images) from which every step draws
one language, then one text (X-MRS multilingual training; :class:`.data.BatchOrder`);
``lang_weights`` (e.g. ``{en: 4}``) weighs languages in that draw (others weigh 1).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import CrossModalDataset, load_dataset
from ..errors import ConfigError, DataError
from ..models.base import TowerOutput
from ..utils import cache_dir
from .inputs import CachedOutputs, FeatureRows, FieldTexts, GroupedGroundTruth, PixelImages, RawTexts

log = logging.getLogger(__name__)


@dataclass
class SplitInputs:
    dataset: CrossModalDataset
    images: Any  # callable idx -> model image input
    texts: Any  # callable idx -> model text input


def cache_root() -> Path:
    """The frozen-tower caches' root (``features/``, ``text/``): :func:`xmodal.utils.cache_dir`,
    i.e. ``$XMODAL_CACHE``, else ``$XDG_CACHE_HOME/xmodal``, else ``~/.cache/xmodal``."""
    return cache_dir()


def resolve_data_path(fmt: str, path: str) -> str:
    if fmt == "emoji" and path in ("emoji", "", "default"):
        from .emoji import default_path

        return str(default_path())
    return path


#: ``data.train_options`` keys read here, not passed to the dataset reader
TRAIN_TEXT_OPTIONS = ("translations", "translation_langs", "sample_lang", "lang_weights")


def load_split(cfg, split: str, lang: str | None, training: bool = False) -> CrossModalDataset:
    d = cfg.data
    options = dict(d.options)
    text_opts: dict = {}
    if training:
        options.update(d.train_options)
        text_opts = {k: options.pop(k) for k in TRAIN_TEXT_OPTIONS if k in options}
    if d.format == "emoji":
        options.setdefault("lang", lang or "en")
    ds = load_dataset(d.format, resolve_data_path(d.format, d.path), split, **options)
    if d.format != "emoji" and lang not in (None, "any", "all"):
        if ds.langs is not None:
            ds = ds.filter_lang(lang)
    if text_opts.get("translations"):
        from .translations import load_and_augment

        langs = text_opts.get("translation_langs")
        ds = load_and_augment(ds, text_opts["translations"],
                              langs=[langs] if isinstance(langs, str) else langs)
    if training and d.train_holdout:
        folds, fold, seed = holdout_args(d.train_holdout)
        ds = ds.holdout(folds, fold, seed)
        log.info("%s/%s: fold %d of %d held out (seed %d): %d texts, %d images left", ds.name, ds.split,
                 fold, folds, seed, ds.num_texts, ds.num_images)
    return ds


def holdout_args(spec: Any, where: str = "data.train_holdout") -> tuple[int, int, int]:
    """``(folds, fold, seed)`` of a ``{folds: K, fold: f, seed: s}`` mapping, checked."""
    if not isinstance(spec, dict) or not {"folds", "fold"} <= set(spec) or set(spec) - {"folds", "fold", "seed"}:
        raise ConfigError(f"{where}: expected {{folds: K, fold: f, seed: s}} (seed optional), got {spec!r}")
    vals = {k: spec.get(k, 0) for k in ("folds", "fold", "seed")}
    for k, v in vals.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where}.{k}: expected an integer, got {v!r}")
    if vals["folds"] < 2 or not 0 <= vals["fold"] < vals["folds"]:
        raise ConfigError(f"{where}: expected folds >= 2 and 0 <= fold < folds, got {spec!r}")
    return vals["folds"], vals["fold"], vals["seed"]


def _sample_lang(cfg) -> bool:
    value = cfg.data.train_options.get("sample_lang", False)
    if not isinstance(value, bool):
        raise ConfigError(f"data.train_options.sample_lang: expected true/false, got {value!r}")
    return value


def _grouped(cfg, ds: CrossModalDataset) -> CrossModalDataset:
    """``ds`` whose ground truth knows the versions of each sample (``sample_lang``)."""
    weights = cfg.data.train_options.get("lang_weights")
    if weights is not None and not isinstance(weights, dict):
        raise ConfigError(f"data.train_options.lang_weights: expected a mapping such as {{en: 4}}, got {weights!r}")
    try:
        return replace(ds, gt=GroupedGroundTruth.of(ds.gt, ds.langs, weights))
    except DataError as exc:
        raise ConfigError(f"data.train_options.lang_weights: {exc}") from None


def training_samples(cfg, ds: CrossModalDataset) -> tuple[int, str]:
    """``(count, unit)``: how many samples a training epoch of ``ds`` draws batches from
    (:class:`.inputs.BatchOrder`): texts with an image, or text groups with ``sample_lang``."""
    if _sample_lang(cfg):
        return len(_grouped(cfg, ds).gt.groups.first_text()), "samples (text groups)"
    return int(np.count_nonzero(ds.gt.counts() > 0)), "texts"


def check_image_files(ds: CrossModalDataset) -> None:
    """Refuse a split whose image files are all missing (a wrong path or ``image_root``) before
    any extraction: it would read every one of them to skip them all. Splits with feature rows or
    packaged pixels, and splits where only some files are missing (skipped and reported by the
    extraction, or ``data.on_bad_image=fail``), pass."""
    paths = ds.image_paths
    if paths is None or ds.image_features is not None or ds.meta.get("pixels") is not None \
            or any(p is None for p in paths):
        return
    if not ds.num_images or any(ds.image_path(i).exists() for i in range(ds.num_images)):
        return
    hint = "the table's folder" if ds.meta.get("format") == "table" else "the dataset"
    raise DataError(f"{ds.name}/{ds.split}: none of its {ds.num_images} image files exists (first: "
                    f"{ds.image_path(0)}); image paths are relative to {hint} unless absolute, or to "
                    "data.options.image_root if the format takes one")


def _tower_spec(tcfg, tower=None) -> dict:
    """What a frozen tower's cached outputs depend on: its config, and its weights unless they
    all come from the files the config names (a frozen tower with random parts)."""
    spec = {"name": tcfg.name, "args": tcfg.args}
    if tower is not None and not getattr(tower, "rebuilt_from_source", lambda: False)():
        h = hashlib.sha256()
        for k, v in sorted(tower.state_dict().items()):
            h.update(k.encode() + v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        spec["weights"] = h.hexdigest()[:16]
    source = getattr(tower, "source_id", lambda: None)() if tower is not None else None
    if source:  # e.g. the version of a package whose weights ship inside it (text towers)
        spec["source"] = source
    return spec


def image_inputs(cfg, model, ds: CrossModalDataset, head_input: str, progress: bool = True) -> tuple[CrossModalDataset, Any]:
    tower = model.tower("image")
    kind = tower.input_kind if tower is not None else "features"
    if kind == "pixels":
        if cfg.model.image.frozen:
            from .features import apply_valid, cached_features

            # keyed by the images' content and the tower: a copy of the table elsewhere shares the entry
            fs = cached_features(ds, tower, _tower_spec(cfg.model.image, tower),
                                 cache_root=cache_root() / "features", grid=(head_input == "tokens"),
                                 batch_size=cfg.train.extract_batch_size, progress=progress,
                                 on_error=cfg.data.on_bad_image)
            if cfg.data.on_bad_image == "fail" and fs.skipped:
                from ..errors import DataError

                bad = fs.skipped[0]
                raise DataError(f"{bad['path']}: {bad['reason']} ({len(fs.skipped)} unreadable images in "
                                f"{ds.name}/{ds.split}; data.on_bad_image=fail)")
            ds = apply_valid(ds, fs)
            valid = np.flatnonzero(np.asarray(fs.valid))
            pooled = fs.pooled if len(valid) == len(fs.valid) else np.asarray(fs.pooled)[valid]
            grid = None
            if head_input == "tokens":
                grid = fs.grid if len(valid) == len(fs.valid) else np.asarray(fs.grid)[valid]
            return ds, CachedOutputs(pooled, grid)
        return ds, PixelImages(ds, tower.preprocess)
    if ds.image_features is None:
        raise ConfigError(f"image tower {cfg.model.image.name!r} reads feature rows, but dataset "
                          f"{ds.name}/{ds.split} has no image features; use a pixel tower")
    return ds, FeatureRows(ds.image_features, ds.image_boxes)


@torch.inference_mode()
def encode_texts_cached(tower, tcfg, captions: list, *, tokens: bool, batch_size: int = 256,
                        progress: bool = True) -> CachedOutputs:
    """Run a frozen text tower once over ``captions``; cached on disk by content hash."""
    from safetensors.numpy import load_file, save_file

    from ..progress import track
    from ..utils import atomic_write

    h = hashlib.sha256(json.dumps({"spec": _tower_spec(tcfg, tower), "tokens": tokens}, sort_keys=True).encode())
    for c in captions:  # strings, or field records of multi-field texts
        c = c if isinstance(c, str) else json.dumps(c, sort_keys=True, ensure_ascii=False)
        h.update(c.encode("utf-8", "surrogatepass") + b"\0")
    path = cache_root() / "text" / f"{h.hexdigest()[:24]}.safetensors"
    if path.exists():
        arrays = load_file(str(path))
        return CachedOutputs(arrays["pooled"], arrays.get("tokens"), arrays.get("mask"))
    tower.eval()
    pooled, toks, masks = [], [], []
    for start in track(range(0, len(captions), batch_size), description="encoding texts (frozen tower)",
                       enabled=progress):
        out: TowerOutput = tower(tower.tokenize(captions[start:start + batch_size]))
        pooled.append(out.pooled.float().cpu().numpy())
        if tokens:
            toks.append(out.tokens.to(torch.float16).cpu().numpy())
            m = out.mask if out.mask is not None else torch.ones(out.tokens.shape[:2], dtype=torch.bool)
            masks.append(m.cpu().numpy())
    arrays = {"pooled": np.concatenate(pooled).astype(np.float32)}
    if tokens:
        width = max(t.shape[1] for t in toks)
        pad = lambda a, v: np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=v)  # noqa: E731
        arrays["tokens"] = np.concatenate([pad(t, 0) for t in toks])  # (M, L, D)
        arrays["mask"] = np.concatenate([pad(m, False) for m in masks])  # (M, L)
    atomic_write(path, lambda p: save_file(arrays, str(p)))
    return CachedOutputs(arrays["pooled"], arrays.get("tokens"), arrays.get("mask"))


def text_inputs(cfg, model, ds: CrossModalDataset, head_input: str, progress: bool = True) -> Any:
    tower = model.tower("text")
    names = tower.fields if tower is not None else None
    # a multi-field tower gets {field: text} records when the data has all its fields;
    # otherwise each caption is one field (emoji labels, free-text queries)
    records = FieldTexts(ds.fields, list(names)) if names and ds.fields and set(names) <= set(ds.fields) else None
    if tower is not None and cfg.model.text.frozen:
        texts = records(np.arange(ds.num_texts)) if records is not None else ds.captions
        return encode_texts_cached(tower, cfg.model.text, texts, tokens=(head_input == "tokens"),
                                   progress=progress)
    return records if records is not None else RawTexts(ds.captions)


def head_inputs(cfg, model) -> tuple[str, str]:
    """``(image input, text input)`` the model reads: its own declaration, else its config's heads."""
    return model.input_needs() or (cfg.model.image_head.input, cfg.model.text_head.input)


def prepare_split(cfg, model, split: str, lang: str | None, *, training: bool = False,
                  progress: bool = True, dataset: CrossModalDataset | None = None) -> SplitInputs:
    """Load a split and build the inputs the model consumes for it.

    ``dataset``: the split as :func:`load_split` already read it (``load_split(cfg, split, lang,
    training)``), e.g. by the checks a command runs before any extraction; else it is read here.
    """
    ds = dataset if dataset is not None else load_split(cfg, split, lang, training=training)
    img_in, txt_in = head_inputs(cfg, model)
    ds, images = image_inputs(cfg, model, ds, img_in, progress)
    if training and _sample_lang(cfg):
        # after image_inputs: dropping unreadable images rebuilds gt, which would lose the groups
        ds = _grouped(cfg, ds)
        groups = ds.gt.groups
        log.info("%s/%s: %d samples with versions in %d languages", ds.name, ds.split, groups.num_groups,
                 len(groups.languages))
    texts = text_inputs(cfg, model, ds, txt_in, progress)
    return SplitInputs(ds, images, texts)
