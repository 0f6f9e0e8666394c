"""Rich progress bars that stay quiet when disabled or when output is not a terminal."""
from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


def make_progress(transient: bool = False) -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    transient=transient)


def track(seq: Iterable[T], description: str = "", total: int | None = None,
          enabled: bool = True) -> Iterator[T]:
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
