"""kcopyd's data types: flags, results, statistics, the throttle, jobs and slice buffers.

Split from :mod:`dmuser.services.kcopyd` (which re-exports the public names) to keep
each module small; the guarantees are described there.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from dmuser.core.bio import Op, ReqFlag
from dmuser.services.dm_io import BufferMem, IoRequest, Region

MAX_DESTS = 8
DEFAULT_SUB_JOB_SIZE = 1024
MAX_SUB_JOB_SIZE = 2048
SPLIT_COUNT = 8

#: ``fn(read_err, write_err, context)``; may return an awaitable.
CopyNotifyFn = Callable[[bool, int, Any], "Awaitable[None] | None"]


class KcopydFlag(enum.IntFlag):
    """Values of ``flags`` (the kernel's bit numbers 1 and 2, shifted)."""

    NONE = 0
    IGNORE_ERROR = 1 << 1
    WRITE_SEQ = 1 << 2


@dataclass(frozen=True, slots=True)
class CopyResult:
    read_err: bool
    write_err: int


@dataclass(frozen=True, slots=True)
class KcopydStatistics:
    jobs_done: int
    jobs_in_flight: int
    #: Source sectors whose write reached every destination without error.
    sectors_copied: int
    nr_pages: int
    pages_in_use: int
    throttle_sleeps: int


class KcopydThrottle:
    """Limit the fraction of time a client has I/O outstanding (kernel §6.7).

    ``percent`` >= 100 means unlimited and may be changed at any time, like the
    kernel's module parameters; one throttle may be shared by several clients.
    Before each I/O, while ``io_period - percent * total_period / 100 > 0`` it
    sleeps :attr:`SLEEP` seconds, at most :attr:`MAX_SLEEPS` times.  Both
    periods are halved whenever the total reaches :attr:`INTERVAL`.  It only
    delays I/O, never fails it.
    """

    INTERVAL = 1.0
    SLEEP = 0.1
    MAX_SLEEPS = 10

    def __init__(self, percent: int = 100) -> None:
        self.percent = percent
        #: How many times this throttle has slept (statistics).
        self.sleeps = 0
        self._io_period = 0.0
        self._total_period = 0.0
        self._last: float | None = None
        self._nr_io = 0

    def _account(self, busy: bool) -> None:
        now = trio.current_time()
        diff = 0.0 if self._last is None else now - self._last
        self._last = now
        if busy:
            self._io_period += diff
        self._total_period += diff
        self._io_period = min(self._io_period, self._total_period)
        while self._total_period >= self.INTERVAL:
            self._total_period /= 2
            self._io_period /= 2

    async def io_start(self) -> None:
        """Call before issuing an I/O: sleeps while over budget (a checkpoint if it sleeps)."""
        for _ in range(self.MAX_SLEEPS):
            if self.percent >= 100:
                break
            self._account(self._nr_io > 0)
            if self._io_period - self.percent * self._total_period / 100 <= 0:
                break
            self.sleeps += 1
            await trio.sleep(self.SLEEP)
        self._nr_io += 1

    def io_start_nowait(self) -> bool:
        """:meth:`io_start` when unlimited (no sleep possible): True if it counted the I/O."""
        if self.percent < 100:
            return False
        self._nr_io += 1
        return True

    def io_finish(self) -> None:
        """Call when that I/O completed; the busy time is charged when none is left."""
        self._nr_io -= 1
        if self.percent < 100 and self._nr_io == 0:
            self._account(True)


@dataclass(slots=True, eq=False)
class _Job:
    """One copy/zero job, shared by its sub-jobs (all fields change between checkpoints)."""

    src: Region | None
    dests: tuple[Region, ...]
    count: int
    flags: KcopydFlag
    write_op: Op
    fn: CopyNotifyFn
    context: Any
    progress: int = 0
    read_err: bool = False
    write_err: int = 0
    seq_offset: int = 0  # WRITE_SEQ: offset of the next slice allowed to write
    seq_stop: int | None = None  # WRITE_SEQ: offset of the first failed slice
    seq_changed: trio.Event | None = None  # WRITE_SEQ: set when seq_offset/seq_stop change
    done: bool = False
    in_worker: bool = False  # queued for the worker to run (I/O, then callback)

    @property
    def stopped(self) -> bool:
        failed = self.read_err or bool(self.write_err)
        return failed and not self.flags & KcopydFlag.IGNORE_ERROR

    def seq_blocked(self, offset: int) -> bool:
        """WRITE_SEQ: a slice before ``offset`` failed, so this one must not write."""
        return self.seq_stop is not None and offset > self.seq_stop

    def seq_advance(self, offset: int, next_offset: int | None) -> None:
        """WRITE_SEQ: the slice at ``offset`` is done; None means it failed."""
        if next_offset is None:
            self.seq_stop = offset if self.seq_stop is None else min(self.seq_stop, offset)
        else:
            self.seq_offset = next_offset
        if self.seq_changed is not None:
            self.seq_changed.set()
            self.seq_changed = None


class _SliceBuf:
    """A slice buffer with its read and write requests (reused together)."""

    __slots__ = ("nbytes", "read", "write")

    def __init__(self, nbytes: int) -> None:
        mem = BufferMem(bytearray(nbytes))
        self.nbytes = nbytes
        self.read = IoRequest(Op.READ, ReqFlag.NONE, mem)
        self.write = IoRequest(Op.WRITE, ReqFlag.NONE, mem)
