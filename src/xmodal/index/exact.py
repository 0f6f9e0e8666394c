"""Exact search and the backend interface.

Exact k-NN is a blocked matmul: the database streams through in blocks of ``block_size``
rows, each block is scored against the queries, its top-k is taken and merged into a running
top-k (the ``ResultHeap`` pattern of faiss ``contrib/exhaustive_search.py``). Memory is
bounded by the block size, not by the number of vectors, so a memory-mapped ``vectors.npy``
far larger than RAM can be searched.

Every backend (exact here, FAISS ones in :mod:`.faiss_backend`) implements :class:`Backend`
and registers itself in :data:`BACKENDS`. The index's ``vectors.npy`` stays the source of
truth: a backend can always be rebuilt from it.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Protocol

import numpy as np

from ..errors import ConfigError
from ..progress import track
from ..registry import Registry

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Similarity metrics; scores are always "higher is better" (``l2`` scores are negated squared distances).
METRICS = ("ip", "l2")

#: Index backends by name: ``exact`` (torch), ``flat``, ``ivf``, ``hnsw`` (FAISS).
BACKENDS: Registry[type["Backend"]] = Registry("index backend")

#: Score given to padding slots (id ``-1``) when fewer than k vectors exist.
PAD_SCORE = float("-inf")


class VectorSource(Protocol):
    """Read access to an index's vectors (committed memory map + rows added since)."""

    dim: int

    def __len__(self) -> int: ...

    def blocks(self, block_size: int, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_row, rows)`` with ``rows`` of shape ``(<=block_size, dim)``, storage dtype."""
        ...

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows by number as a float32 ``(len(rows), dim)`` array."""
        ...


class TopK:
    """Running top-k over streamed blocks of scores (faiss ``ResultHeap`` style).

    Holds ``(nq, k)`` scores and row ids; :meth:`add` merges a ``(nq_block, B)`` block of
    scores whose columns are rows ``offset .. offset + B - 1``.
    """

    def __init__(self, nq: int, k: int) -> None:
        import torch  # lazily: opening an index or a FAISS search needs no torch

        self.k = k
        self.scores = torch.full((nq, k), PAD_SCORE, dtype=torch.float32)
        self.ids = torch.full((nq, k), -1, dtype=torch.int64)

    def add(self, q0: int, scores: "torch.Tensor", offset: int) -> None:
        """Merge ``scores`` (queries ``q0 .. q0 + nqb - 1``, rows ``offset ..``) into the result."""
        import torch

        nqb, b = scores.shape
        kb = min(self.k, b)
        bs, bi = torch.topk(scores, kb, dim=1)  # (nqb, kb), each block's best only can survive
        bi += offset
        cur_s, cur_i = self.scores[q0:q0 + nqb], self.ids[q0:q0 + nqb]
        all_s = torch.cat([cur_s, bs], dim=1)  # (nqb, k + kb)
        all_i = torch.cat([cur_i, bi], dim=1)  # (nqb, k + kb)
        top_s, pos = torch.topk(all_s, self.k, dim=1)  # (nqb, k)
        self.scores[q0:q0 + nqb] = top_s
        self.ids[q0:q0 + nqb] = torch.gather(all_i, 1, pos)

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores float32 (nq, k) descending, ids int64 (nq, k), -1 = padding)``."""
        ids = self.ids.numpy().copy()
        scores = self.scores.numpy().copy()
        scores[ids < 0] = PAD_SCORE
        return scores, ids


def _as_float_tensor(block: np.ndarray) -> "torch.Tensor":
    """A float32 tensor over ``block`` without copying when it already is float32."""
    import torch

    if block.dtype != np.float32:
        block = block.astype(np.float32)
    block = np.ascontiguousarray(block)
    with warnings.catch_warnings():
        # read-only memory maps: torch warns that the tensor is not writable; it is only read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(block)


def exact_search(queries: np.ndarray, source: VectorSource, k: int, *, metric: str = "ip",
                 block_size: int = 32768, query_block: int = 1024,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``queries`` (Q, d) over every vector of ``source``.

    Peak memory is about ``block_size * (d + query_block) * 4`` bytes on top of the result.
    Returns ``(scores, ids)``: float32 (Q, k) descending and int64 (Q, k) row numbers, with
    ``-1`` ids (score ``-inf``) padding rows past ``len(source)``. Ties are broken arbitrarily.
    """
    if metric not in METRICS:
        raise ConfigError(f"metric {metric!r}: choose one of {', '.join(METRICS)}")
    import torch

    with torch.inference_mode():
        return _exact_search(queries, source, k, metric, block_size, query_block, progress)


def _exact_search(queries: np.ndarray, source: VectorSource, k: int, metric: str, block_size: int,
                  query_block: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    q = _as_float_tensor(np.asarray(queries))  # (Q, d)
    nq = q.shape[0]
    heap = TopK(nq, k)
    if nq == 0 or len(source) == 0:
        return heap.finalize()
    q_sq = (q * q).sum(1, keepdim=True) if metric == "l2" else None  # (Q, 1)
    n_blocks = -(-len(source) // block_size)
    for start, block in track(source.blocks(block_size), "exact search", total=n_blocks,
                              enabled=progress and n_blocks > 1):
        x = _as_float_tensor(block)  # (B, d)
        x_sq = (x * x).sum(1) if metric == "l2" else None  # (B,)
        for q0 in range(0, nq, query_block):
            qb = q[q0:q0 + query_block]  # (Qb, d)
            s = qb @ x.T  # (Qb, B)
            if metric == "l2":
                # -||q - x||^2 = 2 q.x - ||x||^2 - ||q||^2; clamp the rounding that makes it positive
                s = (2 * s - x_sq - q_sq[q0:q0 + query_block]).clamp_(max=0.0)
            heap.add(q0, s, start)
    return heap.finalize()


class Backend:
    """How an index answers k-NN queries. ``vectors.npy`` remains the source of truth.

    Subclasses set :attr:`name`, :attr:`defaults` (build + search arguments, persisted in the
    manifest) and :attr:`search_params` (the subset a single ``search`` call may override).
    """

    name: ClassVar[str] = ""
    #: File the backend persists to inside the index folder, or None when it has no state.
    file: ClassVar[str | None] = None
    defaults: ClassVar[dict[str, Any]] = {}
    search_params: ClassVar[tuple[str, ...]] = ()
    #: Whether every search scores every vector (then ``min(k, n)`` results always come back).
    exhaustive: ClassVar[bool] = False

    def __init__(self, dim: int, metric: str, args: dict[str, Any] | None = None) -> None:
        if metric not in METRICS:
            raise ConfigError(f"metric {metric!r}: choose one of {', '.join(METRICS)}")
        self.dim = dim
        self.metric = metric
        self.args = self.check_args(args or {})

    @classmethod
    def check_args(cls, args: dict[str, Any], *, search: bool = False) -> dict[str, Any]:
        """Fill defaults and reject unknown keys (``search=True``: only search-time keys)."""
        allowed = cls.search_params if search else tuple(cls.defaults)
        unknown = sorted(set(args) - set(allowed))
        if unknown:
            kind = "search parameter" if search else "backend_args key"
            raise ConfigError(f"{cls.name} index: unknown {kind} {', '.join(map(repr, unknown))}; "
                              f"choose from: {', '.join(allowed) or '(none)'}")
        for key, value in args.items():
            if value is None and cls.defaults[key] is None:
                continue  # "decide at build time", e.g. IVF nlist from the collection size
            low = 0 if key == "seed" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{cls.name} index: {key}={value!r} must be an integer >= {low}")
        return {**cls.defaults, **args} if not search else dict(args)

    # -- lifecycle -------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """How many rows the backend has indexed (rows ``ntotal ..`` still need :meth:`extend`)."""
        return 0

    def build(self, source: VectorSource, progress: bool = False) -> None:
        """Index every vector of ``source`` from scratch."""

    def extend(self, source: VectorSource, progress: bool = False) -> None:
        """Index rows ``ntotal .. len(source) - 1`` (added since the last build/extend)."""

    def search(self, queries: np.ndarray, k: int, source: VectorSource,
               **params: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(scores (Q, k) float32 descending, ids (Q, k) int64)``; ``queries`` float32 (Q, d)."""
        raise NotImplementedError

    def save(self, path: Path) -> None:
        """Write the backend's state to ``path`` (only called when :attr:`file` is set)."""

    def load(self, path: Path | None, count: int, info: dict[str, Any] | None = None) -> None:
        """Read the state written by :meth:`save`; ``count`` and ``info`` come from the manifest."""

    def info(self) -> dict[str, Any]:
        """Facts resolved at build time (e.g. IVF ``nlist``), recorded in the manifest."""
        return {}


@BACKENDS.register("exact")
class ExactBackend(Backend):
    """Brute force with torch over the memory-mapped vectors; no state of its own."""

    name = "exact"
    exhaustive = True
    defaults = {"block_size": 32768, "query_block": 1024}
    search_params = ("block_size", "query_block")

    def __init__(self, dim: int, metric: str, args: dict[str, Any] | None = None) -> None:
        super().__init__(dim, metric, args)
        self._n = 0

    @property
    def ntotal(self) -> int:
        return self._n

    def build(self, source: VectorSource, progress: bool = False) -> None:
        self._n = len(source)

    def extend(self, source: VectorSource, progress: bool = False) -> None:
        self._n = len(source)

    def load(self, path: Path | None, count: int, info: dict[str, Any] | None = None) -> None:
        self._n = count

    def search(self, queries: np.ndarray, k: int, source: VectorSource,
               **params: Any) -> tuple[np.ndarray, np.ndarray]:
        p = {**self.args, **params}
        return exact_search(queries, source, k, metric=self.metric, block_size=p["block_size"],
                            query_block=p["query_block"])


def list_backends() -> list[str]:
    """Names accepted by ``Index.create(backend=...)``."""
    return BACKENDS.names()
