"""Score distillation (ALADIN) and the ALADIN loss combination.

ALADIN (Messina et al., CBMI 2022; ``mesnico/ALADIN`` ``alad/loss.py`` ``DistillationLoss``)
trains a fast matching head (plain embeddings, scores ``S`` by dot product) to reproduce the
in-batch score matrix ``T`` of the slow alignment head. The teacher is never back-propagated
through (``T`` is detached).

- :class:`ListNetDistillation` (``mode: listnet``, the paper's choice): a ListNet cross
  entropy between the teacher's and the student's softmax distributions, over every row
  (image -> captions) and every column (caption -> images)::

      L = mean_i  -sum_t softmax_t(T_i / tau_T) log(softmax_t(S_i / tau_S) + eps)
        + mean_t  -sum_i softmax_i(T_t / tau_T) log(softmax_i(S_t / tau_S) + eps)

  The original multiplies the student's cosines by 6 (``tau_S = 1/6``) and leaves the teacher's
  summed alignments as they are (``tau_T = 1``); ``eps = 1e-10`` is added after the softmax.
  Here ``student_temperature`` / ``teacher_temperature`` are the multipliers, defaults 6 and 1.
- :class:`MSEDistillation` (``mode: mse``): ``mean((a S + b - T)^2)`` with a learnt affine map
  ``(a, b)`` initialised to ``(0.5, 0.5)``, as the original's ``wb`` parameter.

:class:`AladinLoss` (``loss: {name: aladin}``) is the configured combination of ALADIN's
terms (``loss-type`` in the original configs): ``alignment`` (VSE++ max-violation hinge on the
alignment head's scores), ``matching`` (the same hinge on the matching head's scores) and
``distillation`` (matching head from the alignment head), with one weight each, and
``activate_distillation_after`` optimiser steps before distillation joins other terms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .hinge import HingeLoss
from .base import LOSS_ARGS, LOSSES, ScoreMatrixLoss, resolve_pos_mask

#: Distillation objectives by name (student scores, teacher scores -> scalar).
DISTILLATION: Registry[nn.Module] = Registry("distillation mode")
TERMS = ("alignment", "matching", "distillation")


@DISTILLATION.register("listnet")
class ListNetDistillation(nn.Module):
    """ListNet cross entropy between teacher and student score distributions, rows + columns."""

    def __init__(self, student_temperature: float = 6.0, teacher_temperature: float = 1.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.student_temperature = float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.eps = eps

    def _cross_entropy(self, student: torch.Tensor, teacher: torch.Tensor, dim: int) -> torch.Tensor:
        target = F.softmax(teacher * self.teacher_temperature, dim=dim)
        log_pred = torch.log(F.softmax(student * self.student_temperature, dim=dim) + self.eps)
        return -(target * log_pred).sum(dim).mean()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """``student`` / ``teacher`` ``(Bi, Bt)`` -> scalar (image->text rows + text->image columns)."""
        teacher = teacher.detach()
        return self._cross_entropy(student, teacher, 1) + self._cross_entropy(student, teacher, 0)


@DISTILLATION.register("mse")
class MSEDistillation(nn.Module):
    """``mean((a S + b - T)^2)`` with learnt ``a, b`` (initialised to 0.5, 0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.affine = nn.Parameter(torch.tensor([0.5, 0.5]))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student * self.affine[0] + self.affine[1], teacher.detach())


@dataclass(frozen=True)
class AladinLossArgs:
    """``loss.args`` of ``aladin`` (:class:`AladinLoss`; ``terms`` may be one name)."""

    terms: tuple[str, ...] | str = ("alignment",)
    weights: tuple[float, ...] | None = None
    margin: float = 0.2
    max_violation: bool = True
    #: a :data:`DISTILLATION` mode (``listnet``, ``mse``)
    distillation: str = "listnet"
    student_temperature: float = 6.0
    teacher_temperature: float = 1.0
    activate_distillation_after: int = 0


@LOSSES.register("aladin")
class AladinLoss(ScoreMatrixLoss):
    """ALADIN's loss combination over the alignment and matching heads' in-batch scores.

    ``terms``: any of ``alignment``, ``matching``, ``distillation``; ``weights`` one per term
    (default 1). The hinge is VSE++'s (``margin``, ``max_violation``, summed over anchors);
    ``distillation`` is ``listnet`` (``student_temperature``, ``teacher_temperature``) or
    ``mse``. Before step ``activate_distillation_after`` the distillation term is only logged,
    when other terms train; alone it is always on (as in the original, which drops it early
    only ``if len(loss_dict) > 1``).

    :meth:`combine` is what the ALADIN task calls. As a plain score-matrix loss
    (``forward`` on embeddings, :meth:`from_scores`), it applies the hinge to the one head it
    trains, so a config with ``terms: [matching]`` or ``[alignment]`` is an ordinary hinge.
    """

    def __init__(self, terms: Sequence[str] = ("alignment",), weights: Sequence[float] | None = None,
                 margin: float = 0.2, max_violation: bool = True, distillation: str = "listnet",
                 student_temperature: float = 6.0, teacher_temperature: float = 1.0,
                 activate_distillation_after: int = 0) -> None:
        super().__init__()
        if isinstance(terms, str):
            terms = [terms]
        terms = list(terms)
        bad = [t for t in terms if t not in TERMS]
        if not terms or bad or len(set(terms)) != len(terms):
            raise ConfigError(f"loss.args.terms: a non-empty list of distinct {', '.join(TERMS)}; got {terms!r}")
        weights = [1.0] * len(terms) if weights is None else [float(w) for w in weights]
        if len(weights) != len(terms):
            raise ConfigError(f"loss.args.weights: {len(weights)} weights for {len(terms)} terms {terms}")
        if int(activate_distillation_after) < 0:
            raise ConfigError("loss.args.activate_distillation_after: must be >= 0 (optimizer steps)")
        self.terms = terms
        self.weights = dict(zip(terms, weights))
        self.hinge = HingeLoss(margin=margin, max_violation=max_violation)
        self.activate_distillation_after = int(activate_distillation_after)
        self.distill = None
        if "distillation" in terms:
            if distillation == "listnet":
                self.distill = ListNetDistillation(student_temperature, teacher_temperature)
            else:
                self.distill = DISTILLATION.create(distillation)

    @property
    def needs_alignment(self) -> bool:
        """Whether the alignment head's scores are needed (trained, or as the teacher)."""
        return "alignment" in self.terms or "distillation" in self.terms

    @property
    def needs_matching(self) -> bool:
        return "matching" in self.terms or "distillation" in self.terms

    def distillation_active(self, step: int | None) -> bool:
        if "distillation" not in self.terms:
            return False
        alone = len(self.terms) == 1
        return alone or step is None or step >= self.activate_distillation_after

    def combine(self, alignment: torch.Tensor | None, matching: torch.Tensor | None,
                pos_mask: torch.Tensor | None = None, step: int | None = None) -> dict[str, torch.Tensor]:
        """Terms from the alignment ``(Bi, Bt)`` and matching ``(Bi, Bt)`` score matrices.

        Returns weighted ``alignment_loss`` / ``matching_loss`` / ``distillation_loss``; a
        distillation term not yet active is returned as the metric ``distillation`` instead.
        """
        out: dict[str, torch.Tensor] = {}
        for head, scores in (("alignment", alignment), ("matching", matching)):
            if head in self.terms:
                if scores is None:
                    raise ValueError(f"aladin loss: the {head} term needs the {head} scores")
                out[f"{head}_loss"] = self.weights[head] * self.hinge.from_scores(scores, pos_mask)["hinge_loss"]
        if self.distill is not None:
            if alignment is None or matching is None:
                raise ValueError("aladin loss: distillation needs both the alignment and the matching scores")
            resolve_pos_mask(pos_mask, matching.shape[0], matching.shape[1], matching.device)  # shape check
            value = self.distill(matching, alignment.detach())
            if self.distillation_active(step):
                out["distillation_loss"] = self.weights["distillation"] * value
            else:
                out["distillation"] = value.detach()
        return out

    def from_scores(self, scores: torch.Tensor, pos_mask: torch.Tensor | None = None,
                    step: int | None = None) -> dict[str, torch.Tensor]:
        heads = [t for t in self.terms if t != "distillation"]
        if len(heads) != 1 or "distillation" in self.terms:
            raise ValueError(f"aladin loss with terms {self.terms} needs both heads' scores: use combine()")
        head = heads[0]
        return {f"{head}_loss": self.weights[head] * self.hinge.from_scores(scores, pos_mask)["hinge_loss"]}


LOSS_ARGS["aladin"] = AladinLossArgs
