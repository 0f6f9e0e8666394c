"""Shared base for losses defined on an image x text score matrix."""
from __future__ import annotations

import torch
from torch import nn


class ScoreMatrixLoss(nn.Module):
    """A loss over the in-batch score matrix: ``forward`` scores embeddings by dot product,
    pair scorers call :meth:`from_scores` with their own ``(Bi, Bt)`` matrix."""

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, *, pos_mask: torch.Tensor | None = None,
                step: int | None = None) -> dict[str, torch.Tensor]:
        return self.from_scores(image_emb @ text_emb.t(), pos_mask=pos_mask, step=step)

    def from_scores(self, scores: torch.Tensor, pos_mask: torch.Tensor | None = None,
                    step: int | None = None) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError
