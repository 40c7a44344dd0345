"""A tiny decorator registry, shared by methods, distances and transforms.

Following torchdistill: components register themselves by name with a decorator, and
configs refer to them by that name.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import AutoSKDError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object mapping with a decorator to fill it and a clear error on a miss."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[key] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        key = str(name).lower()
        if key not in self._items:
            known = ", ".join(sorted(self._items))
            raise AutoSKDError(f"unknown {self.kind} {name!r}; choose one of: {known}")
        return self._items[key]

    def __contains__(self, name: object) -> bool:
        return str(name).lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
