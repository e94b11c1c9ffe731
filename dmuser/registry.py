"""A name -> class registry, used for targets (and later exception stores and dirty logs).

Like the kernel's ``dm_register_target``: registering a name twice is an error,
and a lookup miss names what is known.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, *names: str) -> Callable[[type[T]], type[T]]:
        """Class decorator registering the class under ``names``."""

        def deco(cls: type[T]) -> type[T]:
            for name in names:
                if name in self._items:
                    raise ValueError(f"{self.kind} {name!r} registered twice")
                self._items[name] = cls
            return cls

        return deco

    def get(self, name: str) -> type[T] | None:
        return self._items.get(name)

    def names(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self) -> Iterator[tuple[str, type[T]]]:
        return iter(sorted(self._items.items()))
