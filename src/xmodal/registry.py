"""One small registry, reused for encoders, heads, losses, datasets and CLI commands."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Generic, TypeVar

from .errors import XmodalError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to constructors.

    >>> LOSSES = Registry("loss")
    >>> @LOSSES.register("infonce")
    ... def make(**kw): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            key = name or fn.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self._items[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name]
        except KeyError:
            choices = ", ".join(sorted(self._items)) or "(none)"
            raise XmodalError(f"unknown {self.kind} {name!r}; choose one of: {choices}") from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        fn = self.get(name)
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # builtins without a signature
            return fn(*args, **kwargs)
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            valid = [p for p in sig.parameters if p not in ("self", "args", "kwargs")]
            raise XmodalError(f"{self.kind} {name!r}: {exc}; its arguments are: {', '.join(valid)}") from None
        return fn(*args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)
