"""Fake block devices for in-process tests: one family, each class adding to the one before.

:class:`MemDevice`
    The device in memory: content (zeros, a :func:`~support.data.pattern` seed or
    a fill byte), capabilities (``discard``/``write_zeroes``), injected failures
    (``fail_sectors``, ``fail_all``, ``fail_read``, ``fail_write``, ``fail_flush``)
    and counters of the bios it completed (``reads``, ``writes``, ``flushes``).
:class:`DelayedDevice`
    + time: every bio first sleeps ``delay`` seconds (a number, or a function of
    the bio), plus a random share of ``jitter`` seconds, and yields ``turns(bio)``
    scheduler turns.
:class:`GatedDevice`
    + gates (``trio.Event``\\ s) that hold bios until set: ``gate`` (every bio),
    ``write_gate`` (data writes), ``read_gates`` (the next read of a sector) and
    ``flush_gate`` (the next empty flush).
:class:`RecordingDevice`
    + records: ``bios`` (as submitted), ``done`` (completed), a ``journal`` of
    :class:`Entry` that several devices may share (the order across devices), and
    a :class:`Gauge` of what is in flight, also shareable.

A bio passes the layers outside in: recorded and counted in flight, then the
gates, then the delay, then :class:`MemDevice` (failure, else the data).

:class:`RecordingFileDevice` is the one member not built on :class:`MemDevice`:
a real file (``FileDevice``, whose large and flagged bios run in worker threads)
that journals into the same :class:`Entry` lists and can fail its writes.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import trio

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.blockdev import BlockDevice, FileDevice
from dmuser.core.errors import DmIOError, NotSupportedError
from dmuser.core.units import SECTOR_SHIFT

from .data import pattern


class MemDevice(BlockDevice):
    """A device held in ``buf``.

    ``seed`` fills it with ``pattern(seed, size)``, ``fill`` with one byte value;
    ``discard``/``write_zeroes`` false make it refuse those operations (as a device
    without the capability: dm-io and kcopyd must not send them).

    Failures (attributes, set them any time): a bio fails with ``DmIOError`` when
    ``fail_all`` is set, when it touches a sector in ``fail_sectors``, when it
    carries PREFLUSH and ``fail_flush`` is set, or when it has sectors and
    ``fail_write``/``fail_read`` is set for its direction.  A failed read's buffer
    is zero-filled, unless ``zero_failed_reads`` is false (a sloppy device: then
    the caller must do it).
    """

    def __init__(self, nr_sectors: int, name: str = "mem", *, seed: int | str | None = None,
                 fill: int | None = None, discard: bool = True,
                 write_zeroes: bool = True) -> None:
        nbytes = nr_sectors << SECTOR_SHIFT
        if seed is not None:
            self.buf = bytearray(pattern(seed, nbytes))
        else:
            self.buf = bytearray(bytes([fill]) * nbytes if fill is not None else nbytes)
        self.status_name = name
        self.supports_discard = discard  # type: ignore[misc]
        self.supports_write_zeroes = write_zeroes  # type: ignore[misc]
        self.fail_sectors: set[int] = set()
        self.fail_all = False
        self.fail_read = self.fail_write = self.fail_flush = False
        self.zero_failed_reads = True
        #: bios completed: reads, writes with sectors (discards included), PREFLUSH bios
        self.reads = self.writes = self.flushes = 0

    @property
    def nr_sectors(self) -> int:
        return len(self.buf) >> SECTOR_SHIFT

    def fails(self, bio: Bio) -> bool:
        """Whether the injected failures make ``bio`` fail."""
        if self.fail_all or (self.fail_flush and bio.flags & ReqFlag.PREFLUSH):
            return True
        if bio.nr_sectors and (self.fail_write if bio.is_write else self.fail_read):
            return True
        return any(s in self.fail_sectors for s in range(bio.sector, bio.end_sector))

    async def submit(self, bio: Bio) -> None:
        await trio.lowlevel.checkpoint()
        if bio.end_sector > self.nr_sectors:
            raise DmIOError(f"{self.status_name}: access beyond end of device")
        if self.fails(bio):
            if bio.op is Op.READ and bio.data is not None and self.zero_failed_reads:
                bio.data[:] = bytes(len(bio.data))
            raise DmIOError(f"{self.status_name}: injected I/O error at sector {bio.sector}")
        start, end = bio.sector << SECTOR_SHIFT, bio.end_sector << SECTOR_SHIFT
        if bio.flags & ReqFlag.PREFLUSH:
            self.flushes += 1
        if bio.op is Op.READ:
            assert bio.data is not None
            bio.data[:] = self.buf[start:end]
            self.reads += 1
        elif bio.op is Op.WRITE:
            if bio.data is not None:
                self.buf[start:end] = bio.data
        elif bio.op in (Op.DISCARD, Op.WRITE_ZEROES):
            self.buf[start:end] = bytes(end - start)
        elif bio.op is not Op.FLUSH:
            raise NotSupportedError(f"{self.status_name}: operation {bio.op.name} not supported")
        if bio.is_write and bio.nr_sectors:
            self.writes += 1


class DelayedDevice(MemDevice):
    """A :class:`MemDevice` whose bios take time.

    Each bio sleeps ``delay`` seconds (or ``delay(bio)``) plus ``rng.random() *
    jitter``, then yields ``turns(bio)`` scheduler turns (the in-memory device
    otherwise completes every bio one turn after it starts, and races never
    happen).  ``rng`` defaults to ``random.Random(nr_sectors)``.
    """

    def __init__(self, nr_sectors: int, name: str = "delayed", *,
                 delay: float | Callable[[Bio], float] = 0, jitter: float = 0,
                 turns: Callable[[Bio], int] | None = None, rng: random.Random | None = None,
                 **mem: object) -> None:
        super().__init__(nr_sectors, name, **mem)  # type: ignore[arg-type]
        self.delay = delay
        self.jitter = jitter
        self.turns = turns
        self.rng = rng or random.Random(nr_sectors)

    async def submit(self, bio: Bio) -> None:
        if callable(self.delay) or self.delay or self.jitter:
            seconds = self.delay(bio) if callable(self.delay) else self.delay
            await trio.sleep(seconds + (self.rng.random() * self.jitter if self.jitter else 0))
        if self.turns is not None:
            for _ in range(self.turns(bio)):
                await trio.lowlevel.checkpoint()
        await super().submit(bio)


class GatedDevice(DelayedDevice):
    """A :class:`DelayedDevice` whose bios wait at gates (``trio.Event``; None = open).

    ``gate`` holds every bio (``closed=True`` creates it unset); ``write_gate``
    holds writes with data; ``read_gates[sector]`` holds the next read touching
    ``sector`` (one-shot); ``flush_gate`` holds the next empty flush (one-shot).
    """

    def __init__(self, nr_sectors: int, name: str = "gated", *, closed: bool = False,
                 **options: object) -> None:
        super().__init__(nr_sectors, name, **options)  # type: ignore[arg-type]
        self.gate: trio.Event | None = trio.Event() if closed else None
        self.write_gate: trio.Event | None = None
        self.read_gates: dict[int, trio.Event] = {}
        self.flush_gate: trio.Event | None = None

    async def submit(self, bio: Bio) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.write_gate is not None and bio.is_write and bio.nr_sectors:
            await self.write_gate.wait()
        if bio.op is Op.READ:
            for sector in range(bio.sector, bio.end_sector):
                gate = self.read_gates.pop(sector, None)
                if gate is not None:
                    await gate.wait()
        if bio.is_empty_flush and self.flush_gate is not None:
            gate, self.flush_gate = self.flush_gate, None
            await gate.wait()
        await super().submit(bio)


class Entry(NamedTuple):
    """One bio as a device saw it (a journal line)."""

    dev: str
    op: Op
    sector: int
    nr_sectors: int
    flags: ReqFlag
    #: submitted from a worker thread (RecordingFileDevice only)
    thread: bool = False

    @property
    def kind(self) -> str:
        """``flush`` for an empty flush, else the operation in lower case (``write``...)."""
        return "flush" if self.nr_sectors == 0 and self.flags & ReqFlag.PREFLUSH \
            else self.op.name.lower()


class Gauge:
    """What is in flight on the devices sharing it (bios, bytes, writes), and the maxima."""

    def __init__(self) -> None:
        self.active = self.max_active = 0
        self.bytes = self.max_bytes = 0
        self.writes = self.max_writes = 0

    @contextmanager
    def track(self, bio: Bio) -> Iterator[None]:
        nbytes, is_write = bio.nr_sectors << SECTOR_SHIFT, bio.op is not Op.READ
        self.active += 1
        self.bytes += nbytes
        self.writes += is_write
        self.max_active = max(self.max_active, self.active)
        self.max_bytes = max(self.max_bytes, self.bytes)
        self.max_writes = max(self.max_writes, self.writes)
        try:
            yield
        finally:
            self.active -= 1
            self.bytes -= nbytes
            self.writes -= is_write


class RecordingDevice(GatedDevice):
    """A :class:`GatedDevice` that records what it is asked to do.

    ``bios``: every bio, as submitted (before gates, delays and failures);
    ``done``: the bios completed without error, in completion order;
    ``journal``: one :class:`Entry` per bio as submitted, on a list several
    devices may share; ``gauge``: counts the bio in flight from submission to
    completion, also shareable.
    """

    def __init__(self, nr_sectors: int, name: str = "rec", *, journal: list[Entry] | None = None,
                 gauge: Gauge | None = None, **options: object) -> None:
        super().__init__(nr_sectors, name, **options)  # type: ignore[arg-type]
        self.bios: list[Bio] = []
        self.done: list[Bio] = []
        self.journal: list[Entry] = journal if journal is not None else []
        self.gauge = gauge or Gauge()

    async def submit(self, bio: Bio) -> None:
        self.bios.append(bio)
        self.journal.append(Entry(self.status_name, bio.op, bio.sector, bio.nr_sectors,
                                  bio.flags))
        with self.gauge.track(bio):
            await super().submit(bio)
        self.done.append(bio)


class RecordingFileDevice(FileDevice):
    """A real file that journals every bio (from whichever thread submits it) into a
    list of :class:`Entry` and fails its writes while ``fail_write`` is set."""

    def __init__(self, path: str, name: str, journal: list[Entry]) -> None:
        super().__init__(path)
        self.status_name = name
        self.journal = journal
        self.lock = threading.Lock()
        self.fail_write = False

    def _note(self, bio: Bio) -> None:
        thread = threading.current_thread() is not threading.main_thread()
        with self.lock:
            self.journal.append(Entry(self.status_name, bio.op, bio.sector, bio.nr_sectors,
                                      bio.flags, thread))
        if bio.nr_sectors and bio.is_write and self.fail_write:
            raise OSError(5, "injected write error")

    def _submit_blocking(self, bio: Bio) -> None:
        self._note(bio)
        super()._submit_blocking(bio)

    def pwrite_inline(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        self._note(Bio.write(sector, data))
        super().pwrite_inline(sector, data)

    async def submit(self, bio: Bio) -> None:
        if bio.flags or bio.nr_sectors << SECTOR_SHIFT > 1 << 20:
            self._note(bio)  # _submit: noted here, its syscalls follow
            try:
                await self._submit(bio)
            except OSError as exc:
                raise self._failed(bio, exc) from exc
            return
        try:
            self._note(bio)
        except OSError as exc:
            raise self._failed(bio, exc) from exc
        await super().submit(bio)
