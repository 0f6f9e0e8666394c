"""Image tower over precomputed feature rows (pooled vectors, detector regions or grids).

This is the precomp encoder of VSE++ / SCAN / VSE-infinity: a fully connected layer
(optionally plus VSE-infinity's residual 2-layer MLP) maps each region to the joint
space, optionally L2-normalised per region (SCAN's ``l2norm(fc(images))``), and a
pooling head (mean, max or GPO) makes the pooled vector.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..base import IMAGE_TOWERS, POOLING, ImageTower, TowerOutput
from ..heads import pooling as _pooling  # importing it also registers the pooling heads


class BatchNormMLP(nn.Module):
    """VSE-infinity's ``MLP``: Linear -> BatchNorm -> ReLU (hidden layers), then Linear.

    BatchNorm runs over all ``B * N`` region vectors together, as in the original.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2) -> None:
        super().__init__()
        hidden = [hidden_dim] * (num_layers - 1)
        self.out_dim = out_dim
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip([in_dim] + hidden, hidden + [out_dim]))
        self.bns = nn.ModuleList(nn.BatchNorm1d(d) for d in hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        x = x.reshape(B * N, D)  # (B*N, D_in)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.bns):
                x = F.relu(self.bns[i](x))
        return x.view(B, N, self.out_dim)  # (B, N, D_out)


def _unpack_features(images: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Accept a tensor, ``(features, mask)`` or ``{"features": ..., "mask"/"lengths": ...}``."""
    if isinstance(images, torch.Tensor):
        return images, None
    if isinstance(images, dict):
        if "features" not in images:
            raise ValueError(f"feature batch dict needs a 'features' key, got keys {sorted(images)}")
        return images["features"], images.get("mask", images.get("lengths"))
    if isinstance(images, (tuple, list)) and len(images) == 2:
        return images[0], images[1]
    raise TypeError(f"features tower expects a tensor, (features, mask) or a dict, got {type(images).__name__}")


@IMAGE_TOWERS.register("features")
class FeatureTower(ImageTower):
    """Projects precomputed image features into the joint space.

    Input: ``(B, D_in)`` pooled vectors, or ``(B, R, D_in)`` regions/grid cells with an
    optional mask ``(B, R)`` bool or lengths ``(B,)``. Pass a tensor, a tuple
    ``(features, mask)`` or a dict ``{"features": ..., "mask": ...}``.

    Output: tokens ``(B, R, out_dim)`` (``R = 1`` for pooled input), pooled ``(B, out_dim)``
    from the ``pooling`` head, mask ``(B, R)`` or None when every token is real.
    """

    input_kind = "features"

    def __init__(self, in_dim: int, out_dim: int = 1024, proj: str = "linear", pooling: str = "mean",
                 normalize: bool = False, mlp_hidden: int | None = None,
                 pooling_args: dict | None = None) -> None:
        super().__init__()
        if proj not in ("linear", "mlp", "identity"):
            raise ConfigError(f"features tower: proj must be linear, mlp or identity, got {proj!r}")
        if proj == "identity" and in_dim != out_dim:
            raise ConfigError(f"features tower: proj=identity needs in_dim == out_dim ({in_dim} != {out_dim})")
        self.in_dim = in_dim
        self.output_dim = out_dim
        self.normalize = normalize
        self.proj_kind = proj
        self.fc = nn.Linear(in_dim, out_dim) if proj != "identity" else nn.Identity()
        if isinstance(self.fc, nn.Linear):
            # Xavier-uniform weight and zero bias, the init of VSE++ / SCAN / VSE-infinity
            nn.init.xavier_uniform_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)
        self.mlp = BatchNormMLP(in_dim, mlp_hidden or out_dim // 2, out_dim, 2) if proj == "mlp" else None
        self.pool = POOLING.create(pooling, dim=out_dim, **(pooling_args or {}))

    def forward(self, images: Any, mask: torch.Tensor | None = None) -> TowerOutput:
        feats, packed_mask = _unpack_features(images)
        mask = packed_mask if mask is None else mask
        if feats.dim() == 2:
            feats = feats.unsqueeze(1)  # (B, 1, D_in)
        elif feats.dim() != 3:
            raise ValueError(f"features must be (B, D) or (B, R, D), got shape {tuple(feats.shape)}")
        if feats.shape[-1] != self.in_dim:
            raise ValueError(f"features tower expects dim {self.in_dim}, got {feats.shape[-1]}")
        feats = feats.to(self.fc.weight.dtype if isinstance(self.fc, nn.Linear) else feats.dtype)
        tokens = self.fc(feats)  # (B, R, D)
        if self.mlp is not None:
            tokens = tokens + self.mlp(feats)  # VSE-infinity: fc(x) + MLP(x)
        if self.normalize:
            tokens = F.normalize(tokens, dim=-1)
        bool_mask = None if mask is None else _pooling.as_mask(mask, tokens)
        pooled = self.pool(tokens, bool_mask)  # (B, D)
        return TowerOutput(tokens=tokens, pooled=pooled, mask=bool_mask)
