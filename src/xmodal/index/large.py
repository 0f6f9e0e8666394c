"""Turning an index folder into an ``ivfpq`` index that fits a memory budget.

The vectors stay in the folder's ``vectors.npy`` (memory-mapped, streamed in blocks of
65,536 rows); only the compressed codes, ids and centroids are held in RAM. Each block's pages
of the memory map are released once added, and the training sample is gathered in slices
released the same way (:mod:`.pages`), so the process's RSS stays near the printed estimate
instead of growing by the file's size. ``vectors.npy`` is not rewritten. Behind ``xmodal index
--backend ivfpq --memory-budget 4GB``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

from .ivfpq import choose_params, describe_estimate, estimate_memory, parse_size
from .store import Index

log = logging.getLogger(__name__)


def convert_to_ivfpq(path: str | os.PathLike, memory_budget: int | str, *, opq: bool = True,
                     report: Callable[[str], None] | None = None, progress: bool = False) -> dict[str, Any]:
    """Rebuild the index at ``path`` as ``ivfpq`` with :func:`.ivfpq.choose_params` for ``memory_budget``.

    The plan and its memory estimate go to ``report`` (default: the log) before the build.
    Returns the backend arguments used. Committed atomically; ``vectors.npy`` is not rewritten.
    """
    budget = parse_size(memory_budget)
    with Index.open(path, verify="size", progress=progress) as index:
        n, d = len(index), index.dim
        params = choose_params(n, d, budget, metric=index.metric, opq=opq)
        text = describe_estimate(n, d, params, estimate_memory(n, d, params, metric=index.metric))
        (report or log.info)(text)
        index.rebuild(backend="ivfpq", backend_args=params)
    return params
