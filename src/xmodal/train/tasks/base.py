"""Tasks own a model and its loss: ``training_step(batch) -> (losses, metrics)``.

The loop knows no method; a method brings a task (registered in ``TASKS``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...registry import Registry
from ...data.inputs import Batch

TASKS: Registry = Registry("task")


def split_terms(out: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A loss's terms: ``*_loss`` keys are summed by the loop, the rest are logged metrics."""
    losses = {k: v for k, v in out.items() if k.endswith("_loss")}
    metrics = {k: float(v) for k, v in out.items() if not k.endswith("_loss")}
    return losses, metrics


class ContrastiveTask(nn.Module):
    """Embedding scorers: encode both sides, apply a batch loss over the positives mask."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def training_step(self, batch: Batch, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        img = self.model.encode_image(batch.images)  # (B, D)
        txt = self.model.encode_text(batch.texts)  # (B, D)
        out = self.loss(img, txt, pos_mask=batch.pos_mask.to(img.device), step=step)
        return split_terms(out)


@TASKS.register("contrastive")
def _contrastive(model: nn.Module, loss: nn.Module) -> ContrastiveTask:
    return ContrastiveTask(model, loss)


def build_task(model: nn.Module, loss: nn.Module, name: str | None = None) -> Any:
    """The task ``name`` (default: the one the model declares, ``model.task_name()``) over
    ``model`` (the model itself, or a wrapper such as :class:`~xmodal.train.ddp.GatheringModel`)."""
    return TASKS.create(name or model.task_name(), model, loss)


class PairScoreTask(nn.Module):
    """Pair scorers (ADAPT, ALADIN's alignment head): score the in-batch ``(B, B)`` matrix
    with the model, then apply a loss over scores (``loss.from_scores``)."""

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def training_step(self, batch: Batch, step: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        img = self.model.encode_image_reps(batch.images)
        txt = self.model.encode_text_reps(batch.texts)
        scores = self.model.score(img, txt)  # (B_img, B_txt)
        out = self.loss.from_scores(scores, pos_mask=batch.pos_mask.to(scores.device), step=step)
        return split_terms(out)


@TASKS.register("pair")
def _pair(model: nn.Module, loss: nn.Module) -> PairScoreTask:
    return PairScoreTask(model, loss)
