"""snapshot-origin: the writable origin of snapshots (``origin_*`` in ``dm-snap.c``).

Table: ``<origin_dev>`` (dm-spec §4.2).  Status INFO is empty; TABLE is the
device.  Reads and flushes go straight to the device.  A write first makes
every active snapshot of that device copy out the chunks it is about to
overwrite (:func:`~.registry.do_origin`, throttled), and reaches
the device only once all those copies are committed.

The target records itself on its origin at resume and leaves at postsuspend,
as the kernel does.  Difference: the kernel computes the split boundary (the
smallest snapshot chunk size) once at resume, so a snapshot created while the
origin stays resumed only gets copy-outs for the first chunk of a multi-chunk
write; dmuser uses the current smallest chunk size at every write, which is
the same whenever the origin is suspended around snapshot creation (as LVM
does) and safe otherwise.  Discards are not supported.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmuser.core.bio import Bio
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import TargetArgError
from dmuser.core.target import DeviceRange, StatusType, Target, TargetContext
from dmuser.targets.snapshot.registry import (
    do_origin,
    drop_origin_if_unused,
    get_origin,
    lookup_origin,
    origin_write_is_plain,
)


class SnapshotOriginTarget(Target):
    name = "snapshot-origin"
    version = (1, 9, 0)
    num_flush_bios = 1

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        super().__init__(ti, args)
        if len(args) != 1:
            raise TargetArgError("origin: incorrect number of arguments")
        self.dev = ti.get_device(args[0], "Cannot get target device")

    async def map(self, bio: Bio) -> BlockDevice:
        if bio.is_write and bio.nr_sectors:
            await do_origin(self.dev, bio, throttle=True)
        return self.dev

    def direct_remap(self, write: bool, sector: int,
                     nr_sectors: int) -> tuple[BlockDevice, int] | None:
        """Reads pass straight through, and so do writes no snapshot needs a copy
        for (map() would return at once): those may skip map()."""
        if write and nr_sectors and not origin_write_is_plain(self.dev, sector, nr_sectors):
            return None
        return self.dev, 0

    async def resume(self) -> None:
        origin = get_origin(self.dev)
        if self not in origin.origin_targets:
            origin.origin_targets.append(self)

    async def postsuspend(self) -> None:
        self._unrecord()

    async def close(self) -> None:
        self._unrecord()

    def _unrecord(self) -> None:
        origin = lookup_origin(self.dev)
        if origin is not None and self in origin.origin_targets:
            origin.origin_targets.remove(self)
            drop_origin_if_unused(origin)

    def status(self, kind: StatusType) -> str:
        return self.dev.status_name if kind is StatusType.TABLE else ""

    def iterate_devices(self) -> list[DeviceRange]:
        return [DeviceRange(self.dev, 0, self.ti.len)]
