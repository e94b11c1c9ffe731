"""The mirror set: the mirror daemon, reads, writes, failures, suspend (dm-spec §5.7-§5.12).

This is the engine behind ``targets/mirror.py`` (dm-raid1.c's ``struct mirror_set``
and ``kmirrord``).  See ``docs/mirror-protocol.md`` for the full protocol.

Guarantees:

* **Writes** (including empty flushes and discards) go through the daemon.  A
  write to a CLEAN/DIRTY region is issued only after the region's dirty mark
  is durable in the log (inc + log flush), as one dm-io request to every leg;
  it succeeds when every leg took it.  Writes to an out-of-sync region go to
  the default leg only; writes to the region being resynced wait until its
  copy is over.  A region becomes clean in the log only after its last write
  completed and every leg was flushed (disk log).
* **Reads** go to the default leg, skipping legs with errors; a failed read
  is retried on another leg while one is in sync.  With read balancing on
  (dmuser extension, ``LegSet.read_balance``, off by default) reads of a
  region in sync take turns over the legs without errors instead.
* **Resync** (``mirror_resync.py``) runs only between resume and presuspend.
* **Leg failure** (``mirror_legs.py``): with ``handle_errors`` failed writes
  are held until suspend (EIO then, or requeued to run again after resume when
  the suspend is ``--noflush``); without it they complete successfully and
  the region is resynced after the next resume.  With no leg left, I/O fails
  with EIO.

Concurrency: trio is single-threaded.  Every mutation of the region hash and
the dirty log happens between checkpoints; the daemon pass, ``resume`` and
``postsuspend`` additionally hold ``_pass_lock`` around their log I/O so log
buffers are never changed under a write.  Completion callbacks (dm-io,
kcopyd) only change counters and lists and wake the daemon.

The service (daemon, dm-io and kcopyd clients) runs in the caller's nursery
(:meth:`MirrorSet.run`); :meth:`MirrorSet.stop` ends it and fails what is left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import trio

from dmuser.bio import Bio, Op, ReqFlag
from dmuser.dm_io import BufferMem, DmIoClient, IoRequest, Region, dm_io
from dmuser.errors import DmIOError, NotSupportedError, RequeueError
from dmuser.kcopyd import KcopydClient, KcopydThrottle
from dmuser.target import TargetContext

from .dirtylog import DirtyLog
from .mirror_legs import ErrorType, Leg, LegSet
from .mirror_resync import Resync
from .region_hash import RegionHash, RegionState, is_flush_or_discard

log = logging.getLogger(__name__)

MAX_RECOVERY = 1
#: dm-raid1's ``raid1_resync_throttle`` module parameter, shared by every mirror (percent).
RESYNC_THROTTLE = KcopydThrottle(100)


class MirrorIo:
    """A bio inside the mirror: its region, and the event its submitter waits on."""

    __slots__ = ("bio", "region", "done", "error", "counted")

    def __init__(self, bio: Bio, region: int) -> None:
        self.bio = bio
        self.region = region
        self.done = trio.Event()
        self.error: DmIOError | None = None
        self.counted = False  # inc'd in the region hash; dec'd on completion


class MirrorSet:
    def __init__(self, ti: TargetContext, dirty_log: DirtyLog, legs: Sequence[Leg],
                 handle_errors: bool, keep_log: bool, table_event: Callable[[], None]) -> None:
        self.ti = ti
        self.log = dirty_log
        self.legs = LegSet(legs, ti.begin, handle_errors, keep_log, table_event)
        self._table_event = table_event
        self.region_size = dirty_log.get_region_size()
        self.nr_regions = -(-ti.len // self.region_size)
        self.rh = RegionHash(dirty_log, ti.begin, MAX_RECOVERY, self._dispatch_bios, self.wakeup)
        self.resync = Resync(self.rh, dirty_log, self.legs, ti.len, table_event)
        self.log_failure = self.suspend = False
        self.reads: list[MirrorIo] = []  # the daemon's queues: changed between checkpoints
        self.writes: list[MirrorIo] = []
        self.failures: list[MirrorIo] = []
        self.holds: list[MirrorIo] = []
        self._ios: set[MirrorIo] = set()  # every bio inside the daemon's machinery
        self._wake = trio.Event()
        self._wake_seq = self._done_seq = 0
        self._pass_done = trio.Event()
        self._pass_lock = trio.Lock()
        self._io: DmIoClient | None = None
        self._kc: KcopydClient | None = None
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self.crash_error: Exception | None = None

    # -- service life cycle -------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The service task (start with ``nursery.start``): clients and the daemon loop.

        A bug does not escape into the shared nursery: it is logged and kept in
        :attr:`crash_error`, and the mirror's I/O fails with EIO from then on."""
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                async with DmIoClient() as io, KcopydClient(throttle=RESYNC_THROTTLE) as kc, \
                        trio.open_nursery() as nursery:
                    self._io, self._kc, self._nursery = io, kc, nursery
                    self.wakeup()  # the constructor kicks the daemon once
                    task_status.started()
                    await self._daemon()
        except Exception as exc:
            self.crash_error = exc
            log.exception("%s: mirror daemon failed; its I/O fails from now on", self.ti.md_name)
        finally:
            self._io = self._kc = self._nursery = None
            self._abort_all()
            self.rh.abort_recovery()  # a suspend waiting for a copy must not hang
            self._stopped.set()
            self._pass_done.set()

    async def stop(self) -> None:
        """End the service (after suspend nothing is in flight); queued bios fail with EIO."""
        if self._scope is None:
            return
        self._scope.cancel()
        await self._stopped.wait()

    @property
    def running(self) -> bool:
        return self._nursery is not None

    def _abort_all(self) -> None:
        """Fail every bio not yet completed (queued, held, delayed or in flight)."""
        for reg in self.rh.regions.values():
            reg.delayed_bios = []
        self.reads, self.writes, self.failures, self.holds = [], [], [], []
        for io in list(self._ios):
            io.counted = False
            self._complete(io, DmIOError("mirror: device closed"))

    # -- the daemon -----------------------------------------------------------------------------

    def wakeup(self) -> None:
        self._wake_seq += 1
        self._wake.set()

    async def _daemon(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            seq = self._wake_seq
            async with self._pass_lock:
                await self._do_mirror()
            self._done_seq = seq
            self._pass_done.set()
            self._pass_done = trio.Event()

    async def flush_daemon(self) -> None:
        """Wait until every wakeup made before this call has been served (flush_workqueue)."""
        target = self._wake_seq
        while self.running and self._done_seq < target:
            await self._pass_done.wait()
        await trio.lowlevel.checkpoint()

    async def _do_mirror(self) -> None:
        reads, writes, failures = self.reads, self.writes, self.failures
        self.reads, self.writes, self.failures = [], [], []
        await self.rh.update_states(self.legs.handle_errors)
        assert self._kc is not None
        self.resync.do_recovery(self._kc)
        await self._do_reads(reads)
        await self._do_writes(writes)
        self._do_failures(failures)

    def _queue(self, queue: list[MirrorIo], io: MirrorIo) -> None:
        queue.append(io)
        self.wakeup()

    def _dispatch_bios(self, delayed: list[Any]) -> None:
        for io in delayed:
            self._queue(self.writes, io)

    def _complete(self, io: MirrorIo, error: DmIOError | None) -> None:
        """End a bio (bio_endio + mirror_end_io): dec its region, wake its submitter."""
        if io.done.is_set():
            return
        self._ios.discard(io)
        if io.counted:
            io.counted = False
            self.rh.dec(io.region)
        io.error = error
        io.done.set()

    def _mirror_available(self, region: int) -> bool:
        return self.log.in_sync(region) and self.legs.choose() is not None

    # -- map ------------------------------------------------------------------------------------

    async def map(self, bio: Bio) -> None:
        """Run one bio through the mirror; returns when it completed, raises on failure."""
        if not self.running:
            raise DmIOError("mirror: not running")
        region = self.rh.bio_to_region(bio)
        if bio.is_write:
            await self._wait(self.writes, MirrorIo(bio, region))
            return
        if not self.log.in_sync(region):
            if bio.flags & ReqFlag.RAHEAD:
                raise DmIOError("mirror: read-ahead of an out-of-sync region")
            await self._wait(self.reads, MirrorIo(bio, region))
            return
        leg = self.legs.choose_read()
        if leg is None:
            raise DmIOError("mirror: no leg left")
        try:
            await leg.dev.submit(Bio(bio.op, self.legs.sector(leg, bio), bio.nr_sectors,
                                     bio.data, bio.flags))
        except NotSupportedError:
            raise
        except DmIOError:
            if bio.flags & ReqFlag.RAHEAD:
                raise
            log.error("Mirror read failed from %s. Trying alternative device.",
                      leg.dev.status_name)
            self.legs.fail(leg, ErrorType.READ)
            if not self.legs.default.error_count or self._mirror_available(region):
                await self._wait(self.reads, MirrorIo(bio, region))
                return
            log.error("All replicated volumes dead, failing I/O")
            raise

    async def _wait(self, queue: list[MirrorIo], io: MirrorIo) -> None:
        self._ios.add(io)
        self._queue(queue, io)
        await io.done.wait()
        if io.error is not None:
            raise io.error

    # -- reads ----------------------------------------------------------------------------------

    async def _do_reads(self, reads: list[MirrorIo]) -> None:
        assert self._io is not None
        for io in reads:
            leg: Leg | None = self.legs.default
            if self.rh.get_state(io.region) in (RegionState.CLEAN, RegionState.DIRTY):
                leg = self.legs.choose_read() if self.log.in_sync(io.region) else \
                    self.legs.choose()
            elif leg is not None and leg.error_count:
                leg = None
            if leg is None:
                self._complete(io, DmIOError("mirror: no leg to read from"))
                continue
            bio = io.bio
            assert bio.data is not None
            req = IoRequest(Op.READ, ReqFlag.NONE, BufferMem(bio.data), self._read_done, (io, leg))
            where = Region(leg.dev, self.legs.sector(leg, bio), bio.nr_sectors)
            await dm_io(self._io, req, [where])

    def _read_done(self, error_bits: int, context: tuple[MirrorIo, Leg]) -> None:
        io, leg = context
        if not error_bits:
            self._complete(io, None)
            return
        self.legs.fail(leg, ErrorType.READ)
        if not self.legs.default.error_count or self._mirror_available(io.region):
            log.warning("Read failure on mirror device %s. Trying alternative device.",
                        leg.dev.status_name)
            self._queue(self.reads, io)
            return
        log.error("Read failure on mirror device %s.  Failing I/O.", leg.dev.status_name)
        self._complete(io, DmIOError("mirror: read failed on every leg"))

    # -- writes ---------------------------------------------------------------------------------

    async def _do_writes(self, writes: list[MirrorIo]) -> None:
        if not writes:
            return
        lists: dict[str, list[MirrorIo]] = {"sync": [], "nosync": [], "recover": []}
        for io in writes:
            if is_flush_or_discard(io.bio):
                lists["sync"].append(io)
                continue
            state = self.rh.get_state(io.region)
            if state in (RegionState.CLEAN, RegionState.DIRTY):
                lists["sync"].append(io)
            elif state is RegionState.NOSYNC:
                lists["nosync"].append(io)
            else:
                lists["recover"].append(io)
        for io in lists["sync"] + lists["nosync"]:
            if not is_flush_or_discard(io.bio):
                self.rh.inc(io.region)
                io.counted = True
        try:
            await self.rh.flush()  # the dirty marks are durable before any leg write
        except DmIOError:
            self.log_failure = True  # stays set until reload
        if self.log_failure and self.legs.handle_errors:
            self.failures += lists["sync"]
            if lists["sync"]:
                self.wakeup()
        else:
            for io in lists["sync"]:
                await self._do_write(io)
        for io in lists["recover"]:
            self.rh.delay(io, io.region)
        for io in lists["nosync"]:
            if self.legs.leg_failure and self.legs.handle_errors and not self.legs.keep_log:
                self._queue(self.failures, io)
            else:
                assert self._nursery is not None
                self._nursery.start_soon(self._write_default, io, self.legs.default)

    async def _do_write(self, io: MirrorIo) -> None:
        """One dm-io request writing the bio to every leg; completion in :meth:`_write_done`."""
        assert self._io is not None
        bio = io.bio
        flags = bio.flags & (ReqFlag.FUA | ReqFlag.PREFLUSH)
        if bio.op is Op.DISCARD:
            req = IoRequest(Op.DISCARD, flags, None, self._write_done, io)
        else:
            mem = BufferMem(bio.data) if bio.data is not None and bio.nr_sectors else None
            req = IoRequest(Op.WRITE, flags, mem, self._write_done, io)
        regions = [Region(leg.dev, self.legs.sector(leg, bio), bio.nr_sectors) for leg in self.legs]
        await dm_io(self._io, req, regions)

    def _write_done(self, error_bits: int, io: MirrorIo) -> None:
        if not error_bits:
            self._complete(io, None)
            return
        if io.bio.op is Op.DISCARD:
            self._complete(io, NotSupportedError("mirror: discard failed"))
            return
        for leg in self.legs:
            if error_bits >> leg.index & 1:
                self.legs.fail(leg, ErrorType.WRITE)
        self._queue(self.failures, io)

    async def _write_default(self, io: MirrorIo, leg: Leg) -> None:
        """A write to an out-of-sync region: the default leg only, errors returned as they are."""
        bio = io.bio
        error: DmIOError | None = None
        try:
            await leg.dev.submit(Bio(bio.op, self.legs.sector(leg, bio), bio.nr_sectors,
                                     bio.data, bio.flags))
        except DmIOError as exc:
            error = exc
        self._complete(io, error)

    def _do_failures(self, failures: list[MirrorIo]) -> None:
        for io in failures:
            if not self.log_failure:
                self.legs.in_sync = False
                self.rh.mark_nosync(io.bio)
            if self.legs.valid() is None or (self.legs.keep_log and self.log_failure):
                self._complete(io, DmIOError("mirror: write failed"))
            elif self.legs.handle_errors and not self.legs.keep_log:
                self._hold(io)
            else:
                self._complete(io, None)  # reached a leg; the region will be resynced

    def _hold(self, io: MirrorIo) -> None:
        if self.suspend:
            noflush = self.ti.noflush_suspending is not None and self.ti.noflush_suspending()
            self._complete(io, RequeueError("mirror: held write requeued") if noflush
                           else DmIOError("mirror: held write failed at suspend"))
        else:
            self.holds.append(io)

    # -- suspend / resume -----------------------------------------------------------------------

    async def presuspend(self) -> None:
        self.suspend = True
        holds, self.holds = self.holds, []
        for io in holds:
            self._hold(io)
        await self.rh.stop_recovery()
        await self.rh.wait_recovery_stopped()
        try:
            await self.log.presuspend()
        except DmIOError:
            log.warning("log presuspend failed")
        await self.flush_daemon()

    async def postsuspend(self) -> None:
        async with self._pass_lock:
            try:
                await self.log.postsuspend()
            except DmIOError:
                log.warning("log postsuspend failed")

    async def resume(self) -> None:
        self.suspend = False
        async with self._pass_lock:
            try:
                await self.log.resume()
            except DmIOError:
                log.warning("log resume failed")
        self.rh.start_recovery()
