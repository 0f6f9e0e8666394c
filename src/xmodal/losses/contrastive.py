"""Softmax (InfoNCE, CLIP) and sigmoid (SigLIP) contrastive losses with learnable temperature.

Both take dot-product scores of the embeddings they are given; pass L2-normalised
embeddings (every :class:`~xmodal.models.base.EmbeddingScorer` does) for cosine scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from .base import LOSS_ARGS, LOSSES, ScoreMatrixLoss, resolve_pos_mask


@dataclass(frozen=True)
class InfoNCEArgs:
    """``loss.args`` of ``infonce`` (:class:`InfoNCELoss`)."""

    init_temperature: float = 0.07
    learn_temperature: bool = True
    max_scale: float = 100.0


@dataclass(frozen=True)
class SigLIPArgs:
    """``loss.args`` of ``siglip`` (:class:`SigLIPLoss`)."""

    init_scale: float = 10.0
    init_bias: float = -10.0
    learn: bool = True


@LOSSES.register("infonce")
class InfoNCELoss(ScoreMatrixLoss):
    """Symmetric InfoNCE of CLIP (Radford et al., 2021).

    ``logits = exp(logit_scale) * scores`` with ``logit_scale`` initialised to
    ``log(1 / init_temperature)`` and the scale clamped at ``max_scale`` (100, as CLIP).

    Several positives: each positive pair ``(i, t)`` is its own anchor, and the *other*
    positives are removed from its denominator (they are not negatives):
    ``-log(e^{l_it} / (e^{l_it} + sum_{t' not pos of i} e^{l_it'}))`` for image->text and the
    same over images for text->image. Each direction is averaged over positive pairs and
    the two directions are averaged. With a diagonal mask this is CLIP's loss exactly.
    Returns ``{"contrastive_loss", "logit_scale"}`` (the latter is the scale, not its log).
    """

    def __init__(self, init_temperature: float = 0.07, learn_temperature: bool = True,
                 max_scale: float = 100.0) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)),
                                        requires_grad=learn_temperature)
        self.max_scale = max_scale

    def from_scores(self, scores: torch.Tensor, pos_mask: torch.Tensor | None = None,
                    step: int | None = None) -> dict[str, torch.Tensor]:
        """Loss from a similarity matrix ``(Bi, Bt)`` (before the temperature)."""
        pos = resolve_pos_mask(pos_mask, scores.shape[0], scores.shape[1], scores.device)
        scale = self.logit_scale.exp().clamp(max=self.max_scale)
        logits = scale * scores  # (Bi, Bt)
        # a finite fill (not -inf) keeps gradients finite for anchors without any negative
        negs = logits.masked_fill(pos, torch.finfo(logits.dtype).min)
        neg_i2t = negs.logsumexp(dim=1)  # (Bi,) log-sum over each image's negative texts
        neg_t2i = negs.logsumexp(dim=0)  # (Bt,) log-sum over each text's negative images
        ii, tt = pos.nonzero(as_tuple=True)  # (P,)
        lp = logits[ii, tt]  # (P,)
        loss_i2t = (torch.logaddexp(lp, neg_i2t[ii]) - lp).mean()
        loss_t2i = (torch.logaddexp(lp, neg_t2i[tt]) - lp).mean()
        return {"contrastive_loss": (loss_i2t + loss_t2i) / 2, "logit_scale": scale.detach()}


LOSS_ARGS["infonce"] = InfoNCEArgs


@LOSSES.register("siglip")
class SigLIPLoss(ScoreMatrixLoss):
    """Pairwise sigmoid loss of SigLIP (Zhai et al., 2023).

    ``z_it = exp(t') * s_it + b`` with ``t'`` initialised to ``log(init_scale)`` (log 10) and
    ``b`` to ``init_bias`` (-10); label +1 where ``pos_mask`` is True, -1 elsewhere;
    ``loss = -sum_{i,t} log sigmoid(label_it * z_it) / Bi`` (normalised by the number of
    images, as in the paper and OpenCLIP). Returns ``{"siglip_loss", "logit_scale", "logit_bias"}``.
    """

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0, learn: bool = True) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)), requires_grad=learn)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)), requires_grad=learn)

    def from_scores(self, scores: torch.Tensor, pos_mask: torch.Tensor | None = None,
                    step: int | None = None) -> dict[str, torch.Tensor]:
        """Loss from a similarity matrix ``(Bi, Bt)``."""
        pos = resolve_pos_mask(pos_mask, scores.shape[0], scores.shape[1], scores.device)
        scale = self.logit_scale.exp()
        logits = scale * scores + self.logit_bias  # (Bi, Bt)
        labels = pos.to(logits.dtype) * 2 - 1  # (Bi, Bt) +1 / -1
        loss = -F.logsigmoid(labels * logits).sum() / scores.shape[0]
        return {"siglip_loss": loss, "logit_scale": scale.detach(), "logit_bias": self.logit_bias.detach()}


LOSS_ARGS["siglip"] = SigLIPArgs
