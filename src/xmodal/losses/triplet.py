"""Batch-hard triplet loss on cosine distance (X-MRS, Guerrero et al., ACM MM 2021).

Distances are ``1 - cos`` (X-MRS's ``cosine_distance``), margin 0.3. For each anchor
item of one modality that has at least one positive and one negative in the batch, the
hardest positive (largest distance) and hardest negative (smallest distance) of the
other modality form the triplet (Hermans et al.'s batch-hard mining):
``[d(a, p_hard) - d(a, n_hard) + margin]+``. Image anchors and text anchors are each
averaged over anchors, and the two directions summed.

``intra_modal=True`` adds ``intra_loss``: the same anchor and hardest cross-modal positive
against the hardest negative *of the anchor's own modality* (image-image, text-text),
``[d(a, p_hard) - d_intra(a, n_hard) + margin]+``, so that a matching caption sits closer
to its image than any other image does (and vice versa), which X-MRS's goal of closing
the modality gap asks for. Two images are "the same item" (never each other's
negative) when they share a positive text; likewise for texts.

``hardest_after=N`` warms up as VSE++ / VSE-infinity do (VSE-infinity's
``vse_mean_warmup_epochs``: the summed hinge over all negatives before switching to the
hardest one): for the first ``N`` optimiser steps every term uses the *mean over the
violating negatives* (those with a positive hinge) instead of the hardest negative. From a
randomly initialised encoder, the hardest negative of every anchor is nearly as close as
its positive; pushing only against it moves all embeddings together and the batch-hard
loss can settle at ``margin`` with every point in one place (observed on emoji, a text
tower trained from scratch). ``None`` (default): hardest negatives from step 0, X-MRS's loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import LOSS_ARGS, LOSSES, resolve_pos_mask


def cosine_distance(x1: torch.Tensor, x2: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """``1 - cos(x1_i, x2_j)`` as a ``(N1, N2)`` matrix (``x2`` defaults to ``x1``)."""
    x2 = x1 if x2 is None else x2
    return 1.0 - F.normalize(x1, dim=1, eps=eps) @ F.normalize(x2, dim=1, eps=eps).t()


def _batch_hard(dist: torch.Tensor, pos: torch.Tensor, neg_dist: torch.Tensor, neg: torch.Tensor,
                margin: float, hardest: bool = True) -> torch.Tensor:
    """Mean batch-hard triplet term over rows that have a positive and a negative.

    ``dist``/``pos``: anchor-to-positive-candidates distances and mask; ``neg_dist``/``neg``:
    anchor-to-negative-candidates distances and mask (rows are the same anchors).
    ``hardest=False``: per anchor, the mean hinge over its violating negatives instead of
    the hinge of its hardest negative (the warm-up; 0 when none violates).
    """
    big = torch.finfo(dist.dtype).max
    hard_pos = dist.masked_fill(~pos, -big).max(dim=1).values  # (A,)
    valid = pos.any(dim=1) & neg.any(dim=1)  # (A,)
    if not bool(valid.any()):
        return dist.sum() * 0.0  # keeps the graph; no triplet in this batch
    if hardest:
        hard_neg = neg_dist.masked_fill(~neg, big).min(dim=1).values  # (A,)
        return F.relu(hard_pos[valid] - hard_neg[valid] + margin).mean()
    hinge = F.relu(hard_pos[:, None] - neg_dist + margin).masked_fill(~neg, 0.0)  # (A, N)
    violating = (hinge > 0).sum(dim=1).clamp(min=1)  # (A,)
    return (hinge.sum(dim=1) / violating)[valid].mean()


@dataclass(frozen=True)
class TripletArgs:
    """``loss.args`` of ``triplet`` (:class:`TripletLoss`)."""

    margin: float = 0.3
    intra_modal: bool = False
    intra_weight: float = 1.0
    hardest_after: int | None = None


@LOSSES.register("triplet")
class TripletLoss(nn.Module):
    """Bidirectional batch-hard triplet loss on cosine distance; optional intra-modal terms.

    Returns ``{"triplet_loss"}`` and, with ``intra_modal=True``, ``{"intra_loss"}`` (already
    multiplied by ``intra_weight``).
    """

    def __init__(self, margin: float = 0.3, intra_modal: bool = False, intra_weight: float = 1.0,
                 hardest_after: int | None = None) -> None:
        super().__init__()
        if hardest_after is not None and (isinstance(hardest_after, bool) or int(hardest_after) != hardest_after
                                          or hardest_after < 0):
            raise ConfigError(f"loss.args.hardest_after: expected a number of steps >= 0 or null, got {hardest_after!r}")
        self.margin = margin
        self.intra_modal = intra_modal
        self.intra_weight = intra_weight
        self.hardest_after = None if hardest_after is None else int(hardest_after)

    def hardest(self, step: int | None) -> bool:
        """Whether step ``step`` mines the hardest negative (else: mean over violating ones)."""
        return self.hardest_after is None or step is None or step >= self.hardest_after

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, *, pos_mask: torch.Tensor | None = None,
                step: int | None = None) -> dict[str, torch.Tensor]:
        pos = resolve_pos_mask(pos_mask, image_emb.shape[0], text_emb.shape[0], image_emb.device)
        d = cosine_distance(image_emb, text_emb)  # (Bi, Bt)
        hardest = self.hardest(step)
        out = {"triplet_loss": self._cross(d, pos, hardest)}
        if self.intra_modal:
            pf = pos.to(d.dtype)
            same_img = (pf @ pf.t()) > 0  # (Bi, Bi) images sharing a positive text
            same_txt = (pf.t() @ pf) > 0  # (Bt, Bt)
            same_img |= torch.eye(pos.shape[0], dtype=torch.bool, device=pos.device)
            same_txt |= torch.eye(pos.shape[1], dtype=torch.bool, device=pos.device)
            d_ii = cosine_distance(image_emb)  # (Bi, Bi)
            d_tt = cosine_distance(text_emb)  # (Bt, Bt)
            intra = (_batch_hard(d, pos, d_ii, ~same_img, self.margin, hardest)
                     + _batch_hard(d.t(), pos.t(), d_tt, ~same_txt, self.margin, hardest))
            out["intra_loss"] = self.intra_weight * intra
        return out

    def from_scores(self, scores: torch.Tensor, pos_mask: torch.Tensor | None = None,
                    step: int | None = None) -> dict[str, torch.Tensor]:
        """Cross-modal term from cosine similarities ``(Bi, Bt)`` (distance = 1 - score)."""
        if self.intra_modal:
            raise ConfigError("triplet: intra_modal needs embeddings, not a score matrix")
        pos = resolve_pos_mask(pos_mask, scores.shape[0], scores.shape[1], scores.device)
        return {"triplet_loss": self._cross(1.0 - scores, pos, self.hardest(step))}

    def _cross(self, d: torch.Tensor, pos: torch.Tensor, hardest: bool = True) -> torch.Tensor:
        return (_batch_hard(d, pos, d, ~pos, self.margin, hardest)  # image anchors
                + _batch_hard(d.t(), pos.t(), d.t(), ~pos.t(), self.margin, hardest))  # text anchors


LOSS_ARGS["triplet"] = TripletArgs
