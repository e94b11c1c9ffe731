"""The region hash: per-region write state for mirror (dm-spec §5.6, dm-region-hash.c).

A region missing from the hash has the state its dirty log implies: CLEAN if
in sync, else NOSYNC.  An entry is created by :meth:`RegionHash.inc`,
:meth:`~RegionHash.mark_nosync`, recovery preparation or :meth:`~RegionHash.delay`,
and removed again by :meth:`~RegionHash.update_states` once it is clean or
recovered.  Each entry counts its writes in flight (``pending``) and sits on at
most one of the lists *clean*, *quiesced*, *recovered*, *failed_recovered*.

The ordering guarantees mirror relies on:

* **Dirty before data.**  ``inc`` of a CLEAN region clears its clean bit in the
  log; the caller then flushes the log (:meth:`RegionHash.flush`) before it
  issues the write to any leg.
* **Clean after data.**  A region returns to CLEAN only when its last write has
  completed (``dec``); its clean bit is set by a later ``update_states``, whose
  log flush first flushes every leg (disk log) before persisting the bit.  With
  a ``clean_delay`` (dmuser) that is the first pass after the region stayed
  clean that long; the kernel's (0) is the next pass.
* **One resync at a time** per slot (``max_recovery`` slots, 0 until
  :meth:`~RegionHash.start_recovery`), and a region is copied only once its
  writes in flight have drained (the *quiesced* list).  Writes arriving for a
  RECOVERING region are parked (``delay``) and handed back through
  ``dispatch_bios`` when its recovery ends.

All state changes happen between checkpoints (trio is single-threaded).  Only
``update_states``/``flush`` await (the log flush), and the mirror calls them
from its daemon task alone.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.errors import DmIOError
from dmuser.targets.mirror.log import DirtyLog


class RegionState(enum.IntEnum):
    CLEAN = 0x01
    DIRTY = 0x02
    NOSYNC = 0x04
    RECOVERING = 0x08


_LISTS = ("clean", "quiesced", "recovered", "failed_recovered")


@dataclass(eq=False)
class RhRegion:
    """One hash entry (``struct dm_region``)."""

    key: int
    state: RegionState
    pending: int = 0
    delayed_bios: list[Any] = field(default_factory=list)
    on_list: str | None = None
    clean_at: float = 0.0  # trio time it joined the clean list (with a clean delay)


def is_flush_or_discard(bio: Bio) -> bool:
    return bool(bio.flags & ReqFlag.PREFLUSH) or bio.op is Op.DISCARD


class RegionHash:
    """Region states of one mirror set.

    Args:
        log: the dirty log.
        target_begin: ``ti.begin``; bio sectors are relative to it.
        max_recovery: recovery slots (MAX_RECOVERY = 1 for mirror).
        dispatch_bios: gets the delayed bios of a region whose recovery ended.
        wakeup_workers: wakes the mirror daemon.
        wakeup_all_recovery_waiters: called when recovery_in_flight drops to 0.
    """

    def __init__(self, log: DirtyLog, target_begin: int, max_recovery: int,
                 dispatch_bios: Callable[[list[Any]], None],
                 wakeup_workers: Callable[[], None],
                 wakeup_all_recovery_waiters: Callable[[], None] | None = None,
                 clean_delay: float = 0.0) -> None:
        self.log = log
        #: dmuser: a region is retired from the clean list (its bit cleared in the
        #: log) only once it has stayed clean this many seconds; 0 is the
        #: kernel's behaviour (every pass retires the whole list).
        self.clean_delay = clean_delay
        self.region_size = log.get_region_size()
        self.region_shift = self.region_size.bit_length() - 1
        self.target_begin = target_begin
        self.max_recovery = max_recovery
        self._dispatch_bios = dispatch_bios
        self._wakeup_workers = wakeup_workers
        self._wakeup_recovery_waiters = wakeup_all_recovery_waiters or (lambda: None)
        self.regions: dict[int, RhRegion] = {}
        self.lists: dict[str, dict[int, RhRegion]] = {name: {} for name in _LISTS}
        self.flush_failure = False
        self.recovery_in_flight = 0
        self._recovery_idle = trio.Event()
        self._recovery_idle.set()
        self.recovery_count = trio.Semaphore(0)

    # -- addressing -------------------------------------------------------------------------

    def bio_to_region(self, bio: Bio) -> int:
        return (bio.sector - self.target_begin) >> self.region_shift

    def region_to_sector(self, region: int) -> int:
        """Target-relative first sector of ``region``."""
        return region << self.region_shift

    # -- lists ------------------------------------------------------------------------------

    def _move(self, reg: RhRegion, name: str | None) -> None:
        """Take ``reg`` off its list and append it to list ``name`` (None: no list).

        The kernel adds to some lists at the head; with one recovery slot the
        order of every list is irrelevant to the outcome.
        """
        if reg.on_list is not None:
            del self.lists[reg.on_list][reg.key]
        reg.on_list = name
        if name is not None:
            self.lists[name][reg.key] = reg

    def _find(self, region: int) -> RhRegion:
        """``__rh_find``: the entry, created with the log-implied state if missing."""
        reg = self.regions.get(region)
        if reg is None:
            state = RegionState.CLEAN if self.log.in_sync(region) else RegionState.NOSYNC
            reg = self.regions[region] = RhRegion(region, state)
            if state is RegionState.CLEAN:
                self._move(reg, "clean")
        return reg

    def get_state(self, region: int) -> RegionState:
        """The entry's state, or the log-implied one; never creates an entry."""
        reg = self.regions.get(region)
        if reg is not None:
            return reg.state
        return RegionState.CLEAN if self.log.in_sync(region) else RegionState.NOSYNC

    # -- writes -----------------------------------------------------------------------------

    def inc(self, region: int) -> None:
        reg = self._find(region)
        reg.pending += 1
        if reg.state is RegionState.CLEAN:
            reg.state = RegionState.DIRTY
            self._move(reg, None)
            self.log.mark_region(region)

    def dec(self, region: int) -> None:
        reg = self.regions[region]
        reg.pending -= 1
        if reg.pending:
            return
        if self.flush_failure:
            # A flush failed some time ago: this write may not be durable anywhere.
            reg.state = RegionState.NOSYNC
        elif reg.state is RegionState.RECOVERING:
            self._move(reg, "quiesced")
        elif reg.state is RegionState.DIRTY:
            reg.state = RegionState.CLEAN
            armed = bool(self.lists["clean"])
            self._move(reg, "clean")
            if self.clean_delay:
                reg.clean_at = trio.current_time()
                if armed:
                    return  # the daemon already waits for the oldest one's deadline
        self._wakeup_workers()

    def mark_nosync(self, bio: Bio) -> None:
        """A write failed on some leg: the region is out of sync until resynced."""
        if bio.flags & ReqFlag.PREFLUSH:
            self.flush_failure = True
            return
        if bio.op is Op.DISCARD:
            return
        region = self.bio_to_region(bio)
        self.log.set_region_sync(region, False)
        reg = self._find(region)
        recovering = reg.state is RegionState.RECOVERING
        reg.state = RegionState.NOSYNC
        if recovering:
            self._complete_resync_work(reg, False)

    def delay(self, bio: Any, region: int) -> None:
        """Park a write to a RECOVERING region until its recovery ends."""
        self._find(region).delayed_bios.append(bio)

    async def flush(self) -> None:
        """``dm_rh_flush``: the log's flush.  Raises DmIOError on failure."""
        await self.log.flush()

    def clean_deadline(self) -> float:
        """When the oldest region of the clean list is due (trio time); inf if none.

        The clean list is in the order regions became clean (``_move`` appends),
        so its first region is the oldest."""
        clean = self.lists["clean"]
        if not clean:
            return math.inf
        return next(iter(clean.values())).clean_at + self.clean_delay

    async def update_states(self, errors_handled: bool, retire_all: bool = True) -> None:
        """Retire clean and recovered regions, then flush the log (errors ignored).

        dmuser's delayed cleaning: unless ``retire_all``, only the regions that
        have been clean for :attr:`clean_delay` seconds are retired; the others
        keep their dirty mark in the log (which only costs resync work after a
        crash), and a write to one of them makes it DIRTY again with no log I/O.
        """
        taken: dict[str, list[RhRegion]] = {}
        for name in ("clean", "recovered", "failed_recovered"):
            regs = list(self.lists[name].values())
            if name == "clean" and not retire_all and self.clean_delay:
                due = trio.current_time() - self.clean_delay
                regs = [reg for reg in regs if reg.clean_at <= due]
            taken[name] = regs
            for reg in regs:
                del self.lists[name][reg.key]
                reg.on_list = None
                del self.regions[reg.key]
        for reg in taken["recovered"]:
            self.log.clear_region(reg.key)
            self._complete_resync_work(reg, True)
        for reg in taken["failed_recovered"]:
            self._complete_resync_work(reg, not errors_handled)
        for reg in taken["clean"]:
            self.log.clear_region(reg.key)
        with contextlib.suppress(DmIOError):  # the kernel ignores this flush's result
            await self.log.flush()

    # -- recovery ---------------------------------------------------------------------------

    def _complete_resync_work(self, reg: RhRegion, success: bool) -> None:
        self.log.set_region_sync(reg.key, success)
        delayed, reg.delayed_bios = reg.delayed_bios, []
        self._dispatch_bios(delayed)
        self._recovery_dec()
        self.recovery_count.release()

    def _recovery_dec(self) -> None:
        self.recovery_in_flight -= 1
        if self.recovery_in_flight == 0:
            self._recovery_idle.set()
            self._wakeup_recovery_waiters()

    def _recovery_inc(self) -> None:
        if self.recovery_in_flight == 0:
            self._recovery_idle = trio.Event()
        self.recovery_in_flight += 1

    def _prepare_one(self) -> bool:
        region = self.log.get_resync_work()
        if region is None:
            return False
        reg = self._find(region)
        reg.state = RegionState.RECOVERING
        if reg.pending:
            self._move(reg, None)
        else:
            self._move(reg, "quiesced")
        return True

    def recovery_prepare(self) -> None:
        """While a slot is free, take resync work from the log and start quiescing it."""
        self._recovery_inc()  # extra reference, as the kernel takes
        while True:
            try:
                self.recovery_count.acquire_nowait()
            except trio.WouldBlock:
                break
            self._recovery_inc()
            if not self._prepare_one():
                self._recovery_dec()
                self.recovery_count.release()
                break
        self._recovery_dec()

    def recovery_start(self) -> RhRegion | None:
        """Pop a quiesced region, ready to be copied."""
        quiesced = self.lists["quiesced"]
        if not quiesced:
            return None
        reg = next(iter(quiesced.values()))
        self._move(reg, None)
        return reg

    def recovery_end(self, reg: RhRegion, success: bool) -> None:
        self._move(reg, "recovered" if success else "failed_recovered")
        self._wakeup_workers()

    def start_recovery(self) -> None:
        """Release the recovery slots (resume) and wake the daemon."""
        for _ in range(self.max_recovery):
            self.recovery_count.release()
        self._wakeup_workers()

    async def stop_recovery(self) -> None:
        """Take every slot back (presuspend): waits for the regions being recovered."""
        for _ in range(self.max_recovery):
            await self.recovery_count.acquire()

    def abort_recovery(self) -> None:
        """The mirror stopped for good: give back the slots of unfinished recoveries."""
        for _ in range(self.recovery_in_flight):
            self.recovery_count.release()
        self.recovery_in_flight = 0
        self._recovery_idle.set()
        self._wakeup_recovery_waiters()

    async def wait_recovery_stopped(self) -> None:
        """Wait until ``recovery_in_flight`` is 0."""
        while self.recovery_in_flight:
            await self._recovery_idle.wait()
        await trio.lowlevel.checkpoint()
