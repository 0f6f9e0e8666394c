"""Shared base for losses defined on an image x text score matrix."""
from __future__ import annotations

import torch
from torch import nn

from ..registry import Registry


LOSSES: Registry[nn.Module] = Registry("loss")
#: registered loss name -> the dataclass of its ``loss.args`` (declared beside the loss class;
#: :func:`xmodal.losses.create_loss` parses the keyword arguments into it before building)
LOSS_ARGS: dict[str, type] = {}


def resolve_pos_mask(pos_mask: torch.Tensor | None, n_images: int, n_texts: int,
                     device: torch.device) -> torch.Tensor:
    """A boolean ``(Bi, Bt)`` positives mask; None -> identity (needs ``Bi == Bt``)."""
    if pos_mask is None:
        if n_images != n_texts:
            raise ValueError(f"pos_mask is required when the batch has {n_images} images and {n_texts} texts")
        return torch.eye(n_images, dtype=torch.bool, device=device)
    if tuple(pos_mask.shape) != (n_images, n_texts):
        raise ValueError(f"pos_mask shape {tuple(pos_mask.shape)} != scores shape {(n_images, n_texts)}")
    return pos_mask.to(device=device, dtype=torch.bool)


class ScoreMatrixLoss(nn.Module):
    """A loss over the in-batch score matrix: ``forward`` scores embeddings by dot product,
    pair scorers call :meth:`from_scores` with their own ``(Bi, Bt)`` matrix."""

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, *, pos_mask: torch.Tensor | None = None,
                step: int | None = None) -> dict[str, torch.Tensor]:
        return self.from_scores(image_emb @ text_emb.t(), pos_mask=pos_mask, step=step)

    def from_scores(self, scores: torch.Tensor, pos_mask: torch.Tensor | None = None,
                    step: int | None = None) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError
