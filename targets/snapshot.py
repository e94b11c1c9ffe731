"""snapshot: a writable point-in-time view of an origin device (``dm-snap.c``).

Table: ``<origin> <cow> <P|PO|N...> <chunk_size> [<#features> <feature>...]``
(dm-spec §4.3); features ``discard_zeroes_cow`` and ``discard_passdown_origin``.
Status INFO: ``Invalid`` | ``Merge failed`` | ``Overflow`` |
``<allocated>/<total> <metadata>``; TABLE: ``<origin> <cow> P 8`` (+ features).

Guarantees (the protocol is written down in ``docs/snapshot-protocol.md``):

* A read of the snapshot returns the origin's data as it was when the
  snapshot was activated, or what was written to the snapshot since.  Reads of
  chunks without a completed exception go to the origin and are *tracked*; a
  copy-out releases the origin write that caused it only after the exception is
  in the completed table and no tracked read of the chunk is left.
* A write to the snapshot, or the origin write that caused a copy-out, is
  released only after the exception is committed: for P the data copy is
  durable, then the metadata area (PREFLUSH|FUA) is.
* Exceptions commit in allocation order (out-of-order copies wait in
  ``_out_of_order``); a write covering a whole chunk is itself the copy.
* A failed copy or commit, or a full COW on an origin write, invalidates the
  snapshot (P: durably); a full COW on a snapshot write does too, except with
  ``PO``, which fails the write and shows ``Overflow``.  An invalid snapshot
  fails all I/O except flushes.

Unlike the kernel, these targets cut bios at chunk boundaries themselves
(``max_io_len`` stays 0): the core runs split pieces concurrently in random
order, but COW chunks must be allocated in sector order to reproduce the
kernel's COW layout byte for byte.  Sectors are not offset by ``ti.begin``
(the kernel's quirk; tables put these targets at sector 0).

Copy-outs are kcopyd jobs of the target's service (``snapshot_service.Service.copy``);
their callback, in the kcopyd client's worker, enters the commit loop of
:meth:`SnapshotTarget._copy_done`, which one task at a time runs, in
allocation order.  Bios whose chunks all map to consecutive COW
chunks go down as one piece.

Fields: everything is changed only between checkpoints (trio is
single-threaded); ``pending``, ``complete`` and the sequence counters are
additionally only changed by map planning (no checkpoint inside) and by the
commit loop, which one task at a time runs (``_committing``).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Sequence
from typing import ClassVar

import trio

from dmuser.bio import Bio, Op
from dmuser.blockdev import BlockDevice
from dmuser.dm_io import Region
from dmuser.errors import DmIOError, TableError, TargetArgError
from dmuser.target import TARGETS, DeviceRange, StatusType, Target, TargetContext

from . import snapshot_handover as handover
from .exstore import CowFullError, ExceptionStore, StoreArgError, StoreError, create_store
from .snapshot_core import (
    PENDING_DONE,
    PendingException,
    discard,
    get_device,
    parse_features,
    run_all,
)
from .snapshot_io import plan
from .snapshot_service import Service
from .snapshot_table import ChunkTracker, ExceptionTable

log = logging.getLogger(__name__)


@TARGETS.register("snapshot")
class SnapshotTarget(Target):
    name = "snapshot"
    version = (1, 16, 0)
    num_flush_bios = 1
    is_merge: ClassVar[bool] = False
    #: dm_snapshot.snapshot_cow_threshold: copies in progress before writes wait
    cow_threshold: ClassVar[int] = 2048

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        super().__init__(ti, args)
        if len(args) < 4:
            raise TargetArgError("requires 4 or more arguments")
        self.discard_zeroes_cow, self.discard_passdown_origin = parse_features(args[4:])
        self.origin = get_device(ti, args[0], "Cannot get origin device")
        self.cow = get_device(ti, args[1], "Cannot get COW device")
        if self.cow is self.origin:
            raise TargetArgError("COW device cannot be the same as origin device")
        try:
            self.store: ExceptionStore = create_store(args[2:4], self.cow, self.origin)
        except StoreArgError as exc:
            log.error("%s: %s", ti.md_name, exc.message)
            raise TargetArgError("Couldn't create exception store") from None
        if self.discard_zeroes_cow:  # per instance, as the kernel's ctr sets it
            setattr(self, "num_discard_bios", 2 if self.discard_passdown_origin else 1)  # noqa: B010
        self.valid = True            # all I/O fails once False
        self.overflowed = False      # PO store full: writes fail, reads work
        self.active = False          # set by the first resume; origin writes ignore inactive
        self.merge_failed = False
        self.suspended = False
        self.handover_pending = False  # a destination waiting for the source's exceptions
        self.complete = ExceptionTable()
        self.pending: dict[int, PendingException] = {}
        self.tracker = ChunkTracker()
        self._next_seq = 0           # exception_start_sequence
        self._complete_seq = 0       # exception_complete_sequence
        self._out_of_order: dict[int, PendingException] = {}
        self._committing = False     # a task is running the commit loop of _copy_done
        self.in_progress = 0         # copies started and not called back (throttle)
        self._progress = trio.Event()
        self._dropped: trio.Event | None = None  # set once drop_snapshot finished
        self.service = Service(f"{ti.md_name}:{self.name}", ti.nursery)
        self._check_merge_ctr()
        handover.register_snapshot(self)

    def _check_merge_ctr(self) -> None:
        """Hook for snapshot-merge: more checks before registration."""

    # -- life cycle ----------------------------------------------------------------------

    @property
    def dev_end(self) -> int:
        """Origin writes at or beyond this sector do not concern this snapshot."""
        return self.ti.begin + self.ti.len

    def _fail_ctr(self, text: str) -> TableError:
        return TableError(f"{self.ti.md_name}: {self.name}: {text}")

    async def open(self) -> None:
        await self.service.start()
        if self.handover_pending:
            self.store.chunk_size = 0  # metadata lives in the source's table until handover
            return
        try:
            valid = await self.store.read_metadata(self.complete.insert)
        except StoreError as exc:
            log.error("%s: %s", self.ti.md_name, exc.message)
            raise self._fail_ctr(f"Failed to read snapshot metadata ({exc.message})") from None
        if not valid:
            self.valid = False
            log.warning("Snapshot is marked invalid.")
        if not self.store.chunk_size:
            raise self._fail_ctr("Chunk size not set")

    async def close(self) -> None:
        await handover.unregister_snapshot(self)
        await self.service.stop()

    async def preresume(self) -> None:
        handover.check_preresume(self)

    async def resume(self) -> None:
        if self.handover_pending:
            await handover.take_over(self)
        self.active = True
        self.suspended = False

    async def postsuspend(self) -> None:
        self.suspended = True

    def iterate_devices(self) -> list[DeviceRange]:
        return [DeviceRange(self.origin, 0, self.ti.len),
                DeviceRange(self.cow, 0, self.cow.nr_sectors)]

    def status(self, kind: StatusType) -> str:
        if kind is StatusType.TABLE:
            text = f"{self.origin.status_name} {self.cow.status_name}{self.store.table_fragment()}"
            if self.discard_zeroes_cow:
                text += f" {1 + self.discard_passdown_origin} discard_zeroes_cow"
                if self.discard_passdown_origin:
                    text += " discard_passdown_origin"
            return text
        if not self.valid:
            return "Invalid"
        if self.merge_failed:
            return "Merge failed"
        if self.overflowed:
            return "Overflow"
        allocated, total, metadata = self.store.usage()
        return f"{allocated}/{total} {metadata}"

    # -- pending exceptions --------------------------------------------------------------

    def new_pending(self, chunk: int) -> PendingException | None:
        """Allocate a COW chunk and record a pending exception; None if the COW is full."""
        try:
            new_chunk = self.store.prepare_exception()
        except CowFullError:
            return None
        pe = PendingException(self, chunk, new_chunk, self._next_seq)
        self._next_seq += 1
        self.pending[chunk] = pe
        return pe

    def new_pending_for_origin(self, chunk: int) -> PendingException | None:
        pe = self.new_pending(chunk)
        if pe is None:
            self.invalidate(errno.ENOMEM)
        return pe

    def start_copy(self, pe: PendingException, already_marked: bool = False) -> None:
        """Start copying the origin chunk to its COW chunk (``start_copy``); never blocks."""
        assert already_marked or not pe.started
        pe.started = True
        self.in_progress += 1
        cs = self.store.chunk_size
        src = pe.old_chunk * cs
        count = max(0, min(cs, self.origin.nr_sectors - src))
        if not self.service.copy(Region(self.origin, src, count),
                                 Region(self.cow, pe.new_chunk * cs, count),
                                 lambda failed: self._copy_done(pe, failed)):
            self._lost(pe)

    def start_full_bio(self, pe: PendingException, piece: Bio) -> None:
        """The snapshot write covers the whole chunk: it is the copy (``start_full_bio``)."""
        pe.started = True
        self.in_progress += 1

        async def write() -> None:
            failed = False
            try:
                await self.cow.submit(piece)
            except DmIOError:
                failed = True
            await self._copy_done(pe, failed)

        if not self.service.start_io(write):
            self._lost(pe)

    def _lost(self, pe: PendingException) -> None:
        """The service is gone (target closing): fail the exception and the snapshot."""
        self.copy_finished()
        self.invalidate(errno.EIO)
        if self.pending.get(pe.old_chunk) is pe:
            del self.pending[pe.old_chunk]
        pe.error = True
        pe.done.set()

    async def _copy_done(self, pe: PendingException, failed: bool) -> None:
        """A copy (or full-chunk write) ended: commit, in allocation order.

        Runs in the kcopyd callback worker (a copy) or in the full-chunk
        write's service task.  One task at a time runs the
        commit loop (``_committing``); a copy finishing meanwhile only queues
        its exception, and the running loop commits it when its turn comes
        (its check follows every await), so commits never overlap and go in
        sequence order, as with the kernel's single kcopyd callback thread.
        """
        self.copy_finished()
        pe.copy_error = failed
        self._out_of_order[pe.seq] = pe
        if self._committing:
            return
        self._committing = True
        try:
            while self._complete_seq in self._out_of_order:
                e = self._out_of_order.pop(self._complete_seq)
                self._complete_seq += 1
                done = await self.store.commit_exception(e.old_chunk, e.new_chunk,
                                                         not e.copy_error, e)
                for ctx, ok in done:
                    await self._pending_complete(ctx, ok)
        except Exception:  # a bug: do not leave writers waiting forever
            log.exception("%s: snapshot commit failed", self.ti.md_name)
            self.invalidate(errno.EIO)
            for e in self.pending.values():
                e.error = True
                e.done.set()
            self.pending.clear()
        finally:
            self._committing = False

    async def _pending_complete(self, pe: PendingException, success: bool) -> None:
        if not success:
            self.invalidate(errno.EIO)
            await self.wait_invalidated()
            pe.error = True
        elif not self.valid:
            pe.error = True
        else:
            self.complete.insert(pe.old_chunk, pe.new_chunk)
            await self.tracker.wait_idle(pe.old_chunk)
        if self.pending.get(pe.old_chunk) is pe:
            del self.pending[pe.old_chunk]
        PENDING_DONE.notify()
        pe.done.set()

    def invalidate(self, reason: int) -> None:
        """``__invalidate_snapshot``: fail all I/O from now on; P rewrites its header."""
        if not self.valid:
            return
        if reason == errno.EIO:
            log.error("Invalidating snapshot: Error reading/writing.")
        elif reason == errno.ENOMEM:
            log.error("Invalidating snapshot: Unable to allocate exception.")
        self.valid = False
        dropped = self._dropped = trio.Event()

        async def drop() -> None:
            try:
                await self.store.drop_snapshot()
            finally:
                dropped.set()

        if not self.service.start_io(drop):
            dropped.set()

    async def wait_invalidated(self) -> None:
        """Return once an invalidation's header write is done (the kernel does it inline)."""
        if self._dropped is not None:
            await self._dropped.wait()

    def copy_finished(self) -> None:
        """A copy (or full-chunk write, or zeroing) counted in ``in_progress`` ended."""
        self.in_progress -= 1
        self._progress.set()
        self._progress = trio.Event()

    async def wait_throttle(self) -> None:
        """Wait while more than ``cow_threshold`` copies are in progress."""
        while self.in_progress > self.cow_threshold:
            await self._progress.wait()

    # -- I/O -----------------------------------------------------------------------------

    async def map(self, bio: Bio) -> BlockDevice | None:
        if bio.is_empty_flush or bio.nr_sectors == 0:
            return self.cow
        if not self.valid:
            raise DmIOError("snapshot is invalid")
        if bio.is_write:
            await self.wait_throttle()
        if not self.valid or (self.overflowed and bio.is_write):
            raise DmIOError("snapshot is invalid" if not self.valid else "snapshot overflowed")
        if bio.op is Op.DISCARD:
            await discard(self, bio)
            return None
        tracked: list[int] = []
        try:
            await run_all(plan(self, bio, tracked))
        finally:
            for chunk in tracked:
                self.tracker.untrack(chunk)
        return None
