"""Projection heads: map a tower's output into the joint embedding space."""
from __future__ import annotations

import torch
from torch import nn

from ..base import POOLING, TowerOutput


class MLP(nn.Module):
    """Two-layer MLP with a residual linear path (VSE-infinity's ``MLP`` + ``fc``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x)


class VokenMLP(nn.Module):
    """The sentence-level Vokenization head: three linears, ReLU + dropout between them.

    ``Linear(in, h) -> ReLU -> Dropout -> Linear(h, h) -> ReLU -> Dropout -> Linear(h, out)``:
    the ``MLP(backbone_dim, [1024, 1024, dim])`` of ``retrieval_model/xmatching/model.py`` in
    jokieleung/Maria (``Sent_LangModel`` and ``VisnModel``; dropout 0.2, no normalisation
    layer, no residual path). The L2 normalisation that follows it there is done by the
    dual encoder.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ProjectionHead(nn.Module):
    """Pool (optionally) and project a :class:`TowerOutput` to ``(B, out_dim)``.

    ``input="pooled"`` projects the tower's pooled vector; ``input="tokens"`` projects every
    token and then pools them with a registered pooling head (mean, max, GPO), the
    VSE-infinity order (project, then pool).
    """

    def __init__(self, in_dim: int, out_dim: int, *, input: str = "pooled", pooling: str = "mean",
                 pooling_args: dict | None = None, proj: str = "linear", hidden_dim: int = 1024,
                 dropout: float = 0.0) -> None:
        super().__init__()
        from ...errors import ConfigError
        from . import pooling as _pooling  # noqa: F401  (registers pooling heads)

        if input not in ("pooled", "tokens"):
            raise ConfigError(f"head input must be 'pooled' or 'tokens', got {input!r}")
        self.input = input
        self.out_dim = out_dim
        if proj == "linear":
            self.proj: nn.Module = nn.Linear(in_dim, out_dim)
        elif proj == "mlp":
            self.proj = MLP(in_dim, hidden_dim, out_dim, dropout)
        elif proj == "voken_mlp":
            self.proj = VokenMLP(in_dim, hidden_dim, out_dim, dropout)
        elif proj == "identity":
            if in_dim != out_dim:
                raise ConfigError(f"identity projection needs in_dim == out_dim, got {in_dim} != {out_dim}")
            self.proj = nn.Identity()
        else:
            raise ConfigError(f"unknown projection {proj!r}; choose linear, mlp, voken_mlp or identity")
        self.pool = POOLING.create(pooling, dim=out_dim, **(pooling_args or {})) if input == "tokens" else None

    def forward(self, feats: TowerOutput) -> torch.Tensor:
        if self.pool is None:
            return self.proj(feats.pooled)  # (B, out_dim)
        tokens = self.proj(feats.tokens)  # (B, N, out_dim)
        return self.pool(tokens, feats.mask)  # (B, out_dim)
