"""Losses over a batch of image and text embeddings (or a score matrix).

Every loss is an ``nn.Module`` called as
``loss(image_emb (Bi, D), text_emb (Bt, D), *, pos_mask=None, step=None) -> dict``;
scorers that need both sides at once use ``loss.from_scores(scores (Bi, Bt), pos_mask=None,
step=None)``. The dict holds named terms: the trainer sums the keys ending in ``_loss``
and logs the rest (temperatures, schedules) as metrics.

``pos_mask[i, t]`` is True where image ``i`` and text ``t`` match; None means the diagonal
(``Bi == Bt``, pair ``i`` is image ``i`` with text ``i``). Several captions of one image
in a batch are all positives of it, and are never used as each other's negatives.
Learnable terms (temperature, bias) are ``nn.Parameter`` of the loss module, so the
optimizer must be given the loss's parameters too.
"""
from __future__ import annotations

import torch
from torch import nn

from ..registry import Registry

LOSSES: Registry[nn.Module] = Registry("loss")


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


def create_loss(name: str, **kwargs: object) -> nn.Module:
    """Build a registered loss by name (``hinge``, ``adapt_hinge``, ``infonce``, ``siglip``, ``triplet``)."""
    return LOSSES.create(name, **kwargs)


def list_losses() -> list[str]:
    """Names of the registered losses."""
    return LOSSES.names()


# imported last: the modules register themselves in LOSSES defined above
from .contrastive import InfoNCELoss, SigLIPLoss  # noqa: E402
from .distill import AladinLoss  # noqa: E402,F401  (registers "aladin")
from .hinge import AdaptHingeLoss, HingeLoss  # noqa: E402
from .relation import IaisLoss  # noqa: E402,F401  (registers "iais")
from .triplet import TripletLoss, cosine_distance  # noqa: E402

__all__ = ["LOSSES", "AdaptHingeLoss", "HingeLoss", "InfoNCELoss", "SigLIPLoss", "TripletLoss",
           "cosine_distance", "create_loss", "list_losses", "resolve_pos_mask"]
