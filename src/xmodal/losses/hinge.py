"""Bidirectional hinge (triplet ranking) losses of VSE++ and ADAPT.

Multi-positive batches: every positive pair ``(i, t)`` is an anchor in both directions.
As a text-retrieval anchor it is violated by each text ``t'`` that is *not* a positive
of image ``i``: ``[margin + s(i, t') - s(i, t)]+``; as an image-retrieval anchor by each
image ``i'`` that is not a positive of text ``t``: ``[margin + s(i', t) - s(i, t)]+``.
Other positives are never negatives. ``max_violation`` keeps only the hardest negative
of each anchor (VSE++'s MH loss), otherwise all violations are summed. With one caption
per image (diagonal mask) this is exactly VSE++'s ``ContrastiveLoss``.

The loss is a sum over anchors, as in VSE++, SCAN and ADAPT (their margins and learning
rates assume it); ``reduction="mean"`` divides by the number of positive pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from .base import LOSS_ARGS, LOSSES, ScoreMatrixLoss, resolve_pos_mask


def hinge_costs(scores: torch.Tensor, pos: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per positive pair violations: (text-retrieval ``(P, Bt)``, image-retrieval ``(P, Bi)``).

    Row ``p`` belongs to the ``p``-th positive pair in ``pos.nonzero()`` order; entries that
    are positives of the anchor are 0.
    """
    ii, tt = pos.nonzero(as_tuple=True)  # (P,), (P,)
    d = scores[ii, tt].unsqueeze(1)  # (P, 1)
    cost_s = (margin + scores[ii] - d).clamp(min=0)  # (P, Bt) compare with the image's other texts
    cost_s = cost_s.masked_fill(pos[ii], 0.0)
    cost_im = (margin + scores[:, tt].t() - d).clamp(min=0)  # (P, Bi) compare with the text's other images
    cost_im = cost_im.masked_fill(pos[:, tt].t(), 0.0)
    return cost_s, cost_im


def _check_reduction(reduction: str) -> str:
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"hinge loss: reduction must be 'sum' or 'mean', got {reduction!r}")
    return reduction


@dataclass(frozen=True)
class HingeArgs:
    """``loss.args`` of ``hinge`` (:class:`HingeLoss`)."""

    margin: float = 0.2
    max_violation: bool = True
    reduction: Literal["sum", "mean"] = "sum"


@dataclass(frozen=True)
class AdaptHingeArgs:
    """``loss.args`` of ``adapt_hinge`` (:class:`AdaptHingeLoss`)."""

    margin: float = 0.2
    beta: float = 0.991
    reduction: Literal["sum", "mean"] = "sum"


@LOSSES.register("hinge")
class HingeLoss(ScoreMatrixLoss):
    """VSE++ (Faghri et al., 2018) contrastive hinge loss on dot-product scores.

    Pass L2-normalised embeddings for cosine scores. Returns ``{"hinge_loss": ...}``.
    """

    def __init__(self, margin: float = 0.2, max_violation: bool = True, reduction: str = "sum") -> None:
        super().__init__()
        self.margin = margin
        self.max_violation = max_violation
        self.reduction = _check_reduction(reduction)

    def from_scores(self, scores: torch.Tensor, pos_mask: torch.Tensor | None = None,
                    step: int | None = None) -> dict[str, torch.Tensor]:
        """Loss from a precomputed score matrix ``(Bi, Bt)`` (pair scorers)."""
        pos = resolve_pos_mask(pos_mask, scores.shape[0], scores.shape[1], scores.device)
        cost_s, cost_im = hinge_costs(scores, pos, self.margin)
        if self.max_violation:
            total = cost_s.max(dim=1).values.sum() + cost_im.max(dim=1).values.sum()
        else:
            total = cost_s.sum() + cost_im.sum()
        if self.reduction == "mean":
            total = total / max(cost_s.shape[0], 1)
        return {"hinge_loss": total}


LOSS_ARGS["hinge"] = HingeArgs


@LOSSES.register("adapt_hinge")
class AdaptHingeLoss(ScoreMatrixLoss):
    """ADAPT's hinge loss: from the sum of all violations to the hardest one.

    ``loss = (1 - k) * sum_violations + k * max_violations`` with ``k = 1 - beta**n``,
    where ``n`` counts training iterations from 1, as in the ``ContrastiveLoss`` of
    jwehrmann/retrieval.pytorch (its counter is incremented before use, once per call;
    ADAPT's configs use ``beta = 0.991``). When the caller passes ``step`` (0-based
    optimiser step) ``n = step + 1``; otherwise an internal counter (saved in the state
    dict) advances on every call in training mode. Returns ``{"hinge_loss", "k"}``.
    """

    def __init__(self, margin: float = 0.2, beta: float = 0.991, reduction: str = "sum") -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ConfigError(f"adapt_hinge: beta must be in [0, 1], got {beta}")
        self.margin = margin
        self.beta = beta
        self.reduction = _check_reduction(reduction)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def k_at(self, n: int) -> float:
        """Weight of the max-violation term at iteration ``n`` (1-based)."""
        return 1.0 - self.beta ** n

    def from_scores(self, scores: torch.Tensor, pos_mask: torch.Tensor | None = None,
                    step: int | None = None) -> dict[str, torch.Tensor]:
        """Loss from a precomputed score matrix ``(Bi, Bt)`` (pair scorers)."""
        if step is None:
            if self.training:
                self.iteration += 1
            n = int(self.iteration)
        else:
            n = int(step) + 1
            self.iteration.fill_(n)
        k = self.k_at(n)
        pos = resolve_pos_mask(pos_mask, scores.shape[0], scores.shape[1], scores.device)
        cost_s, cost_im = hinge_costs(scores, pos, self.margin)
        all_sum = cost_s.sum() + cost_im.sum()
        hard_sum = cost_s.max(dim=1).values.sum() + cost_im.max(dim=1).values.sum()
        total = (1.0 - k) * all_sum + k * hard_sum
        if self.reduction == "mean":
            total = total / max(cost_s.shape[0], 1)
        return {"hinge_loss": total, "k": torch.tensor(k)}


LOSS_ARGS["adapt_hinge"] = AdaptHingeArgs
