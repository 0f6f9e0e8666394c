"""Multi-process training and extraction with ``torchrun`` (DDP; NCCL on GPU, gloo on CPU).

The process layout is read once from the variables ``torchrun`` sets (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) into a frozen
:class:`DistEnv`; a plain ``python -m xmodal`` run is the world of one and touches no
``torch.distributed`` API at all.

How the n-process step equals the 1-process step with the same global batch:

* **Data.** Global batch ``s`` is :meth:`BatchOrder.batch(s) <xmodal.data.inputs.BatchOrder.batch>`
  for any world size (reshuffled each epoch from ``(seed, epoch)``, like a
  ``DistributedSampler`` with ``set_epoch``); rank ``r`` encodes the ``r``-th contiguous
  slice of it (:class:`ShardedBatchOrder`). The positives mask is the global one.
* **Features.** :func:`gather` all-gathers each rank's features so every rank sees the
  global batch's negatives; the other ranks' rows are constants, the local rows keep
  their gradient (OpenCLIP's ``gather_features`` without ``gather_with_grad``).
* **Loss.** Every rank computes the *whole* global loss (the full score matrix, so
  max-violation hinge takes the hardest negative of the global batch), so the loss value
  equals the 1-process value. Rank ``r``'s backward then yields ``dL/df_r`` for its own
  features only, while parameters used directly by the loss or the scorer (temperature,
  a pair scorer's head) get their full gradient on every rank. DDP *averages* gradients,
  so the local rows' gradient is multiplied by the world size inside :func:`gather`
  (:class:`_ScaleGrad`): the average over ranks of ``W * dL/df_r * df_r/dθ`` is the
  1-process ``dL/dθ``, and the average of the identical direct terms is themselves.
  The result is exact (up to float summation order) for every loss over the score
  matrix, and for pair scorers, whose representations are gathered the same way.

BatchNorm layers (ADAPT's, the ``mlp`` projection) normalise over each rank's local
batch, as DDP and the original horovod trainings do; only they make the n-process step
differ from the 1-process one.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch

from .errors import ConfigError, XmodalError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: minutes a collective may wait (rank 0 evaluating, saving, or extracting a feature cache)
TIMEOUT_ENV = "XMODAL_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 60.0


@dataclass(frozen=True)
class DistEnv:
    """The process layout, read once. ``world_size == 1`` means not distributed."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(environ: dict | os._Environ, name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def env_from_environ(environ: dict | os._Environ | None = None) -> DistEnv:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` (as set by ``torchrun``)."""
    environ = os.environ if environ is None else environ
    world = _int_env(environ, "WORLD_SIZE", 1)
    rank = _int_env(environ, "RANK", 0)
    local = _int_env(environ, "LOCAL_RANK", rank if world > 1 else 0)
    local_world = _int_env(environ, "LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world or not 0 <= local < max(local_world, 1):
        raise ConfigError(f"inconsistent process layout: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}, "
                          f"LOCAL_WORLD_SIZE={local_world}")
    if world > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
        if missing:
            raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set; launch with torchrun "
                              "(see docs/distributed.md)")
    return DistEnv(rank=rank, local_rank=local, world_size=world, local_world_size=local_world)


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def pick_device(name: str, env: DistEnv) -> torch.device:
    """``train.device`` for this process: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    from .utils import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and env.enabled and device.index is None:
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={env.local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                              "launch at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _timeout() -> datetime.timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        minutes = float(raw) if raw else DEFAULT_TIMEOUT_MIN
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r}: expected minutes as a number") from None
    return datetime.timedelta(minutes=minutes)


@contextlib.contextmanager
def session(device_name: str = "cpu", environ: dict | None = None) -> Iterator[tuple[DistEnv, torch.device]]:
    """Join the process group ``torchrun`` describes (if any) for the duration of the block.

    Yields ``(env, device)``. The backend is NCCL when the device is a GPU, gloo otherwise.
    A group that already exists (a caller initialised it) is used and left alone.
    """
    env = env_from_environ(environ)
    device = pick_device(device_name, env)
    created = False
    if env.enabled:
        dist = _dist()
        if not dist.is_available():
            raise XmodalError("this PyTorch build has no torch.distributed; run one process")
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            kw: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend=backend, init_method="env://", rank=env.rank,
                                    world_size=env.world_size, timeout=_timeout(), **kw)
            created = True
            log.info("rank %d/%d joined the %s group (device %s)", env.rank, env.world_size, backend, device)
        elif dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise XmodalError(f"a process group exists with rank {dist.get_rank()}/{dist.get_world_size()}, "
                              f"but the environment says {env.rank}/{env.world_size}")
    try:
        yield env, device
    finally:
        if created:
            dist = _dist()
            with contextlib.suppress(Exception):  # a failed peer already tore the group down
                dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# collectives (no-ops in a world of one)
def barrier(env: DistEnv) -> None:
    """Wait for every rank."""
    if env.enabled:
        _dist().barrier()


def broadcast_flag(env: DistEnv, flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. an early stop decided by rank 0's evaluation)."""
    if not env.enabled:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    _dist().broadcast(t, src=0)
    return bool(t.item())


def max_over_ranks(env: DistEnv, values: list[int], device: torch.device) -> list[int]:
    """Element-wise largest ``values`` over the ranks, in one collective."""
    if not env.enabled:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def all_reduce_max(env: DistEnv, value: int, device: torch.device) -> int:
    """Largest ``value`` over the ranks."""
    return max_over_ranks(env, [value], device)[0]


def all_reduce_sum(env: DistEnv, value: int, device: torch.device) -> int:
    """Sum of ``value`` over the ranks."""
    if not env.enabled:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    _dist().all_reduce(t)
    return int(t.item())


def in_turns(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 first, then on the first process of every other node, then on
    the rest, with a barrier between: one process fills a shared cache (frozen-tower
    features) before the others read it, instead of all of them writing it at once."""
    if not env.enabled:
        return fn()
    wave = 0 if env.rank == 0 else (1 if env.local_rank == 0 else 2)
    out: Any = None
    for w in range(3):
        if wave == w:
            out = fn()
        barrier(env)
    return out


# ------------------------------------------------------------------------------------------
# gathering features with the gradient through the local part
class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (the world size,
    undoing DDP's average for gradients that reach only the local rows)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def gather(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Concatenate ``x (B_r, ...)`` of every rank along dim 0, in rank order.

    Every rank must pass the same shape. Other ranks' rows carry no gradient; the local
    rows keep theirs, scaled by the world size (see the module docstring for why).
    """
    if not env.enabled:
        return x
    dist = _dist()
    send = x.detach().contiguous()
    wire = send.to(torch.uint8) if send.dtype == torch.bool else send  # gloo has no bool all_gather
    parts = [torch.empty_like(wire) for _ in range(env.world_size)]
    dist.all_gather(parts, wire)
    if send.dtype == torch.bool:
        parts = [p.bool() for p in parts]
    parts[env.rank] = _ScaleGrad.apply(x, float(env.world_size)) if x.requires_grad else x
    return torch.cat(parts, dim=0)





# ------------------------------------------------------------------------------------------
# shards
def shard_bounds(n: int, env: DistEnv, align: int = 1) -> tuple[int, int]:
    """Rank's contiguous slice ``[lo, hi)`` of ``n`` items; boundaries on multiples of
    ``align`` (whole batches), so a shard's batches are the 1-process run's batches."""
    if align < 1:
        raise ValueError(f"align must be at least 1, got {align}")
    blocks = -(-n // align)
    per, extra = divmod(blocks, env.world_size)
    start = env.rank * per + min(env.rank, extra)
    stop = start + per + (1 if env.rank < extra else 0)
    return min(start * align, n), min(stop * align, n)




__all__ = ["DistEnv", "all_reduce_max", "all_reduce_sum", "barrier", "broadcast_flag", "env_from_environ",
           "gather", "in_turns", "max_over_ranks", "pick_device", "session", "shard_bounds"]
