"""Any Hugging Face vision model as an image tower (ViT, CLIP vision, ResNet, ConvNeXt, ...).

The model is loaded with ``transformers`` from a hub name or a local folder (a local
folder is read with ``local_files_only=True``, so nothing is fetched). Preprocessing does
not use ``AutoImageProcessor``: the input size and normalisation are read from the
folder's ``preprocessor_config.json`` when present, else from the model config
(``image_size``) and ImageNet mean/std.

Input convention: pixels ``(B, 3, H, W)`` uint8 or float in ``[0, 255]``, RGB, like every
pixel tower here; the tower rescales to [0, 1], resizes to the model's input size when
needed and normalises.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError, XmodalError, where
from ..base import IMAGE_TOWERS, ImageTower, TowerOutput
from .efficientnet import pixels_to_float
from .resize import DEFAULT_FILL, check_resize, resize_image

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Configs of joint image-text models: load only their vision half.
_VISION_CLASSES = {
    "clip": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "chinese_clip": "ChineseCLIPVisionModel",
}
# Models whose pooler is a separate (often untrained) tanh layer that can be left out.
_OPTIONAL_POOLER = {"vit", "deit"}


def _read_preprocessor_config(name_or_path: str, local: bool) -> tuple[dict, str | None]:
    """The model's ``preprocessor_config.json`` as a dict (empty when there is none)."""
    if local:
        path = Path(name_or_path) / "preprocessor_config.json"
        if not path.is_file():
            return {}, None
    else:
        try:
            from transformers.utils import cached_file

            found = cached_file(name_or_path, "preprocessor_config.json",
                                _raise_exceptions_for_missing_entries=False)
        except Exception as e:  # noqa: BLE001 - any hub/cache failure means "use defaults"
            log.warning("hf_vision: could not read preprocessor_config.json of %s (%s); using defaults",
                        name_or_path, e)
            return {}, None
        if not found:
            return {}, None
        path = Path(found)
    try:
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    except (OSError, json.JSONDecodeError) as e:
        raise XmodalError(where(path) + f"cannot read preprocessor config: {e}") from e


def _hw(value: Any) -> tuple[int, int] | None:
    """``224`` / ``{"height": h, "width": w}`` / ``{"shortest_edge": s}`` -> (h, w)."""
    if value is None:
        return None
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            s = int(value["shortest_edge"])
            return s, s
    return None


def resolve_preprocessing(pp: dict, config: Any) -> tuple[tuple[int, int], int | None, tuple, tuple]:
    """(input size (h, w), shorter-side resize or None, mean, std) from the configs."""
    size = _hw(pp.get("size"))
    crop = _hw(pp.get("crop_size")) if pp.get("do_center_crop", "crop_size" in pp) else None
    resize_shorter = None
    if crop is not None:
        hw = crop
        if isinstance(pp.get("size"), dict) and "shortest_edge" in pp["size"]:
            resize_shorter = int(pp["size"]["shortest_edge"])
    elif size is not None:
        hw = size
        if "crop_pct" in pp and isinstance(pp.get("size"), dict) and "shortest_edge" in pp["size"]:
            # ConvNeXt: resize the shorter side to size / crop_pct, then crop `size`
            resize_shorter = int(hw[0] / float(pp["crop_pct"]))
    else:
        vcfg = getattr(config, "vision_config", config)
        s = getattr(vcfg, "image_size", None)
        s = s[0] if isinstance(s, (list, tuple)) else s
        hw = (int(s), int(s)) if s else (224, 224)
    if pp.get("do_normalize", True) and "image_mean" in pp and "image_std" in pp:
        mean, std = tuple(pp["image_mean"]), tuple(pp["image_std"])
    elif pp.get("do_normalize", True):
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return hw, resize_shorter, mean, std


def _feature_dim(config: Any) -> int | None:
    vcfg = getattr(config, "vision_config", config)
    sizes = getattr(vcfg, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    dim = getattr(vcfg, "hidden_size", None)
    return int(dim) if dim else None


@IMAGE_TOWERS.register("hf_vision")
class HFVisionTower(ImageTower):
    """A ``transformers`` vision backbone.

    Tokens: ``last_hidden_state`` as ``(B, N, D)`` for ViT-like models, or the final
    feature map ``(B, C, H, W)`` flattened to ``(B, H*W, C)`` for conv models. Pooled:
    ``pooling="auto"`` uses ``pooler_output`` when the model returns one (CLIP's
    post-layernormed CLS, ConvNeXt's normed mean, ResNet's average pool, ViT's tanh
    pooler) and the token mean otherwise; ``"pooler"`` requires it, ``"cls"`` takes
    token 0, ``"mean"`` the token mean. ``out_dim`` adds a linear projection applied
    to tokens and pooled vector. ``frozen=True`` fixes the backbone (eval mode, no grads).
    ``resize`` (``crop``, ``squash``, ``letterbox``) and ``letterbox_fill`` choose how
    :meth:`preprocess` fits a non-square image (:mod:`xmodal.models.image.resize`).
    """

    input_kind = "pixels"

    def __init__(self, name_or_path: str, frozen: bool = False, out_dim: int | None = None,
                 pooling: str = "auto", image_size: int | None = None,
                 mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None, resize: str = "crop",
                 letterbox_fill: Any = DEFAULT_FILL) -> None:
        super().__init__()
        self.resize, self.letterbox_fill = check_resize(resize, letterbox_fill, owner="hf_vision")
        if pooling not in ("auto", "pooler", "cls", "mean"):
            raise ConfigError(f"hf_vision: pooling must be auto, pooler, cls or mean, got {pooling!r}")
        import transformers

        transformers.utils.logging.disable_progress_bar()

        local = Path(name_or_path).exists()
        self.name_or_path = str(name_or_path)
        try:
            config = transformers.AutoConfig.from_pretrained(self.name_or_path, local_files_only=local)
        except (OSError, ValueError) as e:
            raise XmodalError(f"hf_vision: cannot load a model config from {name_or_path!r}: {e}") from e
        model_type = getattr(config, "model_type", "")
        kwargs: dict[str, Any] = {"local_files_only": local}
        if model_type in _VISION_CLASSES:
            cls = getattr(transformers, _VISION_CLASSES[model_type])
        elif hasattr(config, "vision_config"):
            raise ConfigError(f"hf_vision: model type {model_type!r} is a multi-part model; supported "
                              f"joint models are {sorted(_VISION_CLASSES)}")
        else:
            cls = transformers.AutoModel
            if model_type in _OPTIONAL_POOLER and pooling in ("cls", "mean"):
                kwargs["add_pooling_layer"] = False
        if model_type in _VISION_CLASSES:
            # the text half of a joint checkpoint is left out on purpose; transformers
            # would report every one of its weights as unexpected
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
            try:
                self.model = cls.from_pretrained(self.name_or_path, **kwargs)
            finally:
                transformers.logging.set_verbosity(verbosity)
        else:
            self.model = cls.from_pretrained(self.name_or_path, **kwargs)
        self.model_type = model_type

        pp, pp_path = _read_preprocessor_config(self.name_or_path, local)
        try:
            hw, resize_shorter, pmean, pstd = resolve_preprocessing(pp, config)
        except (TypeError, ValueError, KeyError) as e:
            raise XmodalError(where(pp_path or self.name_or_path) + f"bad preprocessor config: {e}") from e
        if image_size is not None:
            hw, resize_shorter = (image_size, image_size), None
        self.input_hw = hw
        self.image_size = hw[0]
        self.resize_shorter = resize_shorter
        self.register_buffer("pixel_mean", torch.tensor(mean or pmean, dtype=torch.float).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std or pstd, dtype=torch.float).view(1, 3, 1, 1),
                             persistent=False)

        self.pooling = pooling
        self.frozen = frozen
        if frozen:
            self.model.requires_grad_(False)
            self.model.eval()
        dim = _feature_dim(config)
        if dim is None:  # unknown family: ask the model
            with torch.no_grad():
                dim = self._backbone(torch.zeros(1, 3, *hw))[0].shape[-1]
        self.feature_dim = dim
        self.proj = nn.Linear(dim, out_dim) if out_dim else None
        self.output_dim = out_dim or dim

    def train(self, mode: bool = True) -> "HFVisionTower":
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def preprocess(self, image: Any) -> torch.Tensor:
        """PIL image -> uint8 ``(3, H, W)`` at the model's input size, fitted by ``resize``
        (``crop``: the processor's shorter-side resize + center crop; ``squash``; ``letterbox``)."""
        return resize_image(image, self.input_hw, self.resize, resize_shorter=self.resize_shorter,
                            fill=self.letterbox_fill)

    def _backbone(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.model(pixel_values=x)
        hidden = out.last_hidden_state
        if hidden.dim() == 4:  # conv feature map
            tokens = hidden.flatten(2).transpose(1, 2)  # (B, H*W, C)
        else:
            tokens = hidden  # (B, N, D)
        pooler = getattr(out, "pooler_output", None)
        if pooler is not None:
            pooler = pooler.flatten(1)  # ResNet returns (B, C, 1, 1) -> (B, C)
        return tokens, pooler

    def rebuilt_from_source(self) -> bool:
        return self.proj is None

    def forward(self, images: torch.Tensor) -> TowerOutput:
        x = pixels_to_float(images, self.input_hw) / 255.0
        x = (x - self.pixel_mean) / self.pixel_std
        x = x.to(next(self.model.parameters()).dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            tokens, pooler = self._backbone(x)
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "mean" or (self.pooling == "auto" and pooler is None):
            pooled = tokens.mean(dim=1)
        else:
            if pooler is None:
                raise ConfigError(f"hf_vision: {self.model_type!r} returns no pooler_output; use pooling=mean or cls")
            pooled = pooler
        if self.proj is not None:
            tokens, pooled = self.proj(tokens), self.proj(pooled)
        return TowerOutput(tokens=tokens, pooled=pooled, mask=None)
