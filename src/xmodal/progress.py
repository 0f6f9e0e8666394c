"""The one progress helper: rich progress bars that stay quiet when disabled.

Every long loop in xmodal (extraction, encoding, evaluation, training, indexing, corpus
retrieval) shows its bar through :func:`make_progress` or :func:`track`; a disabled bar is a
:class:`NullProgress` with the same methods, so callers never branch on it.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator, TypeVar

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

T = TypeVar("T")


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``12.3 img/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:.1f} {self.unit}/s" if task.speed else f"- {self.unit}/s")


class NullProgress:
    """A disabled progress bar: the methods of :class:`rich.progress.Progress` that do nothing."""

    def __enter__(self) -> "NullProgress":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        pass

    def advance(self, *a: Any, **k: Any) -> None:
        pass


def make_progress(*columns: ProgressColumn, transient: bool = False, enabled: bool | None = True,
                  stderr: bool = False, percent: bool = False) -> Any:
    """A bar: description, bar, done/total (or percent), ``columns``, elapsed, remaining.

    ``enabled=None`` shows it only when the output stream is a terminal; ``enabled=False``
    returns a :class:`NullProgress`. ``stderr=True`` draws on stderr (library loops whose
    stdout is data)."""
    stream = sys.stderr if stderr else sys.stdout
    if enabled is None:
        enabled = stream.isatty()
    if not enabled:
        return NullProgress()
    from rich.console import Console

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                    TaskProgressColumn() if percent else MofNCompleteColumn(), *columns,
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=transient,
                    console=Console(stderr=True) if stderr else None)


def track(seq: Iterable[T], description: str = "", total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
    """Iterate ``seq`` with a transient bar (none when ``enabled`` is False)."""
    if not enabled:
        yield from seq
        return
    if total is None:
        try:
            total = len(seq)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with make_progress(transient=True) as prog:
        task = prog.add_task(description, total=total)
        for item in seq:
            yield item
            prog.advance(task)
