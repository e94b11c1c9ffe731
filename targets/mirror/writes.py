"""Mirror writes: the daemon's write path, direct writes, failures (dm-spec §5.9, §5.11).

:class:`WritePath` is the write half of a mirror set (``mirror_set.py``
owns one and hands it the bios); ``docs/mirror-protocol.md`` has the protocol.

Guarantees:

* **Dirty before data.**  Every leg write of a CLEAN/DIRTY region is issued
  after the region's dirty mark is durable: the daemon incs the regions of a
  batch, flushes the log, then writes; a *direct* write (dmuser, from the
  submitter's task, no daemon pass) is only taken when
  ``DirtyLog.mark_is_durable`` says the mark is already on the log device, no
  PREFLUSH is involved and the log has not failed.  Either way the bio goes to
  every leg as one dm-io request.
* **Never half issued.**  A direct write is shielded from cancellation: once
  started, it reaches every leg (or fails there) before the submitter sees
  ``Cancelled``.  When every leg is a backing file that takes the bio inline
  (``FileDevice.runs_inline``: a plain write of at most ``inline_max_bytes``),
  the direct write is one ``pwrite`` per leg with no checkpoint between them
  (its only checkpoint comes before the region is counted), so nothing can
  cancel or interleave with it halfway; a failed ``pwrite`` sends the whole
  write through dm-io, which repeats it on every leg and reports the error the
  usual way.  This is the 4 KiB random-write fast path (docs/benchmarks.md).
* **Errors per leg.**  Bit i of dm-io's result fails leg i (WRITE); the bio
  then goes through the daemon's failure list exactly as a daemon-path write.
* Writes to a NOSYNC region go to the default leg only, writes to a
  RECOVERING region wait for its copy, flushes and discards always go
  through the daemon.
"""

from __future__ import annotations

import logging

import trio

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.blockdev import FileDevice
from dmuser.core.errors import DmIOError, NotSupportedError, RequeueError
from dmuser.core.target import TargetContext
from dmuser.services.dm_io import BufferMem, DmIoClient, IoRequest, Region, dm_io, dm_io_wait
from dmuser.targets.mirror.inflight import InFlight, MirrorIo
from dmuser.targets.mirror.legs import ErrorType, Leg, LegSet
from dmuser.targets.mirror.log import DirtyLog
from dmuser.targets.mirror.region_hash import RegionHash, RegionState, is_flush_or_discard

log = logging.getLogger(__name__)

_IN_SYNC = (RegionState.CLEAN, RegionState.DIRTY)


class WritePath:
    """How a mirror set writes: the daemon's write pass, direct writes, failures.

    Attributes:
        log_failure: the dirty log could not be flushed; stays set until reload.
        suspending: the set is between presuspend and resume: held writes are
            completed (EIO, or requeued on a ``--noflush`` suspend) instead of held.
        holds: failed writes held for userspace (``handle_errors``) until suspend.
    """

    def __init__(self, ti: TargetContext, dirty_log: DirtyLog, legs: LegSet, rh: RegionHash,
                 inflight: InFlight) -> None:
        self.ti = ti
        self.log = dirty_log
        self.legs = legs
        self.rh = rh
        self.inflight = inflight
        self.log_failure = False
        self.suspending = False
        self.holds: list[MirrorIo] = []
        self._io: DmIoClient | None = None
        self._nursery: trio.Nursery | None = None
        #: (file, sector delta) per leg when every leg is a backing file: the
        #: inline direct write (:meth:`write`); None otherwise
        self._files: list[tuple[FileDevice, int]] | None = None
        self._policy_max = 0
        if all(isinstance(leg.dev, FileDevice) for leg in legs):
            self._files = [(leg.dev, leg.offset - legs.target_begin) for leg in legs
                           if isinstance(leg.dev, FileDevice)]
            self._policy_max = min(dev.policy.inline_max_bytes for dev, _ in self._files)

    def attach(self, io_client: DmIoClient, nursery: trio.Nursery) -> None:
        """The mirror's service started: write through ``io_client``, run tasks in ``nursery``."""
        self._io, self._nursery = io_client, nursery

    def detach(self) -> None:
        """The service stopped: direct writes are refused, held writes forgotten."""
        self._io = self._nursery = None
        self.holds = []

    async def do_writes(self, writes: list[MirrorIo]) -> None:
        """The daemon's write pass (``do_writes``): inc, flush the log, then write."""
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
            for io in lists["sync"]:
                self.inflight.queue(self.inflight.failures, io)
        else:
            for io in lists["sync"]:
                await self._do_write(io)
        for io in lists["recover"]:
            self.rh.delay(io, io.region)
        for io in lists["nosync"]:
            if self.legs.leg_failure and self.legs.handle_errors and not self.legs.keep_log:
                self.inflight.queue(self.inflight.failures, io)
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
            self.inflight.complete(io, None)
            return
        if io.bio.op is Op.DISCARD:
            self.inflight.complete(io, NotSupportedError("mirror: discard failed"))
            return
        for leg in self.legs:
            if error_bits >> leg.index & 1:
                self.legs.fail(leg, ErrorType.WRITE)
        self.inflight.queue(self.inflight.failures, io)

    async def write(self, bio: Bio, region: int) -> None:
        """A write from ``MirrorSet.map`` (data, flush or discard); returns when it
        completed, raises its error.

        A *direct* write (``direct_ok``) skips the daemon.  It is inline when
        every leg is a file that runs the bio inline: one checkpoint first (the
        cancellation point and the policy's periodic yield, before ``direct_ok``
        is asked), then inc, one ``pwrite`` per leg and dec with nothing in
        between, so no task sees the region's count raised or a leg half
        written.  Otherwise (and when a ``pwrite`` failed) it is
        :meth:`_write_direct`.  Everything else waits for the daemon's pass."""
        files = self._files
        data = bio.data
        if files is not None and not bio.flags and bio.op is Op.WRITE and data is not None \
                and 0 < len(data) <= self._policy_max:
            await files[0][0].policy.inline_turn()
            # direct_ok() for a plain data write (tested above)
            if self._io is not None and not self.log_failure \
                    and self.rh.get_state(region) in _IN_SYNC \
                    and self.log.mark_is_durable(region):
                sector = bio.sector
                self.rh.inc(region)  # CLEAN -> DIRTY; the log's bit is already 0
                try:
                    for dev, delta in files:
                        dev.pwrite_inline(sector + delta, data)
                except OSError:
                    # repeated through dm-io, which reports it the usual way
                    await self._write_direct(bio, region)
                else:
                    self.rh.dec(region)
                return
        elif self.direct_ok(bio, region):
            self.rh.inc(region)  # CLEAN -> DIRTY; the log's bit is already 0
            await self._write_direct(bio, region)
            return
        await self.inflight.wait(self.inflight.writes, MirrorIo(bio, region))

    def direct_ok(self, bio: Bio, region: int) -> bool:
        """May this write skip the daemon (dmuser)?  Yes for a data write without
        PREFLUSH to a CLEAN/DIRTY region whose dirty mark is already durable
        (``DirtyLog.mark_is_durable``) while the log works: the daemon would
        only inc the region, find nothing to flush and write every leg."""
        return (bio.op is Op.WRITE and bio.nr_sectors > 0 and self._io is not None
                and not (bio.flags and bio.flags & ReqFlag.PREFLUSH)
                and not self.log_failure
                and self.rh.get_state(region) in _IN_SYNC
                and self.log.mark_is_durable(region))

    async def _write_direct(self, bio: Bio, region: int) -> None:
        """``_do_write`` from the submitter's task, the region already inc'ed: one
        dm-io write to every leg (shielded: never abandoned half-issued), then
        completion as :meth:`_write_done` (a failed leg still goes through the
        daemon)."""
        data = bio.data
        assert self._io is not None and data is not None
        io = MirrorIo(bio, region)
        io.counted = True
        legs = self.legs
        regions = [Region(leg.dev, legs.sector(leg, bio), bio.nr_sectors) for leg in legs]
        flags = bio.flags & ReqFlag.FUA if bio.flags else ReqFlag.NONE
        with trio.CancelScope(shield=True):
            error_bits = await dm_io_wait(self._io, IoRequest(Op.WRITE, flags, BufferMem(data)),
                                          regions)
        if not error_bits:
            self.inflight.complete(io, None)
            return
        self.inflight.track(io)
        if self._io is None:
            self.inflight.complete(io, DmIOError("mirror: device closed"))
        else:
            self._write_done(error_bits, io)
        await io.done.wait()
        if io.error is not None:
            raise io.error

    async def _write_default(self, io: MirrorIo, leg: Leg) -> None:
        """A write to an out-of-sync region: the default leg only, errors returned as they are."""
        bio = io.bio
        error: DmIOError | None = None
        try:
            await leg.dev.submit(Bio(bio.op, self.legs.sector(leg, bio), bio.nr_sectors,
                                     bio.data, bio.flags))
        except DmIOError as exc:
            error = exc
        self.inflight.complete(io, error)

    def do_failures(self, failures: list[MirrorIo]) -> None:
        """``do_failures``: mark failed writes' regions out of sync; hold or complete them."""
        for io in failures:
            if not self.log_failure:
                self.legs.in_sync = False
                self.rh.mark_nosync(io.bio)
            if self.legs.valid() is None or (self.legs.keep_log and self.log_failure):
                self.inflight.complete(io, DmIOError("mirror: write failed"))
            elif self.legs.handle_errors and not self.legs.keep_log:
                self._hold(io)
            else:
                self.inflight.complete(io, None)  # reached a leg; the region will be resynced

    def release_holds(self) -> None:
        """Presuspend: every held write is completed now (``suspending`` is set)."""
        holds, self.holds = self.holds, []
        for io in holds:
            self._hold(io)

    def _hold(self, io: MirrorIo) -> None:
        if self.suspending:
            noflush = self.ti.noflush_suspending is not None and self.ti.noflush_suspending()
            self.inflight.complete(io, RequeueError("mirror: held write requeued") if noflush
                           else DmIOError("mirror: held write failed at suspend"))
        else:
            self.holds.append(io)
