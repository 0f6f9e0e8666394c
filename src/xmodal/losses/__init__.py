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

from torch import nn

from ..config import args_dict, parse_args
from .base import LOSS_ARGS, LOSSES, resolve_pos_mask
from .contrastive import InfoNCELoss, SigLIPLoss
from .distill import AladinLoss  # noqa: F401  (registers "aladin")
from .hinge import AdaptHingeLoss, HingeLoss
from .relation import IaisLoss  # noqa: F401  (registers "iais")
from .triplet import TripletLoss, cosine_distance

def create_loss(name: str, **kwargs: object) -> nn.Module:
    """Build a registered loss by name (``hinge``, ``adapt_hinge``, ``infonce``, ``siglip``, ``triplet``,
    ``aladin``, ``iais``) from its ``loss.args``: ``kwargs`` are parsed into the loss's args
    dataclass (:func:`loss_args`), so an unknown key or a value of the wrong type is a
    :class:`~xmodal.errors.ConfigError` naming ``loss.args.<key>``."""
    args = parse_args(loss_args(name), kwargs, "loss.args", f"loss {name}")
    return LOSSES.create(name, **args_dict(args))


def loss_args(name: str) -> type:
    """The dataclass of a registered loss's ``loss.args`` (an unknown name: an error listing them)."""
    LOSSES.get(name)
    if name not in LOSS_ARGS:
        raise TypeError(f"loss {name!r} declares no args dataclass in xmodal.losses.base.LOSS_ARGS")
    return LOSS_ARGS[name]


def list_losses() -> list[str]:
    """Names of the registered losses."""
    return LOSSES.names()



__all__ = ["LOSSES", "LOSS_ARGS", "AdaptHingeLoss", "HingeLoss", "InfoNCELoss", "SigLIPLoss", "TripletLoss",
           "cosine_distance", "create_loss", "list_losses", "loss_args", "resolve_pos_mask"]
