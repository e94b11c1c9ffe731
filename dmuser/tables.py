"""Typed views of ``dmsetup table`` lines (re-exported by :mod:`dmuser.status`).

:func:`parse_table` takes one line ``START LENGTH TYPE ARGS...`` as the
``table`` verb returns it and gives the class registered for the type;
``zero``, ``error`` and unknown types give :class:`RawTable`.  A line that is
malformed for its (known) type raises :class:`ValueError`.  Pure: no I/O.

    >>> t = parse_table("0 8192 linear 254:0 2048")
    >>> type(t).__name__, t.device, t.offset, str(t)
    ('LinearTable', '254:0', 2048, '0 8192 linear 254:0 2048')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def split_line(line: str) -> tuple[int, int, str, tuple[str, ...]]:
    words = line.split()
    if len(words) < 3:
        raise ValueError(f"not a status or table line: {line!r}")
    try:
        start, length = int(words[0]), int(words[1])
    except ValueError:
        raise ValueError(f"bad START or LENGTH in {line!r}") from None
    return start, length, words[2], tuple(words[3:])


def uint(word: str, what: str) -> int:
    try:
        value = int(word)
    except ValueError:
        raise ValueError(f"{what}: {word!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{what}: {word!r} is negative")
    return value


# -- table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TableLine:
    """One table line: where the target sits, its type and its raw arguments."""

    start: int
    length: int
    target_type: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return " ".join([str(self.start), str(self.length), self.target_type, *self.args])


@dataclass(frozen=True)
class RawTable(TableLine):
    """A target type this module does not know, or one without arguments."""


@dataclass(frozen=True)
class LinearTable(TableLine):
    """``linear DEV OFFSET``."""

    device: str
    offset: int


@dataclass(frozen=True)
class FlakeyTable(TableLine):
    """``flakey DEV OFFSET UP DOWN [NFEATURES FEATURE...]`` (intervals in seconds).

    >>> t = parse_table("0 8192 flakey 254:0 0 0 10 1 drop_writes")
    >>> t.up_interval, t.down_interval, t.features
    (0, 10, ('drop_writes',))
    """

    device: str
    offset: int
    up_interval: int
    down_interval: int
    features: tuple[str, ...]


@dataclass(frozen=True)
class SnapshotTable(TableLine):
    """``snapshot``/``snapshot-merge ORIGIN COW P|PO|N CHUNK [NFEATURES FEATURE...]``."""

    origin: str
    cow: str
    mode: str
    chunk_size: int
    features: tuple[str, ...]

    @property
    def persistent(self) -> bool:
        return self.mode.startswith("P")


@dataclass(frozen=True)
class SnapshotOriginTable(TableLine):
    """``snapshot-origin DEV``."""

    origin: str


@dataclass(frozen=True)
class MirrorTable(TableLine):
    """``mirror LOGTYPE N LOGARGS... NLEGS DEV OFFSET... [NFEATURES FEATURE...]``.

    >>> t = parse_table("0 8192 mirror core 2 1024 nosync 2 254:0 16384 254:64 8192")
    >>> t.log_type, t.log_args, t.legs, t.features
    ('core', ('1024', 'nosync'), (('254:0', 16384), ('254:64', 8192)), ())
    """

    log_type: str
    log_args: tuple[str, ...]
    legs: tuple[tuple[str, int], ...]
    features: tuple[str, ...]


def _features(words: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not words:
        return ()
    n = uint(words[0], f"{what} feature count")
    if len(words) != 1 + n:
        raise ValueError(f"{what}: feature count {n} does not match {' '.join(words)!r}")
    return words[1:]


def _need(a: tuple[str, ...], n: int, what: str) -> None:
    if len(a) < n:
        raise ValueError(f"{what} table too short: {' '.join(a)!r}")


def _table_linear(s: int, n: int, t: str, a: tuple[str, ...]) -> TableLine:
    _need(a, 2, t)
    return LinearTable(s, n, t, a, a[0], uint(a[1], "offset"))


def _table_flakey(s: int, n: int, t: str, a: tuple[str, ...]) -> TableLine:
    _need(a, 4, t)
    return FlakeyTable(s, n, t, a, a[0], uint(a[1], "offset"), uint(a[2], "up interval"),
                       uint(a[3], "down interval"), _features(a[4:], t))


def _table_snapshot(s: int, n: int, t: str, a: tuple[str, ...]) -> TableLine:
    _need(a, 4, t)
    return SnapshotTable(s, n, t, a, a[0], a[1], a[2], uint(a[3], "chunk size"),
                         _features(a[4:], t))


def _table_origin(s: int, n: int, t: str, a: tuple[str, ...]) -> TableLine:
    _need(a, 1, t)
    return SnapshotOriginTable(s, n, t, a, a[0])


def _table_mirror(s: int, n: int, t: str, a: tuple[str, ...]) -> TableLine:
    _need(a, 3, t)
    nlog = uint(a[1], "log argument count")
    rest = a[2 + nlog:]
    _need(rest, 1, t)
    nlegs = uint(rest[0], "number of legs")
    _need(rest, 1 + 2 * nlegs, t)
    legs = tuple((rest[1 + 2 * i], uint(rest[2 + 2 * i], "leg offset")) for i in range(nlegs))
    return MirrorTable(s, n, t, a, a[0], a[2:2 + nlog], legs,
                       _features(rest[1 + 2 * nlegs:], t))


TABLE_PARSERS: dict[str, Callable[[int, int, str, tuple[str, ...]], TableLine]] = {
    "linear": _table_linear, "flakey": _table_flakey,
    "snapshot": _table_snapshot, "snapshot-merge": _table_snapshot,
    "snapshot-origin": _table_origin, "mirror": _table_mirror,
}


def parse_table(line: str) -> TableLine:
    """The typed form of one ``dmsetup table`` line (``zero``, ``error`` and
    unknown types give :class:`RawTable`)."""
    start, length, ttype, args = split_line(line)
    parser = TABLE_PARSERS.get(ttype)
    if parser is None:
        return RawTable(start, length, ttype, args)
    return parser(start, length, ttype, args)
