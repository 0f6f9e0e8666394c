"""Pretrained CLIP-family dual encoders as xmodal towers (CLIP, SigLIP, OpenCLIP checkpoints).

A pretrained vision-language model becomes two towers, ``pretrained_image`` and
``pretrained_text`` (registered in :data:`~xmodal.models.base.IMAGE_TOWERS` /
:data:`~xmodal.models.base.TEXT_TOWERS`), each loaded from a *source*:

- ``hf:NAME_OR_DIR``: a Hugging Face ``transformers`` model with ``get_image_features`` /
  ``get_text_features`` (``CLIPModel``, ``SiglipModel``, ...), a hub name or a folder written by
  ``save_pretrained``. A folder is read with ``local_files_only=True``; a hub name goes through
  the ``transformers`` cache (offline and not cached: an :class:`~xmodal.errors.XmodalError`).
- ``open_clip:ARCH:PRETRAINED_OR_FILE``: an ``open-clip-torch`` model (optional extra; it needs
  torchvision).

A tower's pooled vector is the model's own embedding (``get_image_features`` /
``get_text_features``: CLIP's EOS pooling and projection, SigLIP's attention-pooling head), so
``model: {type: dual_encoder}`` with identity heads scores exactly as the original model does
(``xmodal pretrained`` writes such a run). Its tokens are the last hidden states: for the image
side the patch tokens (CLS dropped), brought into the embedding space by the model's own
post-layernorm and projection when the backbone has them, so that ADAPT, ALADIN and the
cross-encoder can use them as region tokens.

Preprocessing is the model's own, re-implemented without torchvision: the image processor's
resize (shortest edge or fixed size, its resampling filter), center crop, rescale and
normalisation (read from the processor ``transformers`` loads with its PIL backend), and the
model's tokenizer (SigLIP pads to ``max_length`` as it was trained).

Each tower loads the whole checkpoint and keeps its own half (the other half is dropped), so a
dual encoder reads the checkpoint twice. ``sha256`` pins the weights of an ``hf:`` folder: the
tower checks the digest of its ``*.safetensors`` files (:func:`weights_digest`) before loading
them (``xmodal pretrained`` writes runs that pin their copy of the model this way).
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

from ..errors import ConfigError, XmodalError
from .base import IMAGE_TOWERS, TEXT_TOWERS, ImageTower, TextTower, TowerOutput
from .image.efficientnet import pixels_to_float
from .image.resize import check_resize, resize_image

log = logging.getLogger(__name__)

SOURCE_KINDS = ("hf", "open_clip")
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
        return Source(kind, arch, pretrained or None)
    return Source(kind, rest)


# ------------------------------------------------------------------------------------------
# image preprocessing: the processor's own steps, without torchvision
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImagePreprocessing:
    """What a model's image processor does: resize (``shortest_edge`` keeping the aspect ratio,
    or to ``size`` = (h, w)), center crop to ``crop`` (h, w), then ``x * rescale`` and
    ``(x - mean) / std`` per channel. ``resample`` is a PIL filter number (3 = bicubic)."""

    size: tuple[int, int] | None
    shortest_edge: int | None
    crop: tuple[int, int] | None
    resample: int
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

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
        w, h = image.size
        if self.shortest_edge is not None:
            # transformers' get_resize_output_image_size(default_to_square=False): int(), not round()
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
            image = image.resize((nw, nh), resample=self.resample)
        elif self.size is not None:
            image = image.resize((self.size[1], self.size[0]), resample=self.resample)
        if self.crop is not None:
            ch, cw = self.crop
            iw, ih = image.size
            top, left = (ih - ch) // 2, (iw - cw) // 2
            image = image.crop((left, top, left + cw, top + ch))  # out of the image: zeros
        arr = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
        # the channel move in numpy: torch's uint8 permute + contiguous is ~30x slower on CPU
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, H, W)


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
    read); ``sha256``: the :func:`weights_digest` an ``hf:`` folder must have."""
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


def check_digest(src: Source, sha256: str) -> None:
    """An :class:`XmodalError` unless the ``hf:`` folder of ``src`` has the weights ``sha256`` names."""
    if src.kind != "hf" or not Path(src.name).is_dir():
        raise ConfigError(f"sha256: pins the weights of an hf: folder, but the source is {src.kind}:{src.name}")
    found = weights_digest(Path(src.name))
    if found != sha256:
        raise XmodalError(f"{src.name}: its weight files changed since the run was written (sha256 {found[:16]}..., "
                          f"the config pins {sha256[:16]}...): restore the folder or convert the model again")


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


def _load_open_clip(src: Source) -> Loaded:
    try:
        import open_clip
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision failing inside it
        raise XmodalError(f"open_clip:{src.name}: needs open-clip-torch and a working torchvision "
                          f"(pip install 'xmodal[open_clip]'); importing it failed: {exc}") from None
    try:
        model = open_clip.create_model(src.name, pretrained=src.pretrained)
        tokenizer = open_clip.get_tokenizer(src.name)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        raise XmodalError(f"open_clip:{src.name}:{src.pretrained or ''}: cannot load it ({exc})") from None
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    resample = {"bicubic": 3, "bilinear": 2, "nearest": 0}.get(cfg.get("interpolation", "bicubic"), 3)
    squash = cfg.get("resize_mode", "shortest") == "squash"
    pp = ImagePreprocessing(size=hw if squash else None, shortest_edge=None if squash else min(hw),
                            crop=None if squash else hw, resample=resample, rescale=1 / 255,
                            mean=_triple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                            std=_triple(cfg.get("std", open_clip.OPENAI_DATASET_STD)))
    family = "siglip" if hasattr(model, "logit_bias") and model.logit_bias is not None else "clip"
    return Loaded(model.eval(), src, f"open_clip-{family}", tokenizer, pp)


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
        visual = self.model.visual
        visual.output_tokens = True
        try:
            out = visual(x)
        finally:
            visual.output_tokens = False
        pooled, tokens = out if isinstance(out, tuple) else (out, out[:, None])
        proj = getattr(visual, "proj", None)
        if tokens.shape[-1] != pooled.shape[-1] and isinstance(proj, torch.Tensor):
            tokens = tokens @ proj  # (B, P, E)
        return pooled, tokens


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
            return {"input_ids": self.tokenizer(list(texts))}
        enc = self.tokenizer(list(texts), padding=self.padding, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return dict(enc)

    def forward(self, batch: dict[str, torch.Tensor]) -> TowerOutput:
        device = next(self.model.parameters()).device
        if self.source.kind == "open_clip":
            ids = batch["input_ids"].to(device)
            with _capture_output(getattr(self.model, "ln_final", None)) as seen:
                pooled = self.model.encode_text(ids)
            tokens = _hidden(seen)
            proj = getattr(self.model, "text_projection", None)
            if tokens is None:
                tokens = pooled[:, None]  # (B, 1, E) a text tower without per-token states
            elif tokens.shape[-1] != pooled.shape[-1] and isinstance(proj, torch.Tensor):
                tokens = tokens @ proj  # (B, L, E)
            return TowerOutput(tokens=tokens, pooled=pooled, mask=None)
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


__all__ = ["ImagePreprocessing", "Loaded", "PretrainedImageTower", "PretrainedTextTower", "SOURCE_KINDS", "Source",
           "check_digest", "embedding_dim", "hf_image_preprocessing", "keep_side", "load_source", "logit_terms",
           "parse_source", "trained_loss", "weights_digest"]
