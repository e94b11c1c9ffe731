"""The mirror set: the mirror daemon, reads, writes, failures, suspend (dm-spec §5.7-§5.12).

This is the engine behind ``target.py`` (dm-raid1.c's ``struct mirror_set``
and ``kmirrord``).  See ``docs/mirror-protocol.md`` for the full protocol.

Guarantees:

* **Writes** (``writes.py``): a write to a CLEAN/DIRTY region reaches
  the legs only after the region's dirty mark is durable in the log, as one
  dm-io request to every leg; it succeeds when every leg took it.  Flushes,
  discards and writes that need a new mark go through the daemon; a write to
  a region whose mark is already durable goes straight from the submitter
  (dmuser).  Writes to an out-of-sync region go to the default leg only;
  writes to the region being resynced wait until its copy is over.
* **Clean after data.**  A region becomes clean in the log only after its
  last write completed and every leg was flushed (disk log).  dmuser delays
  this by ``Config.mirror_clean_delay`` seconds without writes (0: the kernel's next
  pass), and always does it by postsuspend, so a suspended mirror's log is
  clean.
* **Reads** go to the default leg, skipping legs with errors; a failed read
  is retried on another leg while one is in sync.  With read balancing on
  (dmuser extension, ``LegSet.read_balance``, off by default) reads of a
  region in sync take turns over the legs without errors instead.
* **Resync** (``resync.py``) runs only between resume and presuspend.
* **Leg failure** (``legs.py``): with ``handle_errors`` failed writes
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

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.errors import DmIOError, NotSupportedError
from dmuser.core.target import TargetContext
from dmuser.services.dm_io import BufferMem, DmIoClient, IoRequest, Region, dm_io
from dmuser.services.kcopyd import KcopydClient, KcopydThrottle
from dmuser.targets.mirror.inflight import InFlight, MirrorIo
from dmuser.targets.mirror.legs import ErrorType, Leg, LegSet
from dmuser.targets.mirror.log import DirtyLog
from dmuser.targets.mirror.region_hash import RegionHash, RegionState
from dmuser.targets.mirror.resync import Resync
from dmuser.targets.mirror.writes import WritePath

log = logging.getLogger(__name__)

MAX_RECOVERY = 1


def resync_throttle(ti: TargetContext) -> KcopydThrottle:
    """dm-raid1's ``raid1_resync_throttle``: one throttle shared by every mirror of
    the daemon (``ti.shared``), at ``Config.resync_throttle`` percent."""
    throttle = ti.shared.get("mirror.resync_throttle")
    if not isinstance(throttle, KcopydThrottle):
        throttle = ti.shared["mirror.resync_throttle"] = KcopydThrottle(ti.config.resync_throttle)
    return throttle


class MirrorSet:
    def __init__(self, ti: TargetContext, dirty_log: DirtyLog, legs: Sequence[Leg],
                 handle_errors: bool, keep_log: bool, table_event: Callable[[], None]) -> None:
        self.ti = ti
        self.log = dirty_log
        self.legs = LegSet(legs, ti.begin, handle_errors, keep_log, table_event)
        self._table_event = table_event
        self.region_size = dirty_log.get_region_size()
        self.nr_regions = -(-ti.len // self.region_size)
        # dmuser: a region whose writes have all completed keeps its dirty mark
        # until it has had no write for Config.mirror_clean_delay seconds (like
        # md's bitmap daemon, which clears bits lazily).  A region written again
        # meanwhile needs no new mark and no daemon pass, and cleans come in
        # batches (one leg flush + log write each with a disk log).  0 gives the
        # kernel's behaviour (cleared at the next pass).
        self.rh = RegionHash(dirty_log, ti.begin, MAX_RECOVERY, self._dispatch_bios, self.wakeup,
                             clean_delay=ti.config.mirror_clean_delay)
        self.resync = Resync(self.rh, dirty_log, self.legs, ti.len, table_event)
        self.inflight = InFlight(self.rh.dec, self.wakeup)
        self.writer = WritePath(ti, dirty_log, self.legs, self.rh, self.inflight)
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
                async with DmIoClient() as io, \
                        KcopydClient(throttle=resync_throttle(self.ti)) as kc, \
                        trio.open_nursery() as nursery:
                    self._io, self._kc, self._nursery = io, kc, nursery
                    self.writer.attach(io, nursery)
                    self.wakeup()  # the constructor kicks the daemon once
                    task_status.started()
                    await self._daemon()
        except Exception as exc:
            self.crash_error = exc
            log.exception("%s: mirror daemon failed; its I/O fails from now on", self.ti.md_name)
        finally:
            self._io = self._kc = self._nursery = None
            self.writer.detach()
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
        self.inflight.abort_all()

    # -- the daemon -----------------------------------------------------------------------------

    def wakeup(self) -> None:
        self._wake_seq += 1
        self._wake.set()

    async def _daemon(self) -> None:
        while True:
            with trio.move_on_at(self.rh.clean_deadline()):
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
        reads, writes, failures = self.inflight.take()
        await self.rh.update_states(self.legs.handle_errors, retire_all=self.writer.suspending)
        assert self._kc is not None
        self.resync.do_recovery(self._kc)
        await self._do_reads(reads)
        await self.writer.do_writes(writes)
        self.writer.do_failures(failures)

    def _dispatch_bios(self, delayed: list[Any]) -> None:
        for io in delayed:
            self.inflight.queue(self.inflight.writes, io)

    def _mirror_available(self, region: int) -> bool:
        return self.log.in_sync(region) and self.legs.choose() is not None

    # -- map ------------------------------------------------------------------------------------

    async def map(self, bio: Bio) -> None:
        """Run one bio through the mirror; returns when it completed, raises on failure."""
        if not self.running:
            raise DmIOError("mirror: not running")
        region = self.rh.bio_to_region(bio)
        if bio.is_write:  # data, flush, discard
            await self.writer.write(bio, region)
            return
        if not self.log.in_sync(region):
            if bio.flags & ReqFlag.RAHEAD:
                raise DmIOError("mirror: read-ahead of an out-of-sync region")
            await self.inflight.wait(self.inflight.reads, MirrorIo(bio, region))
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
                await self.inflight.wait(self.inflight.reads, MirrorIo(bio, region))
                return
            log.error("All replicated volumes dead, failing I/O")
            raise

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
                self.inflight.complete(io, DmIOError("mirror: no leg to read from"))
                continue
            bio = io.bio
            assert bio.data is not None
            req = IoRequest(Op.READ, ReqFlag.NONE, BufferMem(bio.data), self._read_done, (io, leg))
            where = Region(leg.dev, self.legs.sector(leg, bio), bio.nr_sectors)
            await dm_io(self._io, req, [where])

    def _read_done(self, error_bits: int, context: tuple[MirrorIo, Leg]) -> None:
        io, leg = context
        if not error_bits:
            self.inflight.complete(io, None)
            return
        self.legs.fail(leg, ErrorType.READ)
        if not self.legs.default.error_count or self._mirror_available(io.region):
            log.warning("Read failure on mirror device %s. Trying alternative device.",
                        leg.dev.status_name)
            self.inflight.queue(self.inflight.reads, io)
            return
        log.error("Read failure on mirror device %s.  Failing I/O.", leg.dev.status_name)
        self.inflight.complete(io, DmIOError("mirror: read failed on every leg"))

    # -- suspend / resume -----------------------------------------------------------------------

    async def presuspend(self) -> None:
        self.writer.suspending = True
        self.writer.release_holds()
        await self.rh.stop_recovery()
        await self.rh.wait_recovery_stopped()
        self.wakeup()  # a pass with suspend set retires the clean list now
        try:
            await self.log.presuspend()
        except DmIOError:
            log.warning("log presuspend failed")
        await self.flush_daemon()

    async def postsuspend(self) -> None:
        async with self._pass_lock:
            if self.running:  # writes that completed since presuspend: clean them now
                await self.rh.update_states(self.legs.handle_errors)
            try:
                await self.log.postsuspend()
            except DmIOError:
                log.warning("log postsuspend failed")

    async def resume(self) -> None:
        self.writer.suspending = False
        async with self._pass_lock:
            try:
                await self.log.resume()
            except DmIOError:
                log.warning("log resume failed")
        self.rh.start_recovery()
