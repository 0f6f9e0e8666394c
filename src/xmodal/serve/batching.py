"""Micro-batching for the search server: concurrent requests gathered into one model call.

A :class:`MicroBatcher` is called by the threads that serve requests (``batcher(item)``, which
blocks until that item's result is ready). No extra thread is involved: one caller at a time is
the *leader*: it takes the waiting items (its own first among them, up to ``max_batch``), when
the previous batch showed concurrent load waits up to ``max_wait_ms`` for more, runs
``run_batch(items)`` once and hands each caller its own result; the callers whose items were
not in the batch then elect the next leader. An idle server therefore answers a lone request on
its own thread at once (no hand-off, no added wait), while under load the requests that arrive
during one batch's model call form the next batch.

When a batch of several items fails, each item is run again on its own, so one bad request
fails alone and the others get their answers.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Sequence

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: Default largest batch, and the longest wait (ms) for more requests under load.
MAX_BATCH = 32
BATCH_WAIT_MS = 2.0
#: Upper bounds accepted for ``max_batch`` and ``max_wait_ms``.
MAX_BATCH_LIMIT = 4096
MAX_WAIT_LIMIT_MS = 1000.0


def check_batching(max_batch: Any, max_wait_ms: Any) -> tuple[int, float]:
    """``(max_batch, max_wait_ms)`` validated: an int in 1..4096 and a number of ms in 0..1000."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise ConfigError(f"max_batch={max_batch!r}: must be an integer between 1 and {MAX_BATCH_LIMIT}")
    if (isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float))
            or not 0 <= max_wait_ms <= MAX_WAIT_LIMIT_MS):  # also refuses nan
        raise ConfigError(f"batch_wait_ms={max_wait_ms!r}: must be a number of milliseconds between 0 and "
                          f"{MAX_WAIT_LIMIT_MS:g}")
    return max_batch, float(max_wait_ms)


class MicroBatcher:
    """Runs ``run_batch(items) -> results`` (one result per item, in order) for gathered items.

    Thread-safe: call it from any number of threads; ``stats()`` counts batches and items.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], *, max_batch: int = MAX_BATCH,
                 max_wait_ms: float = BATCH_WAIT_MS, name: str = "batcher") -> None:
        self.max_batch, self.max_wait_ms = check_batching(max_batch, max_wait_ms)
        self.run_batch = run_batch
        self.name = name
        self._queue: deque[tuple[Any, Future]] = deque()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # the leader waits here for more items
        self._done = threading.Condition(self._lock)  # followers wait here for their result
        self._leading = False
        self._last_size = 0
        self._batches = 0
        self._items = 0
        self._largest = 0

    def __call__(self, item: Any) -> Any:
        """``item``'s result, computed in a batch with the items of concurrent callers (or its error)."""
        fut: Future = Future()
        with self._lock:
            self._queue.append((item, fut))
            self._arrived.notify()
        while True:
            with self._lock:
                while self._leading and not fut.done():
                    self._done.wait()
                if fut.done():
                    break
                self._leading = True
                batch = self._gather()
            try:
                self._run(batch)
            finally:
                with self._lock:
                    self._leading = False
                    self._done.notify_all()
        return fut.result()

    def stats(self) -> dict[str, Any]:
        """Batches run, items answered, items waiting now, mean and largest batch size so far."""
        with self._lock:
            mean = self._items / self._batches if self._batches else 0.0
            return {"batches": self._batches, "items": self._items, "waiting": len(self._queue),
                    "mean_batch": round(mean, 2),
                    "largest_batch": self._largest, "max_batch": self.max_batch, "max_wait_ms": self.max_wait_ms}

    # -- the leader's part (called with the lock held) -----------------------------------
    def _gather(self) -> list[tuple[Any, Future]]:
        batch = self._take(self.max_batch)
        # wait for more only when the last batch showed concurrent requests: a lone client is
        # never delayed, a busy server fills its batches
        if len(batch) < self.max_batch and self.max_wait_ms > 0 and self._last_size > 1:
            deadline = time.monotonic() + self.max_wait_ms / 1000.0
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if not self._queue:
                    self._arrived.wait(left)
                batch += self._take(self.max_batch - len(batch))
        self._last_size = len(batch)
        self._batches += 1
        self._items += len(batch)
        self._largest = max(self._largest, len(batch))
        return batch

    def _take(self, n: int) -> list[tuple[Any, Future]]:
        out = []
        while self._queue and len(out) < n:
            out.append(self._queue.popleft())
        return out

    # -- running a batch (without the lock) ------------------------------------------------
    def _run(self, batch: list[tuple[Any, Future]]) -> None:
        try:
            results = list(self.run_batch([item for item, _ in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{self.name}: run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as e:  # handed to the callers, raised in their threads
            if len(batch) > 1:
                log.debug("%s: a batch of %d failed (%s); running its items one by one", self.name, len(batch), e)
                for one in batch:
                    self._run_alone(*one)
                return
            batch[0][1].set_exception(e)
            return
        except BaseException as e:  # KeyboardInterrupt, SystemExit: the others must not wait forever
            for _, fut in batch:
                fut.set_exception(e)
            raise
        for (_, fut), res in zip(batch, results):
            fut.set_result(res)

    def _run_alone(self, item: Any, fut: Future) -> None:
        try:
            (res,) = self.run_batch([item])
        except Exception as e:
            fut.set_exception(e)
        else:
            fut.set_result(res)
