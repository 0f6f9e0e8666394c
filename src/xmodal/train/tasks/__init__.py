"""Training tasks: each owns a model and its loss, ``training_step(batch, step) -> (losses, metrics)``.

A model names its task with :meth:`xmodal.models.base.Scorer.task_name`; importing this
package registers every task (contrastive, pair, aladin, hard_negatives).
"""
from __future__ import annotations

from . import aladin, hard_negatives  # noqa: F401  (registers their tasks)
from .base import TASKS, ContrastiveTask, PairScoreTask, build_task, split_terms

__all__ = ["TASKS", "ContrastiveTask", "PairScoreTask", "build_task", "split_terms"]
