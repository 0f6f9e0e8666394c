"""Pretrained CLIP-family dual encoders as xmodal towers (CLIP, SigLIP, OpenCLIP checkpoints).

A pretrained vision-language model becomes two towers, ``pretrained_image`` and
``pretrained_text`` (registered in :data:`~xmodal.models.base.IMAGE_TOWERS` /
:data:`~xmodal.models.base.TEXT_TOWERS`), each loaded from a *source*:

- ``hf:NAME_OR_DIR``: a Hugging Face ``transformers`` model with ``get_image_features`` /
  ``get_text_features`` (``CLIPModel``, ``SiglipModel``, ...), a hub name or a folder written by
  ``save_pretrained``. A folder is read with ``local_files_only=True``; a hub name goes through
  the ``transformers`` cache (offline and not cached: an :class:`~xmodal.errors.XmodalError`).
- ``open_clip:ARCH:PRETRAINED_OR_FILE``: an ``open-clip-torch`` model (optional extra; it needs
  torchvision): ``ARCH`` an OpenCLIP architecture or a model config JSON, then a pretrained tag
  (the hub or its cache) or a weight file, read without unpickling objects (safetensors, or
  ``torch.load(weights_only=True)``).

A tower's pooled vector is the model's own embedding (``get_image_features`` /
``get_text_features``: CLIP's EOS pooling and projection, SigLIP's attention-pooling head), so
``model: {type: dual_encoder}`` with identity heads scores exactly as the original model does
(``xmodal pretrained`` writes such a run). Its tokens are the last hidden states: for the image
side the patch tokens (CLS dropped), brought into the embedding space by the model's own
post-layernorm and projection when the backbone has them, so that ADAPT, ALADIN and the
cross-encoder can use them as region tokens.

Preprocessing is the model's own, re-implemented without torchvision: the image processor's
resize (shortest edge or fixed size, its resampling filter), center crop, rescale and
normalisation (read from the processor ``transformers`` loads with its PIL backend, or from an
OpenCLIP model's ``preprocess_cfg``: torchvision's rounded center crop), and the model's tokenizer
(SigLIP pads to ``max_length`` as it was trained, OpenCLIP to its context length).

Each tower loads the whole checkpoint and keeps its own half (the other half is dropped), so a
dual encoder reads the checkpoint twice. ``sha256`` pins the weights of an ``hf:`` folder (or an
``open_clip:`` weight file and config JSON): the tower checks the digest of those files
(:func:`source_digest`) before loading them (``xmodal pretrained`` writes runs that pin their
copy of the model, or the OpenCLIP files they name, this way).
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ConfigError, XmodalError, where
from .base import IMAGE_TOWERS, TEXT_TOWERS, ImageTower, TextTower, TowerOutput
from .image.efficientnet import pixels_to_float
from .image.resize import check_resize, resize_image

log = logging.getLogger(__name__)

SOURCE_KINDS = ("hf", "open_clip")
#: OpenCLIP's own model-name schemas: a Hugging Face repository or a local folder holding
#: ``open_clip_config.json`` (model and preprocess config) and the weights
OPEN_CLIP_SCHEMAS = ("hf-hub", "local-dir")
#: OpenCLIP weight files xmodal reads: safetensors, or torch.save'd tensors (weights_only=True)
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
#: top-level children of a joint model, by side (a name containing one of these words)
_SIDE_WORDS = {"image": ("vision", "visual", "image"), "text": ("text", "token_embedding", "transformer",
                                                                "positional_embedding", "ln_final", "attn_mask")}
#: top-level parameters shared by both sides (the contrastive temperature and bias)
_SHARED = ("logit_scale", "logit_bias")
#: model types trained with the sigmoid loss, their text padded to max_length as in training
_SIGMOID_FAMILIES = ("siglip", "siglip2")


@dataclass(frozen=True)
class Source:
    """A parsed source spec: ``kind`` (``hf`` / ``open_clip``), ``name`` (hub name, folder or
    OpenCLIP architecture) and ``pretrained`` (OpenCLIP's tag or weight file)."""

    kind: str
    name: str
    pretrained: str | None = None

    @property
    def local(self) -> bool:
        return self.kind == "hf" and Path(self.name).exists()


def parse_source(spec: str, field: str = "source") -> Source:
    """``hf:NAME_OR_DIR`` or ``open_clip:ARCH[:PRETRAINED_OR_FILE]`` -> :class:`Source`."""
    kind, sep, rest = str(spec).partition(":")
    if not sep or kind not in SOURCE_KINDS or not rest:
        raise ConfigError(f"{field}: expected hf:NAME_OR_DIR or open_clip:ARCH:PRETRAINED_OR_FILE, got {spec!r}")
    if kind == "open_clip":
        arch, _, pretrained = rest.partition(":")
        if not arch:
            raise ConfigError(f"{field}: open_clip:ARCH:PRETRAINED_OR_FILE has no architecture: {spec!r}")
        if arch in OPEN_CLIP_SCHEMAS:  # open_clip:hf-hub:ORG/REPO, open_clip:local-dir:DIR
            if not pretrained:
                what = "repository" if arch == "hf-hub" else "folder"
                raise ConfigError(f"{field}: open_clip:{arch}: names no {what}")
            return Source(kind, f"{arch}:{pretrained}")
        return Source(kind, arch, pretrained or None)
    return Source(kind, rest)


# ------------------------------------------------------------------------------------------
# image preprocessing: the processor's own steps, without torchvision
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePreprocessing:
    """What a model's image processor does: resize (``shortest_edge`` keeping the aspect ratio,
    to ``size`` = (h, w), or ``keep_ratio``: both sides scaled by one ratio, chosen between the
    shortest (0) and the longest (1) side's, as OpenCLIP's ``ResizeKeepRatio``), center crop to
    ``crop`` (h, w), padding with ``fill`` where the image is smaller, then ``x * rescale`` and
    ``(x - mean) / std`` per channel. ``resample`` is a PIL filter number (3 = bicubic);
    ``crop_rounding``: the crop offset ``(h - ch) // 2`` (``floor``, ``transformers``) or
    ``int(round((h - ch) / 2))`` (``round``, torchvision's ``CenterCrop``)."""

    size: tuple[int, int] | None
    shortest_edge: int | None
    crop: tuple[int, int] | None
    resample: int
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    keep_ratio: float | None = None
    crop_rounding: str = "floor"
    fill: int = 0

    @property
    def input_hw(self) -> tuple[int, int]:
        """The (h, w) of every preprocessed image."""
        hw = self.crop or self.size
        if hw is None:
            raise ConfigError("the model's image processor resizes the shortest edge without a center crop: "
                              "images would differ in size (set crop_size in its preprocessor_config.json)")
        return hw

    def apply(self, image: Any) -> torch.Tensor:
        """PIL image -> uint8 ``(3, H, W)``: RGB, resized and cropped as the processor does."""
        import numpy as np

        image = image.convert("RGB")
        nw, nh = self.resized_wh(*image.size)
        if (nw, nh) != image.size:
            image = image.resize((nw, nh), resample=self.resample)
        if self.crop is not None:
            image = self._center_crop(image)
        arr = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
        # the channel move in numpy: torch's uint8 permute + contiguous is ~30x slower on CPU
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, H, W)

    def resized_wh(self, w: int, h: int) -> tuple[int, int]:
        """The (w, h) an image of (w, h) is resized to before the crop."""
        if self.shortest_edge is not None:
            # transformers' get_resize_output_image_size(default_to_square=False) and torchvision's
            # Resize(int): int(), not round()
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_short, new_long) if w <= h else (new_long, new_short)
        if self.keep_ratio is not None:
            th, tw = self.input_hw
            ratio_h, ratio_w = h / th, w / tw
            ratio = max(ratio_h, ratio_w) * self.keep_ratio + min(ratio_h, ratio_w) * (1.0 - self.keep_ratio)
            return round(w / ratio), round(h / ratio)  # timm / OpenCLIP ResizeKeepRatio: round()
        if self.size is not None:
            return self.size[1], self.size[0]
        return w, h

    def _center_crop(self, image: Any) -> Any:
        """Center crop to ``crop``, padded with ``fill`` (left / top get the smaller half) where
        the image is smaller: the processor's offsets, floored or rounded."""
        from PIL import Image

        ch, cw = self.crop
        iw, ih = image.size
        if self.crop_rounding == "round":  # torchvision: pad first, then int(round(d / 2)) of what is left
            left = -((cw - iw) // 2) if cw > iw else int(round((iw - cw) / 2.0))
            top = -((ch - ih) // 2) if ch > ih else int(round((ih - ch) / 2.0))
        else:
            top, left = (ih - ch) // 2, (iw - cw) // 2
        if self.fill == 0:
            return image.crop((left, top, left + cw, top + ch))  # out of the image: zeros
        canvas = Image.new("RGB", (cw, ch), (self.fill,) * 3)
        canvas.paste(image, (-left, -top))
        return canvas


def _hw(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    get = value.get if isinstance(value, dict) else (lambda k: getattr(value, k, None))
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    return None


def hf_image_preprocessing(processor: Any) -> ImagePreprocessing:
    """The steps of a ``transformers`` image processor (attributes of its resolved config)."""
    size = getattr(processor, "size", None)
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    resize = bool(getattr(processor, "do_resize", True)) and size is not None
    shortest = int(get("shortest_edge")) if resize and get("shortest_edge") else None
    crop = _hw(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", False) else None
    resample = getattr(processor, "resample", 3)
    resample = int(getattr(resample, "value", resample) if resample is not None else 2)
    rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
    if getattr(processor, "do_normalize", True):
        mean, std = _triple(processor.image_mean), _triple(processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return ImagePreprocessing(size=_hw(size) if resize and shortest is None else None, shortest_edge=shortest,
                              crop=crop, resample=resample, rescale=rescale, mean=mean, std=std)


def _triple(v: Any) -> tuple[float, float, float]:
    vals = [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]
    if len(vals) != 3:
        raise ConfigError(f"image processor: expected 3 channel values, got {v!r}")
    return vals[0], vals[1], vals[2]


# ------------------------------------------------------------------------------------------
# loading a source
# ------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    """A loaded joint model with what preprocessing its inputs needs."""

    model: nn.Module
    source: Source
    family: str  # the model type (clip, siglip, ...) or open_clip
    tokenizer: Any
    image_pp: ImagePreprocessing | None
    hf_config: Any = None
    image_processor: Any = None


def load_source(spec: str, need: str = "both", sha256: str | None = None) -> Loaded:
    """Load ``spec`` (``need``: ``image``, ``text`` or ``both`` decides which preprocessing is
    read); ``sha256``: the :func:`source_digest` its local files must have."""
    src = parse_source(spec)
    if sha256 is not None:
        check_digest(src, sha256)
    if src.kind == "open_clip":
        return _load_open_clip(src)
    return _load_hf(src, need)


def weights_digest(folder: Path) -> str:
    """sha256 over the names and sha256 digests of a folder's ``*.safetensors`` files."""
    from .run import sha256_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise XmodalError(f"{folder}: no *.safetensors weight files")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def absolute_spec(src: Source) -> str:
    """The spec of ``src`` with its local files and folders by absolute path (a run's config is
    read from anywhere)."""
    if src.kind == "hf":
        return f"hf:{Path(src.name).resolve()}" if src.local else f"hf:{src.name}"
    if src.name.startswith("local-dir:"):
        return f"open_clip:local-dir:{Path(src.name.partition(':')[2]).resolve()}"
    parts = [str(Path(p).resolve()) if p and Path(p).is_file() else p for p in (src.name, src.pretrained)]
    return "open_clip:" + ":".join(p for p in parts if p)


def source_digest(src: Source) -> str | None:
    """The digest that pins a source's weights: :func:`weights_digest` of an ``hf:`` folder; for
    ``open_clip:`` the weight file's (and the model config JSON's, when the architecture is one)
    sha256; None for what no local file holds (a hub name, an OpenCLIP tag)."""
    from .run import sha256_file

    if src.kind == "hf":
        return weights_digest(Path(src.name)) if Path(src.name).is_dir() else None
    if src.name.startswith("local-dir:"):
        folder = Path(src.name.partition(":")[2])
        if not (folder / "open_clip_config.json").is_file():
            return None
        files = [folder / "open_clip_config.json", open_clip_dir_weights(folder)]
    elif src.pretrained and Path(src.pretrained).is_file():
        files = [Path(src.name)] if src.name.endswith(".json") else []
        files.append(Path(src.pretrained))
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def check_digest(src: Source, sha256: str) -> None:
    """An :class:`XmodalError` unless the local files of ``src`` (an ``hf:`` folder, an
    ``open_clip:`` weight file and config) have the digest ``sha256`` names."""
    found = source_digest(src)
    if found is None and src.kind == "open_clip" and src.pretrained and _is_weight_file(src.pretrained):
        raise XmodalError(f"{where(src.pretrained)}no such weight file (the run's config pins it by sha256)")
    if found is None and src.name.startswith("local-dir:"):
        raise XmodalError(f"{where(src.name.partition(':')[2])}no OpenCLIP model folder (open_clip_config.json) "
                          "here; the run's config pins it by sha256")
    if found is None:
        raise ConfigError(f"sha256: pins the weights of an hf: folder or an open_clip: weight file, but the source "
                          f"is {src.kind}:{src.name}{':' + src.pretrained if src.pretrained else ''}")
    if found != sha256:
        what = src.pretrained if src.kind == "open_clip" and src.pretrained else src.name
        what = what.partition("local-dir:")[2] or what
        raise XmodalError(f"{what}: its weight files changed since the run was written (sha256 {found[:16]}..., "
                          f"the config pins {sha256[:16]}...): restore the files or convert the model again")


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def _hf_failure(src: Source, what: str, exc: BaseException) -> XmodalError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if src.local:
        return XmodalError(f"hf:{src.name}: cannot load the {what} from this folder ({first})")
    return XmodalError(f"hf:{src.name}: cannot load the {what} from the Hugging Face hub or its cache ({first}); "
                       "offline, pass a folder written by save_pretrained (hf:DIR)")


def _load_hf(src: Source, need: str) -> Loaded:
    import transformers

    kw = {"local_files_only": src.local}
    with _quiet_transformers():
        try:
            config = transformers.AutoConfig.from_pretrained(src.name, **kw)
        except (OSError, ValueError, KeyError) as exc:
            raise _hf_failure(src, "model config", exc) from None
        try:
            model = transformers.AutoModel.from_pretrained(src.name, **kw)
        except (OSError, ValueError, KeyError) as exc:
            raise _hf_failure(src, "model", exc) from None
    family = str(getattr(config, "model_type", ""))
    for method in ("get_image_features", "get_text_features"):
        if not callable(getattr(model, method, None)):
            raise ConfigError(f"hf:{src.name}: {type(model).__name__} ({family}) has no {method}: not an image-text "
                              "dual encoder (CLIPModel, SiglipModel, ...)")
    tokenizer = processor = pp = None
    with _quiet_transformers():
        if need in ("text", "both"):
            try:
                tokenizer = transformers.AutoTokenizer.from_pretrained(src.name, **kw)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise _hf_failure(src, "tokenizer", exc) from None
        if need in ("image", "both"):
            processor = _hf_image_processor(src, kw)
            pp = hf_image_preprocessing(processor)
    return Loaded(model.eval(), src, family, tokenizer, pp, config, processor)


def _hf_image_processor(src: Source, kw: dict) -> Any:
    """The model's image processor with its PIL backend (torchvision is not needed)."""
    import transformers

    errors = (OSError, ValueError, KeyError, TypeError, ImportError)
    try:
        return transformers.AutoImageProcessor.from_pretrained(src.name, backend="pil", **kw)
    except errors as exc:
        first = exc
    try:  # transformers 4.x: the slow processors are the PIL ones
        return transformers.AutoImageProcessor.from_pretrained(src.name, use_fast=False, **kw)
    except errors:
        raise _hf_failure(src, "image processor (preprocessor_config.json)", first) from None


def _import_open_clip(src: Source) -> Any:
    try:
        import open_clip
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision failing inside it
        raise XmodalError(f"open_clip:{src.name}: needs open-clip-torch and a working torchvision "
                          f"(pip install 'xmodal[open_clip]'); importing it failed: {exc}") from None
    return open_clip


def _load_open_clip(src: Source) -> Loaded:
    """``open_clip:ARCH[:TAG_OR_FILE]`` (an architecture name or a model config JSON),
    ``open_clip:hf-hub:REPO`` or ``open_clip:local-dir:DIR``: the model, its weights read without
    unpickling objects (hub downloads: OpenCLIP's ``weights_only=True``), its tokenizer and
    preprocessing."""
    open_clip = _import_open_clip(src)
    schema = src.name.partition(":")[0] if src.name.partition(":")[0] in OPEN_CLIP_SCHEMAS else None
    label = f"open_clip:{src.name}" + (f":{src.pretrained}" if src.pretrained else "")
    if schema == "hf-hub":
        arch, model = src.name, _open_clip_download(open_clip, src.name, None, label)
    elif schema == "local-dir":
        arch, model = src.name, _open_clip_from_dir(open_clip, Path(src.name.partition(":")[2]), label)
    else:
        arch = open_clip_arch(src, open_clip)
        model = _open_clip_from_arch(open_clip, arch, src.pretrained, label)
    try:
        tokenizer = open_clip.get_tokenizer(arch)
    except (RuntimeError, OSError, ValueError, KeyError, ImportError) as exc:  # fsspec: ImportError for http
        raise XmodalError(f"{label}: cannot load its tokenizer ({_first_line(exc)}); a Hugging Face or SigLIP "
                          "tokenizer needs the hub or its cache") from None
    pp = open_clip_preprocessing(getattr(model.visual, "preprocess_cfg", {}) or {}, model.visual, open_clip)
    family = "siglip" if getattr(model, "logit_bias", None) is not None else "clip"
    return Loaded(model.eval(), src, f"open_clip-{family}", tokenizer, pp)


def _open_clip_from_arch(open_clip: Any, arch: str, weights: str | None, label: str) -> nn.Module:
    """``arch`` with a pretrained tag (downloaded), a weight file (read here) or random weights."""
    if weights and not _is_weight_file(weights):
        return _open_clip_from_tag(open_clip, arch, weights, label)
    model = _build_open_clip(open_clip, arch, label)
    if weights:
        _load_open_clip_weights(open_clip, model, Path(weights), label)
    else:
        log.warning("%s: no weights given (open_clip:ARCH:TAG_OR_FILE): the model is randomly initialised", label)
    return model


def _build_open_clip(open_clip: Any, name: str, label: str, **kw: Any) -> nn.Module:
    """``open_clip.create_model(name)`` without weights (they are read next)."""
    try:
        with _quiet_open_clip():  # its "initialized randomly" warning: the weights come next
            return open_clip.create_model(name, pretrained=None, **_no_tower_weights(open_clip), **kw)
    except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as exc:  # timm asserts
        raise ConfigError(f"{label}: cannot build the architecture ({_first_line(exc)})") from None


def _open_clip_from_dir(open_clip: Any, folder: Path, label: str) -> nn.Module:
    """An OpenCLIP model folder (``open_clip_config.json`` with ``model_cfg`` and
    ``preprocess_cfg``, and its weights): built by OpenCLIP without weights, which are read here."""
    if not (folder / "open_clip_config.json").is_file():
        raise XmodalError(f"{where(folder)}no open_clip_config.json: not an OpenCLIP model folder")
    if "load_weights" not in inspect.signature(open_clip.create_model).parameters:
        raise XmodalError(f"{label}: this open-clip-torch cannot build a local-dir model without loading its "
                          "weights itself; upgrade it (open-clip-torch 3)")
    model = _build_open_clip(open_clip, f"local-dir:{folder}", label, load_weights=False)
    _load_open_clip_weights(open_clip, model, open_clip_dir_weights(folder), label)
    return model


#: the weight files an OpenCLIP model folder may hold, in the order OpenCLIP prefers them
_DIR_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                "model.pth")


def open_clip_dir_weights(folder: Path) -> Path:
    """The weight file of an OpenCLIP model folder, chosen as OpenCLIP chooses it."""
    found = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("*.pth")])
    found.sort(key=lambda f: f.suffix != ".safetensors")
    preferred = [f for f in found if f.name in _DIR_WEIGHTS]
    if preferred:
        return min(preferred, key=lambda f: _DIR_WEIGHTS.index(f.name))
    if not found:
        raise XmodalError(f"{where(folder)}no weight file (*.safetensors, *.bin, *.pth)")
    return found[0]


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """OpenCLIP logs through the root logger; its warnings and errors (which xmodal turns into its
    own one-line errors) are silenced while it builds."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)


def _no_tower_weights(open_clip: Any) -> dict:
    """Arguments that stop ``create_model`` from fetching a Hugging Face text tower's own
    pretrained weights (the whole checkpoint is read next): ``pretrained_text`` (open_clip 3),
    ``pretrained_hf`` (2.x)."""
    params = inspect.signature(open_clip.create_model).parameters
    for name in ("pretrained_text", "pretrained_hf"):
        if name in params:
            return {name: False}
    return {}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _is_weight_file(weights: str) -> bool:
    """A weight file (an existing path, or one that looks like a path), not a pretrained tag."""
    return Path(weights).exists() or "/" in weights or Path(weights).suffix in _WEIGHT_SUFFIXES


def open_clip_arch(src: Source, open_clip: Any) -> str:
    """The architecture name of ``src``: a name open_clip knows, or the stem of a model config
    JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``), registered with ``add_model_config``."""
    if not src.name.endswith(".json"):
        if src.name.replace("/", "-") not in open_clip.list_models():
            raise ConfigError(f"open_clip:{src.name}: unknown architecture (not in open_clip.list_models()); "
                              "for your own, pass its model config: open_clip:CONFIG.json:WEIGHTS")
        return src.name
    import json

    path = Path(src.name)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where(path)}cannot read the open_clip model config ({_first_line(exc)})") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ConfigError(f"{where(path)}not an open_clip model config: no {', '.join(missing)}")
    arch = path.stem
    known = open_clip.get_model_config(arch) if arch in open_clip.list_models() else None
    if known is not None and known != cfg and Path(path).resolve() not in _registered_configs(open_clip):
        raise ConfigError(f"{where(path)}its name {arch!r} is an open_clip architecture with another config; "
                          "rename the file")
    open_clip.add_model_config(path.resolve())
    return arch


def _registered_configs(open_clip: Any) -> set[Path]:
    factory = getattr(open_clip, "factory", None)
    paths = getattr(factory, "_MODEL_CONFIG_PATHS", [])
    return {Path(p).resolve() for p in paths}


def _open_clip_from_tag(open_clip: Any, arch: str, tag: str, label: str) -> nn.Module:
    """``open_clip.create_model(arch, pretrained=tag)``: the hub or its cache."""
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        shown = ", ".join(tags[:8]) + (f", ... ({len(tags)} in all)" if len(tags) > 8 else "")
        raise ConfigError(f"{label}: neither a pretrained tag of {arch} (tags: {shown or 'none'}) nor a weight file")
    return _open_clip_download(open_clip, arch, tag, label)


def _open_clip_download(open_clip: Any, name: str, tag: str | None, label: str) -> nn.Module:
    """``open_clip.create_model`` downloading (or reading from the hub's cache) with
    ``weights_only=True`` loading: an open_clip that cannot say so is refused."""
    if "weights_only" not in inspect.signature(open_clip.create_model).parameters:
        raise XmodalError(f"{label}: this open-clip-torch cannot load checkpoints with weights_only=True; "
                          "upgrade it, or pass a weight file (open_clip:ARCH:FILE)")
    try:
        with _quiet_open_clip():
            return open_clip.create_model(name, pretrained=tag, weights_only=True)
    except (RuntimeError, OSError, ValueError) as exc:
        raise XmodalError(f"{label}: cannot download the weights from the Hugging Face hub or find them in its "
                          f"cache ({_first_line(exc)}); offline, pass a weight file (open_clip:ARCH:FILE) or an "
                          "OpenCLIP model folder (open_clip:local-dir:DIR)") from None


def read_open_clip_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in an OpenCLIP weight file: safetensors, or ``torch.load(weights_only=True)``
    (no arbitrary objects are unpickled); a training checkpoint's ``state_dict`` and DDP's
    ``module.`` prefix are unwrapped, as OpenCLIP does."""
    if not path.is_file():
        raise XmodalError(f"{where(path)}no such weight file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise XmodalError(f"{where(path)}not a readable safetensors file ({_first_line(exc)})") from None
    else:
        import pickle

        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
            raise XmodalError(f"{where(path)}cannot read it with torch.load(weights_only=True): it is not a "
                              f"state dict of tensors (a TorchScript archive or pickled objects?) ({_first_line(exc)})"
                              "; convert it to safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise XmodalError(f"{where(path)}holds no state dict of tensors")
    if next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_open_clip_weights(open_clip: Any, model: nn.Module, path: Path, label: str) -> None:
    """OpenCLIP's ``load_checkpoint`` on a state dict read by :func:`read_open_clip_state`: old
    formats converted, the logit terms' shapes fixed, position embeddings resized, strict."""
    state = read_open_clip_state(path)
    convert = getattr(getattr(open_clip, "convert", None), "convert_state_dict", None)
    if convert is not None:
        state = convert(model, state)
    model_mod = getattr(open_clip, "model", None)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = model_mod.convert_to_custom_text_state_dict(state)
    for name in _SHARED:
        own = getattr(model, name, None)
        if name in state and isinstance(own, torch.Tensor) and own.ndim != state[name].ndim:
            state[name] = state[name].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = torch.zeros_like(model.logit_bias)
    state.pop("text.transformer.embeddings.position_ids", None)
    for resize in ("resize_pos_embed", "resize_text_pos_embed"):
        fn = getattr(model_mod, resize, None)
        if fn is not None:
            fn(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise XmodalError(f"{label}: the weights do not fit the architecture ({_first_line(exc)})") from None


def open_clip_preprocessing(cfg: dict, visual: Any, open_clip: Any) -> ImagePreprocessing:
    """OpenCLIP's evaluation transform (``image_transform(..., is_train=False)``) from a model's
    ``visual.preprocess_cfg``: ``shortest`` (torchvision ``Resize(int)`` + ``CenterCrop`` for a
    square size, ``ResizeKeepRatio`` (bicubic) + ``CenterCrop`` otherwise), ``squash``
    (``Resize((h, w))``) or ``longest`` (``ResizeKeepRatio(longest=1)`` + ``CenterCropOrPad``
    with ``fill_color``); ``ToTensor`` and ``Normalize``."""
    size = cfg.get("size", getattr(visual, "image_size", 224))
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    interpolation = cfg.get("interpolation", "bicubic")
    filters = {"bicubic": 3, "bilinear": 2, "nearest": 0}
    mode = cfg.get("resize_mode", "shortest")
    if interpolation not in filters or mode not in ("shortest", "squash", "longest"):
        raise ConfigError(f"open_clip preprocess_cfg: unsupported interpolation {interpolation!r} or resize_mode "
                          f"{mode!r} (bicubic, bilinear, nearest; shortest, squash, longest)")
    common = dict(rescale=1 / 255, mean=_triple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                  std=_triple(cfg.get("std", open_clip.OPENAI_DATASET_STD)), crop_rounding="round")
    if mode == "squash":
        return ImagePreprocessing(size=hw, shortest_edge=None, crop=None, resample=filters[interpolation], **common)
    if mode == "longest":
        return ImagePreprocessing(size=None, shortest_edge=None, crop=hw, resample=filters[interpolation],
                                  keep_ratio=1.0, fill=int(cfg.get("fill_color", 0)), **common)
    if hw[0] == hw[1]:
        return ImagePreprocessing(size=None, shortest_edge=hw[0], crop=hw, resample=filters[interpolation], **common)
    # OpenCLIP builds ResizeKeepRatio(size) here with its default filter, bicubic
    return ImagePreprocessing(size=None, shortest_edge=None, crop=hw, resample=3, keep_ratio=0.0, **common)


@torch.no_grad()
def embedding_dim(loaded: Loaded) -> int:
    """The size of a loaded model's text embedding (``get_text_features`` of one short text)."""
    if loaded.source.kind == "open_clip":
        return int(loaded.model.encode_text(loaded.tokenizer(["a photo"])).shape[-1])
    enc = loaded.tokenizer(["a photo"], return_tensors="pt")
    out = loaded.model.get_text_features(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")})
    return int((out if torch.is_tensor(out) else out.pooler_output).shape[-1])


def keep_side(model: nn.Module, side: str) -> None:
    """Drop the other side's top-level children and parameters of a joint model (in place);
    the shared temperature and bias stay, fixed (the loss owns a trainable copy)."""
    other = "text" if side == "image" else "image"
    for name, _ in list(model.named_children()) + list(model.named_parameters(recurse=False)):
        if name in _SHARED:
            continue
        if any(w in name for w in _SIDE_WORDS[other]) and not any(w in name for w in _SIDE_WORDS[side]):
            setattr(model, name, None)
    for name in _SHARED:
        p = getattr(model, name, None)
        if isinstance(p, nn.Parameter):
            p.requires_grad_(False)


def logit_terms(model: nn.Module) -> tuple[float | None, float | None]:
    """``(exp(logit_scale), logit_bias)`` the model was trained with (None where it has none)."""
    scale, bias = getattr(model, "logit_scale", None), getattr(model, "logit_bias", None)
    as_float = lambda t: float(t.detach().float().reshape(-1)[0]) if torch.is_tensor(t) else None  # noqa: E731
    s = as_float(scale)
    return (math.exp(s) if s is not None else None), as_float(bias)


def _enable_checkpointing(model: nn.Module, source: Source) -> None:
    if getattr(model, "supports_gradient_checkpointing", False):
        # transformers 5 renamed it (the old name warns)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    elif hasattr(model, "set_grad_checkpointing"):  # open_clip
        model.set_grad_checkpointing(True)
    else:
        raise ConfigError(f"grad_checkpointing: {type(model).__name__} ({source.kind}:{source.name}) does not "
                          "support gradient checkpointing")


# ------------------------------------------------------------------------------------------
# the towers
# ------------------------------------------------------------------------------------------
class _Pretrained:
    """What both towers share: the source they are read from and the joint model's terms."""

    source: Source
    family: str
    model: nn.Module

    def _attach(self, source: str, side: str, sha256: str | None, grad_checkpointing: bool) -> Loaded:
        """Load ``source`` and keep the ``side`` (``image`` / ``text``) of its model as this tower's."""
        loaded = load_source(source, need=side, sha256=sha256)
        if grad_checkpointing:  # on the whole model: transformers' hooks look for both sides' modules
            _enable_checkpointing(loaded.model, loaded.source)
        keep_side(loaded.model, side)
        self.model = loaded.model
        self.source, self.family = loaded.source, loaded.family
        self.spec, self.hf_config = str(source), loaded.hf_config
        return loaded

    def rebuilt_from_source(self) -> bool:
        """Every weight is read from the source: a frozen tower is left out of checkpoints."""
        return True

    def logit_terms(self) -> tuple[float | None, float | None]:
        """``(logit scale, logit bias)`` the model was trained with (see :func:`logit_terms`)."""
        return logit_terms(self.model)

    def trained_loss(self) -> dict:
        """The ``loss`` section the model was trained with (:func:`trained_loss`)."""
        return trained_loss(self.model)


def trained_loss(model: nn.Module) -> dict:
    """The ``loss`` section a joint model was trained with: ``siglip`` with its own scale and bias
    when it has a bias, else ``infonce`` with its own temperature (scale capped at 100, as CLIP)."""
    scale, bias = logit_terms(model)
    if bias is not None:
        return {"name": "siglip", "args": {"init_scale": scale, "init_bias": bias}}
    return {"name": "infonce", "args": {"init_temperature": 1.0 / min(scale, 100.0)} if scale else {}}


@IMAGE_TOWERS.register("pretrained_image")
class PretrainedImageTower(_Pretrained, ImageTower):
    """The image half of a pretrained dual encoder (see the module docstring).

    ``source``: ``hf:NAME_OR_DIR`` or ``open_clip:ARCH:PRETRAINED``; ``sha256``: the pinned
    :func:`weights_digest` of an ``hf:`` folder; ``tokens``: ``patches`` (CLS dropped) or
    ``all``; ``grad_checkpointing``: recompute activations in the backward pass; ``resize``:
    ``crop`` (the default: the model's own processor, resize and center crop, exactly),
    ``squash`` or ``letterbox`` (with ``letterbox_fill``) to the processor's input size, for
    non-square images (:mod:`xmodal.models.image.resize`), then the model's own normalisation.
    Pooled: the model's image embedding; tokens: its last hidden states, in the embedding space
    when the model has a visual projection.
    """

    input_kind = "pixels"

    def __init__(self, source: str, sha256: str | None = None, tokens: str = "patches",
                 grad_checkpointing: bool = False, resize: str = "crop", letterbox_fill: Any = "edge") -> None:
        super().__init__()
        _check_args("pretrained_image", source=(source, str), sha256=(sha256, (str, type(None))),
                    tokens=(tokens, str), grad_checkpointing=(grad_checkpointing, bool))
        if tokens not in ("patches", "all"):
            raise ConfigError(f"pretrained_image: tokens must be patches or all, got {tokens!r}")
        self.resize, self.letterbox_fill = check_resize(resize, letterbox_fill, owner="pretrained_image")
        loaded = self._attach(source, "image", sha256, grad_checkpointing)
        self.tokens_kind = tokens
        self.preprocessing, self.image_processor = loaded.image_pp, loaded.image_processor
        self.input_hw = self.preprocessing.input_hw
        self.image_size = self.input_hw[0]
        pp = self.preprocessing
        # x * rescale, then (x - mean) / std, as one multiply-add: x * weight + bias (B, 3, H, W)
        std = torch.tensor(pp.std, dtype=torch.float64).view(1, 3, 1, 1)
        mean = torch.tensor(pp.mean, dtype=torch.float64).view(1, 3, 1, 1)
        self.register_buffer("pixel_weight", (pp.rescale / std).float(), persistent=False)
        self.register_buffer("pixel_bias", (-mean / std).float(), persistent=False)
        self.output_dim, self.token_dim = self._dims()

    def _dims(self) -> tuple[int, int]:
        """``(pooled, token)`` sizes: from the config for CLIP- and SigLIP-like models (a forward
        pass of a large ViT costs seconds on a CPU), else from one forward pass."""
        proj = getattr(self.model, "visual_projection", None)
        vcfg = getattr(self.hf_config, "vision_config", None)
        if isinstance(proj, nn.Linear):
            return proj.out_features, proj.out_features  # tokens projected as the pooled vector
        if self.family in _SIGMOID_FAMILIES and getattr(vcfg, "hidden_size", None):
            return int(vcfg.hidden_size), int(vcfg.hidden_size)  # attention-pooling head keeps the width
        with torch.no_grad():
            probe = self(torch.zeros(1, 3, *self.input_hw, dtype=torch.uint8))
        return int(probe.pooled.shape[-1]), int(probe.tokens.shape[-1])

    def preprocess(self, image: Any) -> torch.Tensor:
        """PIL image -> uint8 ``(3, H, W)``, resized and cropped as the model's processor does
        (``resize: crop``), or squashed / letterboxed to the same input size."""
        if self.resize == "crop":
            return self.preprocessing.apply(image)
        return resize_image(image, self.input_hw, self.resize, fill=self.letterbox_fill)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 255] ``(B, 3, H, W)`` -> the model's ``pixel_values`` (rescaled, normalised)."""
        x = pixels_to_float(images, self.input_hw)  # (B, 3, H, W) in [0, 255]
        x = torch.addcmul(self.pixel_bias, x, self.pixel_weight)  # rescaled and normalised
        return x.to(next(self.model.parameters()).dtype)

    def forward(self, images: torch.Tensor) -> TowerOutput:
        x = self.pixel_values(images)
        if self.source.kind == "open_clip":
            pooled, tokens = self._open_clip(x)
        else:
            pooled, tokens = self._hf(x)
        return TowerOutput(tokens=tokens, pooled=pooled, mask=None)

    def _hf(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with _capture_output(_child(self.model, _SIDE_WORDS["image"])) as seen:
            out = self.model.get_image_features(pixel_values=x)
        if torch.is_tensor(out):  # transformers 4.x returns the embeddings alone
            pooled, hidden = out, _hidden(seen)
        else:
            pooled, hidden = out.pooler_output, out.last_hidden_state
        vision = _child(self.model, _SIDE_WORDS["image"])
        embeddings = getattr(vision, "embeddings", None)
        if self.tokens_kind == "patches" and getattr(embeddings, "class_embedding", None) is not None:
            hidden = hidden[:, 1:]  # (B, P, Dv) CLS dropped
        proj = getattr(self.model, "visual_projection", None)
        if hidden.shape[-1] != pooled.shape[-1] and isinstance(proj, nn.Module):
            norm = getattr(vision, "post_layernorm", None)
            hidden = proj(norm(hidden) if isinstance(norm, nn.Module) else hidden)  # (B, P, E)
        return pooled, hidden

    def _open_clip(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """OpenCLIP's ``visual`` with ``output_tokens``: its patch tokens (CLS dropped, after
        ``ln_post``) taken into the embedding space by ``proj``; ``tokens: all`` puts the pooled
        vector (the projected CLS token of a ``tok``-pooled ViT) first. A timm ViT trunk gives
        its final-norm tokens through its own and OpenCLIP's heads; any other tower its pooled
        vector as its one token."""
        visual = self.model.visual
        if _is_timm_vit(visual):
            return self._timm(visual, x)
        has_tokens = hasattr(visual, "output_tokens")
        if has_tokens:
            visual.output_tokens = True
        try:
            out = visual(x)
        finally:
            if has_tokens:
                visual.output_tokens = False
        pooled, tokens = out if isinstance(out, tuple) else (out, out[:, None])
        proj = getattr(visual, "proj", None)
        if tokens.shape[-1] != pooled.shape[-1] and isinstance(proj, torch.Tensor):
            tokens = tokens @ proj  # (B, P, E)
        if self.tokens_kind == "all" and isinstance(out, tuple):
            tokens = torch.cat([pooled[:, None], tokens], dim=1)  # (B, 1 + P, E)
        return pooled, tokens

    def _timm(self, visual: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """OpenCLIP's ``TimmModel`` (``head(trunk(x))``) in one pass over the trunk's features:
        pooled as it computes it; tokens: every position (prefix tokens dropped for
        ``patches``) through the trunk's ``fc_norm`` and classifier and OpenCLIP's head."""
        trunk = visual.trunk
        feats = trunk.forward_features(x)  # (B, T, D)
        pooled = visual.head(trunk.forward_head(feats))  # (B, E)
        tokens = feats[:, int(trunk.num_prefix_tokens):] if self.tokens_kind == "patches" else feats  # (B, P, D)
        for layer in (getattr(trunk, "fc_norm", None), getattr(trunk, "head", None), visual.head):
            if isinstance(layer, nn.Module):
                tokens = layer(tokens)  # per token, as after pooling
        return pooled, tokens  # (B, E), (B, P, E)


def _is_timm_vit(visual: nn.Module) -> bool:
    """An OpenCLIP ``TimmModel`` whose trunk is a timm ViT (features ``(B, T, D)``) without a
    custom pooling head."""
    trunk = getattr(visual, "trunk", None)
    head = getattr(visual, "head", None)
    return (trunk is not None and hasattr(trunk, "forward_features") and hasattr(trunk, "forward_head")
            and hasattr(trunk, "num_prefix_tokens") and isinstance(head, nn.Sequential)
            and "pool" not in dict(head.named_children()))


@TEXT_TOWERS.register("pretrained_text")
class PretrainedTextTower(_Pretrained, TextTower):
    """The text half of a pretrained dual encoder (see the module docstring).

    ``max_length``: truncation (default: the model's position count); ``padding``: ``auto``
    (``max_length`` for SigLIP, as it was trained, else the longest in the batch),
    ``longest`` or ``max_length``. Pooled: the model's text embedding; tokens: its last hidden
    states (projected when the model has a text projection), mask: the attention mask.
    """

    def __init__(self, source: str, sha256: str | None = None, max_length: int | None = None,
                 padding: str = "auto", grad_checkpointing: bool = False) -> None:
        super().__init__()
        _check_args("pretrained_text", source=(source, str), sha256=(sha256, (str, type(None))),
                    max_length=(max_length, (int, type(None))), padding=(padding, str),
                    grad_checkpointing=(grad_checkpointing, bool))
        if padding not in ("auto", "longest", "max_length"):
            raise ConfigError(f"pretrained_text: padding must be auto, longest or max_length, got {padding!r}")
        if max_length is not None and max_length < 1:
            raise ConfigError(f"pretrained_text: max_length must be a positive integer, got {max_length}")
        loaded = self._attach(source, "text", sha256, grad_checkpointing)
        self.tokenizer = loaded.tokenizer
        limit = self._position_limit()
        self.max_length = min(max_length or limit, limit)
        sigmoid = self.family in _SIGMOID_FAMILIES
        self.padding = ("max_length" if sigmoid else "longest") if padding == "auto" else padding
        if self.source.kind == "open_clip":  # its position embedding is added whole: one length
            if self.max_length != limit or padding not in ("auto", "max_length"):
                raise ConfigError(f"pretrained_text: an open_clip text tower reads exactly its context length "
                                  f"({limit}): max_length must be null or {limit}, padding auto or max_length")
            self.padding = "max_length"
        if self.source.kind == "hf":
            self.input_names = tuple(n for n in inspect.signature(self.model.get_text_features).parameters
                                     if n in ("input_ids", "attention_mask", "position_ids"))
        self.output_dim = self._dim()

    def _dim(self) -> int:
        """The embedding size: the output of CLIP's ``text_projection`` or SigLIP's ``head``, else
        from one forward pass."""
        text = _child(self.model, ("text",))
        for proj in (getattr(self.model, "text_projection", None), getattr(text, "head", None)):
            if isinstance(proj, nn.Linear):
                return proj.out_features
        with torch.no_grad():
            return int(self(self.tokenize(["a"])).pooled.shape[-1])

    def _position_limit(self) -> int:
        if self.source.kind == "open_clip":
            return int(getattr(self.model, "context_length", 77))
        tcfg = getattr(self.hf_config, "text_config", self.hf_config)
        return int(getattr(tcfg, "max_position_embeddings", 77))

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Strings -> the model's inputs ``(B, L)``, tokenized as the model was trained."""
        if self.source.kind == "open_clip":
            ids = self.tokenizer(list(texts))  # (B, context_length), padded as the model was trained
            return {"input_ids": ids, "attention_mask": open_clip_mask(ids, self.tokenizer)}
        enc = self.tokenizer(list(texts), padding=self.padding, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return dict(enc)

    def forward(self, batch: dict[str, torch.Tensor]) -> TowerOutput:
        device = next(self.model.parameters()).device
        if self.source.kind == "open_clip":
            return self._open_clip(batch, device)
        inputs = {k: v.to(device) for k, v in batch.items() if k in self.input_names}
        out = self.model.get_text_features(**inputs)
        if torch.is_tensor(out):  # transformers 4.x
            return TowerOutput(tokens=out[:, None], pooled=out, mask=None)
        tokens = out.last_hidden_state  # (B, L, Dt)
        proj = getattr(self.model, "text_projection", None)
        if tokens.shape[-1] != out.pooler_output.shape[-1] and isinstance(proj, nn.Module):
            tokens = proj(tokens)  # (B, L, E)
        mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else None
        return TowerOutput(tokens=tokens, pooled=out.pooler_output, mask=mask)

    def _open_clip(self, batch: dict[str, torch.Tensor], device: torch.device) -> TowerOutput:
        """OpenCLIP's ``encode_text``; tokens: the final-norm states of every position (a forward
        hook on ``ln_final``, or a custom text tower's ``output_tokens``), projected as the pooled
        vector; mask: the tokenizer's real tokens (through the end-of-text token)."""
        ids = batch["input_ids"].to(device)
        text = getattr(self.model, "text", None)
        if text is not None and hasattr(text, "output_tokens"):  # CustomTextCLIP's TextTransformer
            text.output_tokens = True
            try:
                out = text(ids)
            finally:
                text.output_tokens = False
            pooled, tokens = out if isinstance(out, tuple) else (out, None)
            proj = getattr(text, "text_projection", None)  # TextTransformer; HFTextEncoder: proj
            proj = getattr(text, "proj", None) if proj is None else proj
        else:
            with _capture_output(getattr(self.model, "ln_final", None)) as seen:
                pooled = self.model.encode_text(ids)
            tokens, proj = _hidden(seen), getattr(self.model, "text_projection", None)
        if tokens is not None and tokens.dim() == 3 and tokens.shape[-1] != pooled.shape[-1] and proj is not None:
            tokens = proj(tokens) if isinstance(proj, nn.Module) else tokens @ proj  # (B, L, E)
        if tokens is None or tokens.dim() != 3 or tokens.shape[-1] != pooled.shape[-1]:
            tokens = pooled[:, None]  # (B, 1, E) a text tower without per-token states in the embedding space
        mask = batch.get("attention_mask")
        if mask is not None and tokens.shape[1] == mask.shape[1]:
            mask = mask.to(device).bool()
        else:
            mask = None
        return TowerOutput(tokens=tokens, pooled=pooled, mask=mask)


def open_clip_mask(ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """``(B, L)`` True on an OpenCLIP tokenizer's real tokens: through the first end-of-text token
    (``SimpleTokenizer``, which pads with 0), else where the id is not the pad id."""
    eot = getattr(tokenizer, "eot_token_id", None)
    if eot is not None:
        is_eot = ids == eot  # (B, L)
        last = torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), ids.shape[1] - 1)  # (B,)
        return torch.arange(ids.shape[1], device=ids.device)[None] <= last[:, None]
    pad = getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None)
    return ids != pad if pad is not None else torch.ones_like(ids, dtype=torch.bool)


def _check_args(tower: str, **given: tuple[Any, Any]) -> None:
    """A :class:`ConfigError` naming the first argument whose value has the wrong type (a bool is
    not an integer)."""
    for name, (value, types) in given.items():
        types = types if isinstance(types, tuple) else (types,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            words = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError(f"{tower}: argument {name} expects {words}, got {value!r}")


def _child(model: nn.Module, words: tuple[str, ...]) -> nn.Module | None:
    """The first top-level child of ``model`` whose name has one of ``words``."""
    for name, child in model.named_children():
        if child is not None and any(w in name for w in words):
            return child
    return None


@contextmanager
def _capture_output(module: nn.Module | None) -> Iterator[list]:
    """Collect ``module``'s forward outputs while the block runs (tokens of models whose
    ``get_*_features`` return the embedding alone)."""
    seen: list = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o)) if module is not None else None
    try:
        yield seen
    finally:
        if handle is not None:
            handle.remove()


def _hidden(seen: list) -> torch.Tensor | None:
    if not seen:
        return None
    out = seen[-1]
    if torch.is_tensor(out):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    return hidden if hidden is not None else out[0]


__all__ = ["ImagePreprocessing", "Loaded", "OPEN_CLIP_SCHEMAS", "PretrainedImageTower", "PretrainedTextTower",
           "SOURCE_KINDS", "Source", "absolute_spec", "check_digest", "embedding_dim", "hf_image_preprocessing",
           "keep_side", "load_source", "logit_terms", "open_clip_arch", "open_clip_dir_weights", "open_clip_mask",
           "open_clip_preprocessing", "parse_source", "read_open_clip_state", "source_digest", "trained_loss",
           "weights_digest"]
