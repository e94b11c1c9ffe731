"""snapshot: a writable point-in-time view of an origin device (``dm-snap.c``).

Table: ``<origin> <cow> <P|PO|N...> <chunk_size> [<#features> <feature>...]``
(dm-spec §4.3); features ``discard_zeroes_cow`` and ``discard_passdown_origin``.
Status INFO: ``Invalid`` | ``Merge failed`` | ``Overflow`` |
``<allocated>/<total> <metadata>``; TABLE: ``<origin> <cow> P 8`` (+ features).

The target parses its table line, owns a :class:`~.snap.Snapshot` (the
state and the exception machinery) and routes bios with ``route.py``.
Guarantees are those of ``snap.py``; in short:

* A read of the snapshot returns the origin's data as it was when the
  snapshot was activated, or what was written to the snapshot since.
* A write to the snapshot, or the origin write that caused a copy-out, is
  released only after the exception is committed (for P: durably).
* A failed copy or commit, or a full COW on an origin write, invalidates the
  snapshot; a full COW on a snapshot write does too, except with ``PO``,
  which fails the write and shows ``Overflow``.  An invalid snapshot fails
  all I/O except flushes.

Unlike the kernel, these targets cut bios at chunk boundaries themselves
(``max_io_len`` stays 0): the core runs split pieces concurrently in random
order, but COW chunks must be allocated in sector order to reproduce the
kernel's COW layout byte for byte.  Sectors are not offset by ``ti.begin``
(the kernel's quirk; tables put these targets at sector 0).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import ClassVar

from dmuser.core.args import ArgReader
from dmuser.core.bio import Bio, Op
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError, TableError, TargetArgError
from dmuser.core.target import DeviceRange, StatusType, Target, TargetContext
from dmuser.targets.snapshot import handover
from dmuser.targets.snapshot.registry import lookup_origin
from dmuser.targets.snapshot.route import discard, plan, run_all
from dmuser.targets.snapshot.service import Service
from dmuser.targets.snapshot.snap import Snapshot
from dmuser.targets.snapshot.store import StoreArgError, StoreError, create_store

log = logging.getLogger(__name__)


def parse_features(words: Sequence[str]) -> tuple[bool, bool]:
    """``parse_snapshot_features``: (discard_zeroes_cow, discard_passdown_origin)."""
    zeroes = passdown = False
    features = ArgReader(words)
    if features.remaining:
        for _ in range(features.read_group(0, 2, "Invalid number of feature arguments")):
            word = features.shift().lower()
            if word == "discard_zeroes_cow":
                zeroes = True
            elif word == "discard_passdown_origin":
                passdown = True
            else:
                raise TargetArgError("Unrecognised feature requested")
        if passdown and not zeroes:
            raise TargetArgError("discard_passdown_origin feature depends on discard_zeroes_cow")
    return zeroes, passdown


class SnapshotTarget(Target):
    name = "snapshot"
    version = (1, 16, 0)
    num_flush_bios = 1
    #: the kernel's dm_target_is_snapshot_merge(): set by snapshot-merge
    is_merge: ClassVar[bool] = False

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        super().__init__(ti, args)
        if len(args) < 4:
            raise TargetArgError("requires 4 or more arguments")
        self.discard_zeroes_cow, self.discard_passdown_origin = parse_features(args[4:])
        origin = ti.get_device(args[0], "Cannot get origin device")
        cow = ti.get_device(args[1], "Cannot get COW device")
        if cow is origin:
            raise TargetArgError("COW device cannot be the same as origin device")
        try:
            store = create_store(args[2:4], cow, origin)
        except StoreArgError as exc:
            log.error("%s: %s", ti.md_name, exc.message)
            raise TargetArgError("Couldn't create exception store") from None
        if self.discard_zeroes_cow:  # per instance, as the kernel's ctr sets it
            self.num_discard_bios = 2 if self.discard_passdown_origin else 1  # type: ignore[misc]
        service = Service(f"{ti.md_name}:{self.name}", ti.nursery,
                          ti.config.snapshot_copy_pool_pages)
        self.snap = Snapshot(ti.md_name, ti.begin + ti.len, origin, cow, store, service,
                             is_merge=self.is_merge,
                             cow_threshold=ti.config.snapshot_cow_threshold,
                             table_event=ti.table_event)
        self._check_merge_ctr()
        handover.register_snapshot(self.snap)

    def _check_merge_ctr(self) -> None:
        """Hook for snapshot-merge: more checks before registration."""

    # -- life cycle ----------------------------------------------------------------------

    def _fail_ctr(self, text: str) -> TableError:
        return TableError(f"{self.ti.md_name}: {self.name}: {text}")

    async def open(self) -> None:
        snap = self.snap
        await snap.service.start()
        if snap.handover_pending:
            snap.store.chunk_size = 0  # metadata lives in the source's table until handover
            return
        try:
            valid = await snap.store.read_metadata(snap.complete.insert)
        except StoreError as exc:
            log.error("%s: %s", self.ti.md_name, exc.message)
            raise self._fail_ctr(f"Failed to read snapshot metadata ({exc.message})") from None
        if not valid:
            snap.valid = False
            log.warning("Snapshot is marked invalid.")
        if not snap.store.chunk_size:
            raise self._fail_ctr("Chunk size not set")

    async def close(self) -> None:
        await handover.unregister_snapshot(self.snap)
        await self.snap.close()

    async def preresume(self) -> None:
        handover.check_preresume(self.snap)

    async def resume(self) -> None:
        if self.snap.handover_pending:
            await handover.take_over(self.snap)
        origin = lookup_origin(self.snap.origin)
        while not self.snap.active and origin is not None and origin.held:
            # writes acknowledged before activation are part of the snapshot
            await origin.held.drain(everything=True)
        self.snap.active = True
        self.snap.suspended = False

    async def postsuspend(self) -> None:
        self.snap.suspended = True

    def iterate_devices(self) -> list[DeviceRange]:
        return [DeviceRange(self.snap.origin, 0, self.ti.len),
                DeviceRange(self.snap.cow, 0, self.snap.cow.nr_sectors)]

    def status(self, kind: StatusType) -> str:
        snap = self.snap
        if kind is StatusType.INFO:
            return snap.status()
        text = f"{snap.origin.status_name} {snap.cow.status_name}{snap.store.table_fragment()}"
        if self.discard_zeroes_cow:
            text += f" {1 + self.discard_passdown_origin} discard_zeroes_cow"
            if self.discard_passdown_origin:
                text += " discard_passdown_origin"
        return text

    # -- I/O -----------------------------------------------------------------------------

    async def map(self, bio: Bio) -> BlockDevice | None:
        snap = self.snap
        if bio.is_empty_flush or bio.nr_sectors == 0:
            return snap.cow
        if not snap.valid:
            raise DmIOError("snapshot is invalid")
        if bio.is_write:
            await snap.wait_throttle()
        if not snap.valid or (snap.overflowed and bio.is_write):
            raise DmIOError("snapshot is invalid" if not snap.valid else "snapshot overflowed")
        if bio.op is Op.DISCARD:
            await discard(snap, bio, self.discard_passdown_origin)
            return None
        tracked: list[int] = []
        try:
            await run_all(plan(snap, bio, tracked))
        finally:
            for chunk in tracked:
                snap.tracker.untrack(chunk)
        return None
