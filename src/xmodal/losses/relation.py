"""IAIS: relation alignment of intra-modal self-attention (Ren et al., ACL-IJCNLP 2021).

Faithful to ``lancopku/IAIS`` (``model/model.py`` ``UniterEncoder``, ``model/itm.py``,
``utils/training_signal_annealing.py``, ``train_itm_hard_negatives.py``):

- **Attention maps.** On the last layer of a single-stream encoder, the attention logits of
  a positive pair ``[CLS] words [SEP] regions`` are re-normalised within four blocks, each a
  softmax over its own keys only, then averaged over heads: word-word ``A_ww`` (L, L),
  region-region ``A_rr`` (R, R), word-region ``A_wr`` (L, R) and region-word ``A_rw`` (R, L).
  Words are the caption's content tokens: [CLS] and [SEP] are neither rows nor keys.
  :func:`relation_maps` builds them from ``(B, H, N, N)`` logits.
- **Distributed alignment** (:func:`distributed_alignment`): the relation a modality induces
  through the other one is ``A_wr @ A_rw`` (words, "L") or ``A_rw @ A_wr`` (regions, "V");
  it is compared with ``A_ww`` / ``A_rr``.
- **Singular alignment** (:func:`singular_alignment`): each word is mapped to the region it
  attends most (``argmax A_wr``); the induced word relation is
  ``softmax_j(A_rr[m(i), m(j)])`` (and symmetrically for regions via ``argmax A_rw``).
- **Distance**: symmetric KL, ``KL(induced || self) + KL(self || induced)``, summed over
  the cells and divided by the number of rows (``KLDivLoss(reduction="batchmean")``).
  Distributed adds ``1e-6`` inside both logs, as the original; singular takes the plain log
  there, which we clamp at the smallest normal float so an underflowed weight gives a large
  finite loss instead of ``inf``.
- **Schedule**: the IAIS term is multiplied by the TSA threshold of the original,
  ``exp(5 (t / T - 1))`` for ``exp`` (:func:`tsa_threshold`), ``t`` the optimiser step.

:class:`IaisLoss` (registered ``iais``) bundles these with the hard-negative ranking hinge
on sigmoid scores and the sampling sizes; :mod:`xmodal.train.tasks.hard_negatives` uses it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import LOSS_ARGS, LOSSES

ALIGNMENTS = ("none", "singular", "distributed")
SCHEDULES = ("exp", "linear", "log", "constant")
#: additive mask of the original (``(1 - mask) * -10000``): finite, so an all-masked row stays finite
_MASKED = -10000.0


def tsa_threshold(schedule: str, step: int, total: int) -> float:
    """Training-signal-annealing threshold of the original at ``step`` of ``total``.

    ``exp``: ``exp(5 (t - 1))``, from ``e^-5`` to 1; ``linear``: ``t``; ``log``:
    ``1 - exp(-5 t)``; ``constant``: 1 (no annealing); ``t = step / total``.
    """
    t = float(step) / float(max(total, 1))
    if schedule == "exp":
        return math.exp((t - 1.0) * 5.0)
    if schedule == "linear":
        return t
    if schedule == "log":
        return 1.0 - math.exp(-t * 5.0)
    if schedule == "constant":
        return 1.0
    raise ConfigError(f"loss.args.schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")


def _block_softmax(logits: torch.Tensor, row_mask: torch.Tensor, col_mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the ``col_mask`` keys of ``logits`` (B, H, Nr, Nc), mean over heads,
    rows outside ``row_mask`` zeroed -> (B, Nr, Nc)."""
    x = logits.float().masked_fill(~col_mask[:, None, None, :], _MASKED)
    p = torch.softmax(x, dim=-1) * col_mask[:, None, None, :]  # exactly 0 on masked keys
    p = p.mean(1)  # (B, Nr, Nc)
    return p * row_mask[:, :, None]


def relation_maps(logits: torch.Tensor, num_text: int, word_mask: torch.Tensor,
                  region_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four attention blocks of a ``[text | regions]`` sequence.

    ``logits`` (B, H, N, N) are one layer's pre-softmax attention scores (scaled q.k);
    positions ``0 .. num_text - 1`` are the text tokens, the rest regions. ``word_mask``
    (B, num_text) marks the content words (not [CLS], [SEP] or padding), ``region_mask``
    (B, N - num_text) the real regions. Returns ``ww`` (B, L, L), ``rr`` (B, R, R),
    ``wr`` (B, L, R), ``rw`` (B, R, L) and the two masks.
    """
    L = num_text
    wm, rm = word_mask.bool(), region_mask.bool()
    return {
        "ww": _block_softmax(logits[:, :, :L, :L], wm, wm),
        "rr": _block_softmax(logits[:, :, L:, L:], rm, rm),
        "wr": _block_softmax(logits[:, :, :L, L:], wm, rm),
        "rw": _block_softmax(logits[:, :, L:, :L], rm, wm),
        "word_mask": wm, "region_mask": rm,
    }


def _kl_rows(target: torch.Tensor, log_input: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``sum target * (log target - log_input)`` over the ``valid`` cells of each pair (B,)."""
    # target log target with 0 log 0 = 0 and a finite gradient at 0 (xlogy's is -inf there,
    # which turns into NaN on masked cells)
    log_target = target.clamp_min(torch.finfo(target.dtype).tiny).log()
    cell = target * (log_target - log_input)
    return (cell * valid).sum((1, 2))


def symmetric_kl(own: torch.Tensor, induced: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6,
                 plain_log: bool = False) -> torch.Tensor:
    """Per pair ``[KL(induced || own) + KL(own || induced)] / rows`` over the masked cells.

    ``own``, ``induced`` (B, N, N) row distributions over the ``mask`` (B, N) items; rows and
    columns outside the mask are ignored; ``rows`` counts the pair's masked items (``batchmean``
    of the original, per pair). ``eps`` is added inside the logs (distributed alignment);
    ``plain_log`` takes the log as is, clamped at the smallest normal float (singular).
    Returns (B,); a pair without items gives 0.
    """
    valid = (mask[:, :, None] & mask[:, None, :]).to(own.dtype)  # (B, N, N)
    if plain_log:
        tiny = torch.finfo(own.dtype).tiny
        log_own, log_ind = own.clamp_min(tiny).log(), induced.clamp_min(tiny).log()
    else:
        log_own, log_ind = (own + eps).log(), (induced + eps).log()
    rows = mask.sum(1).clamp_min(1).to(own.dtype)
    return (_kl_rows(induced, log_own, valid) + _kl_rows(own, log_ind, valid)) / rows


def distributed_alignment(maps: dict[str, torch.Tensor], modality: str, eps: float = 1e-6) -> torch.Tensor:
    """Distributed IAIS per pair (B,): ``A_ww`` vs ``A_wr A_rw`` (``L``), ``A_rr`` vs ``A_rw A_wr`` (``V``)."""
    if modality == "L":
        return symmetric_kl(maps["ww"], maps["wr"] @ maps["rw"], maps["word_mask"], eps)  # (B, L, L)
    if modality == "V":
        return symmetric_kl(maps["rr"], maps["rw"] @ maps["wr"], maps["region_mask"], eps)  # (B, R, R)
    raise ValueError(f"modality must be 'L' or 'V', got {modality!r}")


def _induced_singular(cross: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``softmax_j(other[m(i), m(j)])`` over the masked ``j``, ``m(i) = argmax cross[i]``."""
    idx = cross.argmax(-1)  # (B, N) the item of the other modality each item attends most
    B, N = idx.shape
    rows = other.gather(1, idx[:, :, None].expand(B, N, other.shape[2]))  # (B, N, M) other[m(i), :]
    picked = rows.gather(2, idx[:, None, :].expand(B, N, N))  # (B, N, N) other[m(i), m(j)]
    picked = picked.masked_fill(~mask[:, None, :], _MASKED)
    out = torch.softmax(picked, dim=-1) * mask[:, None, :]  # exactly 0 on masked items
    return out * mask[:, :, None]


def singular_alignment(maps: dict[str, torch.Tensor], modality: str) -> torch.Tensor:
    """Singular IAIS per pair (B,): each word (``L``) / region (``V``) is mapped to the item of
    the other modality it attends most, and the relation there is compared with its own."""
    wm, rm = maps["word_mask"], maps["region_mask"]
    if modality == "L":
        induced = _induced_singular(maps["wr"], maps["rr"], wm)  # (B, L, L)
        return symmetric_kl(maps["ww"], induced, wm, plain_log=True)
    if modality == "V":
        induced = _induced_singular(maps["rw"], maps["ww"], rm)  # (B, R, R)
        return symmetric_kl(maps["rr"], induced, rm, plain_log=True)
    raise ValueError(f"modality must be 'L' or 'V', got {modality!r}")


def ranking_hinge(pos: torch.Tensor, neg: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean of ``[margin + sigmoid(neg) - sigmoid(pos)]+`` over anchors and their negatives.

    ``pos`` (B,) logits of the positive pairs, ``neg`` (B, k) of their kept negatives; the
    original's ``rank_loss.mean() / train_batch_size`` accumulated over the batch.
    """
    return (margin + torch.sigmoid(neg) - torch.sigmoid(pos)[:, None]).clamp_min(0).mean()


def itm_bce(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """UNITER's pre-training ITM loss on one positive and ``k`` random negatives per anchor:
    binary cross-entropy of the logits, positives and negatives weighted alike
    (``pos`` (B,), ``neg`` (B, k))."""
    return 0.5 * (F.softplus(-pos).mean() + F.softplus(neg).mean())


def itm_softmax(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the positive among ``1 + k`` candidates per anchor (listwise ITM)."""
    logits = torch.cat([pos[:, None], neg], dim=1)  # (B, 1 + k)
    return F.cross_entropy(logits, torch.zeros(len(pos), dtype=torch.long, device=pos.device))


WARMUP_LOSSES = {"hinge": None, "itm": itm_bce, "softmax": itm_softmax}


@dataclass(frozen=True)
class IaisLossArgs:
    """``loss.args`` of ``iais`` (:class:`IaisLoss`); the choices are :data:`ALIGNMENTS`,
    :data:`SCHEDULES` and :data:`WARMUP_LOSSES`."""

    margin: float = 0.2
    negatives: int = 399
    hard_negatives: int = 31
    directions: Literal["alternate", "both"] = "alternate"
    alignment: Literal["none", "singular", "distributed"] = "none"
    weight: float = 1.0
    schedule: Literal["exp", "linear", "log", "constant"] = "exp"
    reduction: Literal["sum", "mean"] = "sum"
    eps: float = 1e-6
    random_steps: int = 0
    pool: Literal["uniform", "first_stage"] = "uniform"
    fusion: float = 0.0
    warmup_loss: Literal["hinge", "itm", "softmax"] = "hinge"
    #: run folders of the out-of-fold first stages (one per fold of ``data.train_holdout``)
    cross_fit: list[str] | None = None


@LOSSES.register("iais")
class IaisLoss(nn.Module):
    """Hard-negative ITM ranking + IAIS relation alignment (the training objective of IAIS).

    Sampling: ``negatives`` items of the other modality are scored per positive pair
    without gradients and the ``hard_negatives`` highest kept (paper: 399 / 31).
    ``directions``: ``alternate`` (even steps: negatives are texts, odd: images; the issue's
    schedule), or ``both`` every step (the original accumulates both in one optimiser step).
    ``alignment``: ``none`` (plain hard-negative fine-tuning), ``singular`` or ``distributed``;
    text-negative batches align the regions (``V``), image-negative batches the words (``L``),
    as the original. ``weight`` x TSA ``schedule`` scales the term; ``reduction`` over the
    batch's positives is ``sum`` as in the original (its IAIS term is not divided by the
    batch size while the ranking term is) or ``mean``. ``random_steps``: for the first steps,
    the ``hard_negatives`` kept are drawn at random from the pool instead of the hardest (a
    warm start standing in for UNITER's ITM pre-training with random negatives: mining the
    hardest negatives of a random model collapses it to a pair-independent score); the IAIS
    term is left out during those steps (TSA still counts them).
    ``pool``: ``uniform`` (UNITER: the pool is a uniform draw of non-positives) or
    ``first_stage``: the pool is the anchor's ``negatives`` nearest non-positives by the
    model's first stage (the warm start keeps ``hard_negatives`` of them at random) (``model.args.first_stage``), so the re-ranker
    trains on the candidates it will re-rank (as ALBEF mines ITM negatives by its ITC
    similarity). ``fusion = w`` trains the score ``pair logit + w x first-stage score`` (the
    order re-ranking gives with ``eval.rerank_fusion: w``): the cross-encoder learns a residual
    over its first stage, whose order it keeps while it knows nothing better; 0 = IAIS.
    """

    #: not a loss over embedding batches: the ``itm_hard_negatives`` task calls :meth:`terms`
    embedding_loss = False

    def __init__(self, margin: float = 0.2, negatives: int = 399, hard_negatives: int = 31,
                 directions: str = "alternate", alignment: str = "none", weight: float = 1.0,
                 schedule: str = "exp", reduction: str = "sum", eps: float = 1e-6,
                 random_steps: int = 0, pool: str = "uniform", fusion: float = 0.0,
                 warmup_loss: str = "hinge", cross_fit: list | None = None) -> None:
        super().__init__()
        if alignment not in ALIGNMENTS:
            raise ConfigError(f"loss.args.alignment: expected one of {', '.join(ALIGNMENTS)}, got {alignment!r}")
        if schedule not in SCHEDULES:
            raise ConfigError(f"loss.args.schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if directions not in ("alternate", "both"):
            raise ConfigError(f"loss.args.directions: expected alternate or both, got {directions!r}")
        if reduction not in ("sum", "mean"):
            raise ConfigError(f"loss.args.reduction: expected sum or mean, got {reduction!r}")
        for key, v in (("negatives", negatives), ("hard_negatives", hard_negatives)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"loss.args.{key}: expected a positive integer, got {v!r}")
        if isinstance(random_steps, bool) or not isinstance(random_steps, int) or random_steps < 0:
            raise ConfigError(f"loss.args.random_steps: expected a non-negative integer, got {random_steps!r}")
        if warmup_loss not in WARMUP_LOSSES:
            raise ConfigError(f"loss.args.warmup_loss: expected one of {', '.join(WARMUP_LOSSES)}, got {warmup_loss!r}")
        if pool not in ("uniform", "first_stage"):
            raise ConfigError(f"loss.args.pool: expected uniform or first_stage, got {pool!r}")
        if isinstance(fusion, bool) or not isinstance(fusion, (int, float)) or not math.isfinite(fusion) or fusion < 0:
            raise ConfigError(f"loss.args.fusion: expected a number >= 0, got {fusion!r}")
        if hard_negatives > negatives:
            raise ConfigError(f"loss.args.hard_negatives ({hard_negatives}) exceeds loss.args.negatives ({negatives})")
        if cross_fit is not None:
            if (not isinstance(cross_fit, list) or len(cross_fit) < 2
                    or not all(isinstance(r, str) and r for r in cross_fit)):
                raise ConfigError("loss.args.cross_fit: expected a list of 2 or more run folders (the first stage "
                                  f"trained without each fold), got {cross_fit!r}")
            if pool != "first_stage":
                raise ConfigError("loss.args.cross_fit: needs loss.args.pool: first_stage (an out-of-fold first "
                                  "stage scores its own fold only, so each pool stays in its anchor's fold)")
        self.cross_fit = list(cross_fit) if cross_fit else []
        self.margin = float(margin)
        self.negatives, self.hard_negatives = negatives, hard_negatives
        self.directions, self.alignment = directions, alignment
        self.weight, self.schedule, self.reduction, self.eps = float(weight), schedule, reduction, float(eps)
        self.random_steps = random_steps
        self.pool = pool
        self.warmup_loss = warmup_loss
        self.fusion = float(fusion)

    @property
    def needs_maps(self) -> bool:
        return self.alignment != "none" and self.weight != 0

    def relation(self, maps: dict[str, torch.Tensor], modality: str) -> torch.Tensor:
        """Per positive pair alignment distance (B,)."""
        if self.alignment == "distributed":
            return distributed_alignment(maps, modality, self.eps)
        return singular_alignment(maps, modality)

    def combine(self, pos: torch.Tensor, neg: torch.Tensor, maps: dict[str, torch.Tensor] | None,
                modality: str, step: int, total: int) -> dict[str, torch.Tensor]:
        """Named terms of one direction: ``rank_loss`` and, with alignment, ``iais_loss``
        (already scaled by ``weight`` and the TSA threshold) plus logged metrics."""
        warm = WARMUP_LOSSES[self.warmup_loss] if step < self.random_steps else None
        out = {"rank_loss": warm(pos, neg) if warm is not None else ranking_hinge(pos, neg, self.margin),
               "pos_prob": torch.sigmoid(pos.detach()).mean(),
               "hard_neg_prob": torch.sigmoid(neg.detach()).mean()}
        if maps is not None and self.needs_maps:
            per_pair = self.relation(maps, modality)  # (B,)
            dist = per_pair.sum() if self.reduction == "sum" else per_pair.mean()
            tsa = tsa_threshold(self.schedule, step, total)
            out["iais_loss"] = self.weight * tsa * dist
            out[f"iais_{modality}"] = per_pair.detach().mean()
            out["tsa"] = torch.tensor(tsa)
        return out

    def forward(self, *args, **kwargs):  # pragma: no cover - guidance only
        raise ConfigError("loss 'iais' trains a cross-encoder (model.type: cross_encoder) with hard negatives")


LOSS_ARGS["iais"] = IaisLossArgs
