"""Crash-point replay: the device as it was at every flush, FUA and mark of a write log.

Why: a ``log-writes`` device (``dm-log-writes``) records every write that
reached a device, in the order the device was allowed to make them durable.
A power cut can only leave the device in a state where a prefix of that log
ending at a flush (or a FUA write, or a mark) is on disk -- so a program that
is crash-safe must find its data sound in each of those states.  fstests'
generic/482 walks them by hand with ``replay-log``; :func:`crash_points`
makes it a for-loop:

    for point in crash_points(log_image, replay_to=tmp_path / "scratch.img"):
        check(point.image)      # fsck, open the database, compare a checksum

Guarantees:

* **Order and coverage.**  Points come in log order, one per log entry that
  carries a FLUSH, FUA or MARK flag (``at`` narrows it), the last one being
  the ``dm-log-writes-end`` mark the target writes when it is removed: the
  whole workload.  ``point.image`` then holds exactly the initial content
  (zeros, or ``start``) with entries ``0..point.entry`` applied as
  ``replay-log`` applies them (:func:`dmuser.formats.logwrites.replay`).
* **The check may write.**  Mounting replays a journal, SQLite rolls back a
  hot journal: ``point.image`` is a fresh copy each time (only the data
  extents are copied; holes stay holes), taken from a private base image
  that the log is applied to *incrementally* -- each entry once in total,
  not once per point.
* **Complete logs only.**  The log must be finished (the log-writes device
  removed, or its table replaced) and logging must not have stopped early
  (log device full): otherwise :class:`IncompleteLog` is raised before any
  point is yielded, naming the problem.
* The base image is deleted when the loop ends (also by ``break`` or an
  exception); ``replay_to`` is left with the last point's state.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import tempfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dmuser.formats.logwrites import (
    END_MARK,
    LOG_DISCARD_FLAG,
    LOG_FLUSH_FLAG,
    LOG_FUA_FLAG,
    LOG_MARK_FLAG,
    Entry,
    LogFormatError,
    decode_super,
    iter_entries,
)

__all__ = ["CrashPoint", "IncompleteLog", "crash_points"]

_KINDS = {"flush": LOG_FLUSH_FLAG, "fua": LOG_FUA_FLAG, "mark": LOG_MARK_FLAG}


class IncompleteLog(ValueError):
    """The write log cannot be replayed to its end (the text says why)."""


@dataclass(frozen=True, slots=True)
class CrashPoint:
    """One state a power cut could have left: entries ``0..entry`` applied."""

    #: 0-based number of this point, and how many points the log has
    number: int
    total: int
    #: the log entry (0-based) the state ends with, and its flags (``FLUSH|FUA``, ``MARK``)
    entry: int
    kind: str
    #: the mark's text for a mark entry
    mark: str | None
    #: the scratch image holding the state (a fresh copy for this point)
    image: Path

    def __str__(self) -> str:
        what = f"mark {self.mark!r}" if self.mark is not None else self.kind
        return f"crash point {self.number + 1}/{self.total} (entry {self.entry}, {what})"


@contextlib.contextmanager
def _mapped(f: BinaryIO, log: os.PathLike[str] | str) -> Iterator[memoryview]:
    """The log file mapped read-only (the kernel reads it in as it is used)."""
    size = os.fstat(f.fileno()).st_size
    if size < 512:
        raise IncompleteLog(f"{log}: not a write log ({size} bytes)")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        try:
            yield view
        finally:
            view.release()  # before the mmap closes (views of it must be gone)


def _entries(buf: memoryview, log: os.PathLike[str] | str, with_data: bool) -> list[Entry]:
    try:
        sup = decode_super(buf)
    except LogFormatError as exc:
        raise IncompleteLog(f"{log}: no write log super block ({exc}): was the "
                            "log-writes device removed before the replay?") from exc
    try:
        entries = list(iter_entries(buf, sup, with_data))
    except LogFormatError as exc:
        raise IncompleteLog(f"{log}: {exc}") from exc
    if not entries or entries[-1].mark != END_MARK:
        raise IncompleteLog(f"{log}: the log does not end with the {END_MARK.decode()} mark: "
                            "the log-writes device is still there, or logging stopped early "
                            "(log device full: its status says logging_disabled)")
    return entries


def _copy_data(src: int, dst: int, size: int) -> None:
    """Make ``dst`` a copy of ``src`` (``size`` bytes), copying only ``src``'s data extents."""
    os.ftruncate(dst, 0)
    os.ftruncate(dst, size)
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        end = min(os.lseek(src, data, os.SEEK_HOLE), size)
        while data < end:
            n = os.copy_file_range(src, dst, end - data, data, data)
            if n <= 0:
                raise OSError(f"copy_file_range stopped at {data} of {end}")
            data += n
        offset = end


def _apply(base: BinaryIO, entry: Entry) -> None:
    """Apply one entry to the open image ``base`` as :func:`~dmuser.formats.logwrites.replay`
    does: a write copies its data; a discard writes zeros in pieces of at most 1 GiB,
    skipping a piece over 128 MiB (replay-log's limits); flushes and marks write nothing."""
    start, size = entry.sector * 512, entry.nr_sectors * 512
    if entry.flags & LOG_DISCARD_FLAG:
        while size:
            piece = min(size, 1 << 30)
            if piece <= 128 << 20:
                base.seek(start)
                for done in range(0, piece, 1 << 20):
                    base.write(bytes(min(1 << 20, piece - done)))
            start, size = start + piece, size - piece
    elif entry.data is not None:
        base.seek(start)
        base.write(entry.data)


def _walk(buf: memoryview) -> Generator[Entry, None, None]:
    yield from iter_entries(buf, decode_super(buf))


def crash_points(log: os.PathLike[str] | str, replay_to: os.PathLike[str] | str, *,
                 size: int | None = None, start: os.PathLike[str] | str | None = None,
                 at: tuple[str, ...] = ("flush", "fua", "mark"),
                 since: str | None = None) -> Iterator[CrashPoint]:
    """Yield every crash point of the finished write log ``log``, with the device's
    state at it in ``replay_to`` (see the module docstring).  The device started as
    zeros of ``size`` bytes (default: the size of ``start``, else just large enough
    for every write), or as a copy of the image ``start``.  With ``since``, the
    points begin at the first mark of that text (inclusive): the states during a
    ``mkfs`` are not file systems yet, so mark its end and start there."""
    unknown = set(at) - set(_KINDS)
    if unknown:
        raise ValueError(f"at: unknown crash point kinds {sorted(unknown)} "
                         f"(known: {', '.join(_KINDS)})")
    mask = 0
    for kind in at:
        mask |= _KINDS[kind]
    with open(log, "rb") as f, _mapped(f, log) as buf:
        heads = _entries(buf, log, with_data=False)  # checked whole before any point
        if size is None:
            size = (os.stat(start).st_size if start is not None else
                    max((e.sector + e.nr_sectors) * 512 for e in heads))
        points = {e.index for e in heads if e.flags & mask}
        if since is not None:
            found = [e.index for e in heads if e.mark == since.encode()]
            if not found:
                raise ValueError(f"since: the log has no mark {since!r}")
            points = {i for i in points if i > found[0]} | {found[0]}
        total = len(points)
        target = Path(os.fspath(replay_to))
        fd, base_name = tempfile.mkstemp(prefix=".replay-base-", dir=target.parent)
        try:
            # the walk is closed (its view of the mapping dropped) before the mapping
            with os.fdopen(fd, "r+b") as base, open(target, "w+b") as out, \
                    contextlib.closing(_walk(buf)) as walk:
                if start is not None:
                    with open(start, "rb") as s:
                        _copy_data(s.fileno(), base.fileno(), size)
                else:
                    base.truncate(size)
                number = 0
                for e in walk:  # each entry applied once, however many points
                    _apply(base, e)
                    if e.index not in points:
                        continue
                    base.flush()
                    _copy_data(base.fileno(), out.fileno(), size)
                    mark = e.mark.decode(errors="replace") if e.mark is not None else None
                    yield CrashPoint(number, total, e.index, e.kind, mark, target)
                    number += 1
        finally:
            os.unlink(base_name)
