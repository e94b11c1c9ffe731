"""snapshot-origin: the writable origin of snapshots (``origin_*`` in ``dm-snap.c``).

Table: ``<origin_dev>`` (dm-spec §4.2).  Status INFO is empty; TABLE is the
device.  A write first makes every active snapshot of that device copy out
the chunks it is about to overwrite, and reaches the device only once all
those copies are committed.  A write that needs copies (or overlaps a held
one) and is at most ``Config.snapshot_hold_bytes``, without FUA, completes
once the copies are started: its data is held (``held.py``) until a drain
(flush, full buffer, ``snapshot_hold_ms``, suspend, snapshot activation)
writes it after the group commit of its exceptions.  Reads see held data.
FUA and larger writes wait for their commits (:func:`~.registry.do_origin`),
as the kernel does.  A FUSE or NBD write that the direct path declines
(``direct_remap``) but that would be held without waiting is held right there
(:meth:`SnapshotOriginTarget.absorb_write`: the same steps as map(), no bio).
Guarantees and proof: ``docs/snapshot-protocol.md``.

The target records itself on its origin at resume and leaves at postsuspend,
as the kernel does.  Difference: the kernel computes the split boundary (the
smallest snapshot chunk size) once at resume, so a snapshot created while the
origin stays resumed only gets copy-outs for the first chunk of a multi-chunk
write; dmuser uses the current smallest chunk size at every write, which is
the same whenever the origin is suspended around snapshot creation (as LVM
does) and safe otherwise.  Discards are not supported.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from dmuser.core.bio import Bio, ReqFlag
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError, TargetArgError
from dmuser.core.target import DeviceRange, StatusType, Target, TargetContext
from dmuser.core.units import SECTOR_SHIFT
from dmuser.targets.snapshot.held import HeldWrites
from dmuser.targets.snapshot.registry import (
    Origin,
    collect_copies,
    do_origin,
    drop_origin_if_unused,
    get_origin,
    lookup_origin,
    origin_write_is_plain,
    wait_throttle,
)
from dmuser.targets.snapshot.snap import Snapshot

log = logging.getLogger(__name__)


class SnapshotOriginTarget(Target):
    name = "snapshot-origin"
    version = (1, 9, 0)
    num_flush_bios = 1

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        super().__init__(ti, args)
        if len(args) != 1:
            raise TargetArgError("origin: incorrect number of arguments")
        self.dev = ti.get_device(args[0], "Cannot get target device")

    async def map(self, bio: Bio) -> BlockDevice | None:
        origin = lookup_origin(self.dev)
        if origin is None:
            return self.dev
        held = origin.held
        if bio.is_empty_flush:
            await held.drain()
            if held.failed:
                held.failed = False
                raise DmIOError("a held origin write failed")
            return self.dev
        if not bio.nr_sectors or bio.data is None or (not origin.snapshots and not held):
            return self.dev
        if not bio.is_write:
            return await self._read(held, bio)
        limit = self.ti.config.snapshot_hold_bytes
        n = bio.nr_sectors << SECTOR_SHIFT
        if bio.flags & ReqFlag.FUA or n > limit:  # the kernel's way: wait for the commits
            if held.find(bio.sector, bio.end_sector):
                await held.drain()  # earlier acknowledged writes go first
            await do_origin(self.dev, bio, throttle=True)
            return self.dev
        await wait_throttle(origin)
        while True:
            if held.bytes + n > limit:
                await held.drain()
                continue
            dropping = {s for s in origin.snapshots if s.dropping}
            return None if self._hold(origin, bio.sector, bio.data, dropping) else self.dev

    def absorb_write(self, sector: int, data: bytes | bytearray | memoryview) -> bool:
        """map()'s held path for a write that would not wait (FUSE writes' direct
        path): no snapshot throttled or dropping, room in the buffer, and copies
        to wait for or a held write overlapping.  Otherwise map() does it."""
        origin = lookup_origin(self.dev)
        if origin is None or not origin.snapshots:
            return False
        held = origin.held
        limit = self.ti.config.snapshot_hold_bytes
        if held.bytes + len(data) > limit \
                or any(s.throttled or s.dropping for s in origin.snapshots):
            return False
        return self._hold(origin, sector, data, set())

    def _hold(self, origin: Origin, sector: int, data: bytes | bytearray | memoryview,
              dropping: set[Snapshot]) -> bool:
        """The held path's synchronous part (no checkpoint): start the copy-outs the
        write needs, then hold it if it must wait for them, for an invalidation
        (``dropping``, plus any the copies started) or behind a held write; False:
        it may go to the origin now."""
        end = sector + (len(data) >> SECTOR_SHIFT)
        waits = collect_copies(origin, sector, end)
        dropping |= {s for s in origin.snapshots if s.dropping}
        if not (waits or dropping or origin.held.find(sector, end)):
            return False
        origin.held.hold(self.dev, sector, bytes(data), waits, dropping)
        self._arm_timer(origin.held)
        return True

    async def _read(self, held: HeldWrites, bio: Bio) -> BlockDevice | None:
        """A read overlapping held writes: read the origin, then lay them over it
        (those held before the read and those held during it, oldest first)."""
        before = held.find(bio.sector, bio.end_sector)
        if not before:
            return self.dev
        await self.dev.submit(bio)
        writes = {w.seq: w for w in (*before, *held.find(bio.sector, bio.end_sector))}
        assert bio.data is not None
        held.overlay(bio.sector, bio.data, [writes[seq] for seq in sorted(writes)])
        return None

    def _arm_timer(self, held: HeldWrites) -> None:
        """Drain ``snapshot_hold_ms`` after the first write held since the last timer."""
        if held.timer_armed:
            return
        held.timer_armed = True
        delay = self.ti.config.snapshot_hold_ms / 1000

        async def fire() -> None:
            try:
                await trio.sleep(delay)
            finally:
                held.timer_armed = False
            try:
                await held.drain()
            except Exception:  # never take the daemon's nursery down
                log.exception("%s: draining held origin writes failed", self.ti.md_name)

        if self.ti.nursery is not None:
            self.ti.nursery.start_soon(fire)
        else:
            trio.lowlevel.spawn_system_task(fire)

    def direct_remap(self, write: bool, sector: int,
                     nr_sectors: int) -> tuple[BlockDevice, int] | None:
        """Reads pass straight through, and so do writes no snapshot needs a copy
        for (map() would return at once): those may skip map().  Neither may
        while it overlaps a held write."""
        origin = lookup_origin(self.dev)
        if origin is not None and origin.held.find(sector, sector + nr_sectors):
            return None
        if write and nr_sectors and not origin_write_is_plain(self.dev, sector, nr_sectors):
            return None
        return self.dev, 0

    async def resume(self) -> None:
        origin = get_origin(self.dev)
        if self not in origin.origin_targets:
            origin.origin_targets.append(self)

    async def postsuspend(self) -> None:
        await self._drain_all()
        self._unrecord()

    async def close(self) -> None:
        await self._drain_all()
        self._unrecord()

    async def _drain_all(self) -> None:
        """Suspend and destroy: every held write reaches the origin and is flushed."""
        origin = lookup_origin(self.dev)
        if origin is not None and origin.held:
            await origin.held.drain(everything=True)
            try:
                await self.dev.flush()
            except DmIOError as exc:
                log.error("%s: flushing the origin failed: %s", self.ti.md_name, exc)

    def _unrecord(self) -> None:
        origin = lookup_origin(self.dev)
        if origin is not None and self in origin.origin_targets:
            origin.origin_targets.remove(self)
            drop_origin_if_unused(origin)

    def status(self, kind: StatusType) -> str:
        return self.dev.status_name if kind is StatusType.TABLE else ""

    def iterate_devices(self) -> list[DeviceRange]:
        return [DeviceRange(self.dev, 0, self.ti.len)]
