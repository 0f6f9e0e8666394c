"""The training side of multi-process runs: gathered representations, DDP, per-step seeds.

The process group itself (:class:`xmodal.distributed.DistEnv`, collectives, shards) lives in
:mod:`xmodal.distributed`, which data extraction and index building use too; see its
docstring for how the n-process step equals the 1-process step.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..distributed import DistEnv, gather, max_over_ranks
from ..errors import ConfigError
from ..models.base import TowerOutput


def _pad_dim1(x: torch.Tensor, length: int, value: float | bool = 0) -> torch.Tensor:
    if x.shape[1] == length:
        return x
    pad = x.new_full((x.shape[0], length - x.shape[1], *x.shape[2:]), value)  # (B, length, ...)
    return torch.cat([x, pad], dim=1)


def gather_reps(reps: Any, env: DistEnv) -> Any:
    """:func:`gather` over a model's representations: tensors, :class:`TowerOutput`
    (token sequences padded to the longest on any rank, with a mask), and tuples, lists or
    dicts of them (an ensemble's members)."""
    if not env.enabled:
        return reps
    if isinstance(reps, torch.Tensor):
        return gather(reps, env)
    if isinstance(reps, TowerOutput):
        tokens, mask = reps.tokens, reps.mask
        longest, shortest, any_mask = max_over_ranks(
            env, [tokens.shape[1], -tokens.shape[1], int(mask is not None)], tokens.device)
        shortest = -shortest
        # every rank must send the same tensors: a mask when any rank has one or lengths differ
        if (any_mask or longest != shortest) and mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (B, N)
        if mask is not None:
            mask = _pad_dim1(mask.bool(), longest, False)  # (B, N_max)
        tokens = _pad_dim1(tokens, longest, 0)  # (B, N_max, D)
        return dataclasses.replace(reps, tokens=gather(tokens, env), pooled=gather(reps.pooled, env),
                                   mask=gather(mask, env) if mask is not None else None)
    if isinstance(reps, (tuple, list)):
        return type(reps)(gather_reps(r, env) for r in reps)
    if isinstance(reps, dict):
        return {k: gather_reps(v, env) for k, v in reps.items()}
    raise ConfigError(f"cannot gather representations of type {type(reps).__name__} across processes; "
                      "train this model with one process")


class GatheringModel(nn.Module):
    """A model whose encoders return the *global* batch: each rank encodes its slice, then
    the results are gathered (:func:`gather` / :func:`gather_reps`).

    Tasks use it unchanged: a contrastive task sees ``(B_global, D)`` embeddings, a pair
    task gathered representations that it scores into the ``(B_global, B_global)`` matrix.
    The wrapped model is registered as a submodule, so the parameter order (and thus the
    optimizer state in a checkpoint) is the same as the model's own.
    """

    def __init__(self, model: nn.Module, env: DistEnv) -> None:
        super().__init__()
        self.inner = model
        self.env = env

    def encode_image(self, images: Any, **kw: Any) -> torch.Tensor:
        return gather(self.inner.encode_image(images, **kw), self.env)  # (B_global, D)

    def encode_text(self, texts: Any, **kw: Any) -> torch.Tensor:
        return gather(self.inner.encode_text(texts, **kw), self.env)  # (B_global, D)

    def encode_image_reps(self, images: Any) -> Any:
        return gather_reps(self.inner.encode_image_reps(images), self.env)

    def encode_text_reps(self, texts: Any) -> Any:
        return gather_reps(self.inner.encode_text_reps(texts), self.env)

    def score(self, image_reps: Any, text_reps: Any) -> torch.Tensor:
        return self.inner.score(image_reps, text_reps)  # (B_global, B_global)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


class _Step(nn.Module):
    """``forward(batch, step) = task.training_step(batch, step)``, so DDP can wrap a task."""

    def __init__(self, task: nn.Module) -> None:
        super().__init__()
        self.task = task

    def forward(self, batch: Any, step: int) -> Any:
        return self.task.training_step(batch, step)


def data_parallel(task: nn.Module, env: DistEnv, device: torch.device) -> Callable[[Any, int], Any]:
    """The training-step callable: ``task.training_step`` in a world of one, else the task
    wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` (which averages the
    gradients across ranks during backward and starts every rank from rank 0's weights)."""
    if not env.enabled:
        return task.training_step
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(
        _Step(task), device_ids=[device.index] if device.type == "cuda" else None,
        # the graph is the same at every step; a static graph also copes with parameters a
        # model leaves out of every step (one ADAPT direction) without searching for them
        static_graph=True)
    return ddp


def step_seed(env: DistEnv, seed: int, step: int) -> None:
    """Reseed torch for optimizer step ``step`` on this rank (several processes only).

    Dropout then differs between ranks (as it would between the rows of one big batch) and
    a resumed run draws the same masks as an uninterrupted one without saving per-rank RNG
    state. A world of one keeps its single RNG stream, saved in checkpoints.
    """
    if not env.enabled:
        return
    digest = hashlib.sha256(f"xmodal-step/{seed}/{step}/{env.rank}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class ShardedBatchOrder:
    """Rank ``r``'s slice of the global batches of a :class:`~xmodal.data.inputs.BatchOrder`.

    The global batch at step ``s`` does not depend on the world size, so a run may resume
    with another number of processes and still see the batches it would have seen.
    """

    def __init__(self, order: Any, env: DistEnv) -> None:
        if order.batch_size % env.world_size:
            raise ConfigError(f"train.batch_size={order.batch_size} is the global batch; it must divide evenly "
                              f"among {env.world_size} processes")
        self.order = order
        self.env = env
        self.local_size = order.batch_size // env.world_size

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray, slice]:
        """``(text_idx, image_idx)`` of global batch ``step`` and the slice this rank encodes."""
        text_idx, image_idx = self.order.batch(step)
        lo = self.env.rank * self.local_size
        return text_idx, image_idx, slice(lo, lo + self.local_size)


__all__ = ["GatheringModel", "ShardedBatchOrder", "data_parallel", "gather_reps", "step_seed"]
