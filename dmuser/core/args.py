"""Argument parsing shared by target constructors (the kernel's ``dm_arg_set``).

Numbers are "a plain unsigned decimal followed by nothing", as the kernel's
``%u%c`` / ``kstrtouint`` patterns demand: ``12abc``, ``-1``, ``0x10`` and ``""``
are rejected.  Each reader takes the error text the kernel would put in
``ti->error``, so a constructor reads like its C original.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmuser.core.errors import TargetArgError
from dmuser.core.units import MAX_SECTOR

U32_MAX = (1 << 32) - 1


def parse_uint(word: str, max_value: int = MAX_SECTOR) -> int | None:
    """The value of ``word`` if it is a plain decimal in [0, max_value], else None."""
    if not word.isascii() or not word.isdigit():
        return None
    value = int(word)
    return value if value <= max_value else None


def parse_sector(word: str, error: str) -> int:
    """A sector number (``%llu%c`` into a sector_t) or TargetArgError(error)."""
    value = parse_uint(word, MAX_SECTOR)
    if value is None:
        raise TargetArgError(error)
    return value


class ArgReader:
    """Consumes constructor words left to right."""

    def __init__(self, args: Sequence[str]) -> None:
        self._args = list(args)
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._args) - self._pos

    def peek(self) -> str | None:
        return self._args[self._pos] if self.remaining else None

    def shift(self, error: str = "Insufficient arguments") -> str:
        """Take the next word (``dm_shift_arg``); a missing word raises ``error``."""
        if not self.remaining:
            raise TargetArgError(error)
        word = self._args[self._pos]
        self._pos += 1
        return word

    def read_uint(self, min_value: int, max_value: int, error: str) -> int:
        """``dm_read_arg``: the next word as a number in [min_value, max_value]."""
        if not self.remaining:
            raise TargetArgError(error)
        value = parse_uint(self._args[self._pos], max_value)
        if value is None or value < min_value:
            raise TargetArgError(error)
        self._pos += 1
        return value

    def read_group(self, min_value: int, max_value: int, error: str) -> int:
        """``dm_read_arg_group``: a count that must also fit in the words left."""
        value = self.read_uint(min_value, max_value, error)
        if value > self.remaining:
            self._pos -= 1
            raise TargetArgError(error)
        return value

    def rest(self) -> list[str]:
        words = self._args[self._pos :]
        self._pos = len(self._args)
        return words
