"""snapshot-merge: copy a snapshot's exceptions back onto its origin (``dm-snap.c``).

Same table and status as ``snapshot`` (dm-spec §4.4).  Loaded on a COW that an
active snapshot uses, it takes that snapshot's exceptions over at resume
(handover); otherwise it reads the persistent store itself (a merge resumed
after a restart).  A transient store cannot merge and is refused.

The merge (dm-spec §4.10) runs in the target's background service from resume
to presuspend, one step at a time:

1. ``prepare_merge`` names the newest run of consecutive exceptions (never
   across a metadata area).
2. Every other snapshot of the origin copies out the origin range first.
3. The step's chunks are marked merging: new writes to them wait; tracked COW
   writes already in flight are drained.
4. kcopyd copies COW -> origin; the origin is flushed; ``commit_merge`` clears
   the records durably (PREFLUSH|FUA); the chunks leave the completed table.
   Only then are the waiting writes sent to the origin.

So a crash at any point leaves every not-yet-cleared record on disk with its
COW data intact; the next activation merges those again (copying twice is
harmless).  Any failure stops the merge with ``Merge failed``; I/O continues.
Reads of a chunk go to the COW until its step has committed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from dmuser.core.bio import Bio, Op
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError, TargetArgError
from dmuser.core.target import TargetContext
from dmuser.services.dm_io import Region
from dmuser.targets.snapshot.copy_out import start_copies
from dmuser.targets.snapshot.exception_table import ExceptionTableError
from dmuser.targets.snapshot.handover import find_sharing_cow
from dmuser.targets.snapshot.registry import do_origin, lookup_origin, origin_write_nowait
from dmuser.targets.snapshot.snap import PendingException
from dmuser.targets.snapshot.snapshot import SnapshotTarget
from dmuser.targets.snapshot.store import StoreError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class MergeStep:
    """The chunks being merged; writes to them wait for ``done``."""

    first_chunk: int = 0
    nr_chunks: int = 0
    failed: bool = False
    done: trio.Event = field(default_factory=trio.Event)


class SnapshotMergeTarget(SnapshotTarget):
    name = "snapshot-merge"
    version = (1, 5, 0)
    num_flush_bios = 2
    is_merge = True

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        self.step = MergeStep()
        self._stop_merge = False
        self._merge_stopped: trio.Event | None = None
        super().__init__(ti, args)

    def _check_merge_ctr(self) -> None:
        _, src, _, _ = find_sharing_cow(self.snap)
        if src is None and not self.snap.store.supports_merge:
            raise TargetArgError("Snapshot exception store does not support snapshot-merge.")

    # -- life cycle ----------------------------------------------------------------------

    async def resume(self) -> None:
        await super().resume()
        await self._start_merge()

    async def presuspend(self) -> None:
        await self._stop_merge_and_wait()

    async def close(self) -> None:
        await self._stop_merge_and_wait()
        await super().close()

    async def _start_merge(self) -> None:
        if self._merge_stopped is not None:
            return  # already running
        self._stop_merge = False
        self._merge_stopped = trio.Event()
        self.snap.service.start_bg(self._merge_loop, self._merge_stopped)

    async def _stop_merge_and_wait(self) -> None:
        """Ask the merge to stop after the step in flight, and wait for it."""
        stopped = self._merge_stopped
        if stopped is None:
            return
        self._stop_merge = True
        await stopped.wait()

    @property
    def merging(self) -> bool:
        return self._merge_stopped is not None

    # -- the merge loop ------------------------------------------------------------------

    async def _merge_loop(self, stopped: trio.Event) -> None:
        try:
            while not self._stop_merge:
                if not self.snap.valid:
                    log.error("Snapshot is invalid: can't merge")
                    break
                try:
                    n, last_old, last_new = await self.snap.store.prepare_merge()
                except StoreError:
                    log.error("Read error in exception store: shutting down merge")
                    self.snap.merge_failed = True
                    break
                if not n or not await self._merge_step(n, last_old, last_new):
                    break
        finally:
            self._merge_stopped = None
            stopped.set()

    async def _merge_step(self, n: int, last_old: int, last_new: int) -> bool:
        """Merge one run; False when the merge must stop (``merge_failed`` is set)."""
        cs = self.snap.store.chunk_size
        old_start, new_start = last_old + 1 - n, last_new + 1 - n
        dest_sector = old_start * cs
        count = max(0, min(n * cs, self.snap.origin.nr_sectors - dest_sector))
        origin = lookup_origin(self.snap.origin)
        while origin is not None:  # other snapshots copy out the range first
            min_chunk = origin.min_chunk_size()
            waits: list[PendingException] = []
            fresh: list[PendingException] = []
            for offset in range(0, count, min_chunk):
                waits += origin_write_nowait(list(origin.snapshots), dest_sector + offset,
                                             fresh)
            if fresh:
                start_copies(fresh)
            if not waits:
                break
            for pe in waits:
                await pe.snap.wait_committed(pe)
        self.step = MergeStep(old_start, n)
        await self.snap.tracker.wait_idle(old_start, n)
        read_err, write_err = await self.snap.service.copy_wait(
            Region(self.snap.cow, new_start * cs, count),
            Region(self.snap.origin, dest_sector, count))
        ok = await self._finish_step(read_err, write_err, n, old_start)
        step, self.step = self.step, MergeStep()
        step.failed = not ok
        step.done.set()
        if not ok:
            self.snap.merge_failed = True
        return ok

    async def _finish_step(self, read_err: bool, write_err: bool, n: int, old_start: int) -> bool:
        """``merge_callback``: flush, commit, forget the chunks; log why it failed."""
        if read_err or write_err:
            log.error("%s error: shutting down merge.", "Read" if read_err else "Write")
            return False
        try:
            await self.snap.origin.flush()
        except DmIOError:
            log.error("Flush after merge failed: shutting down merge")
            return False
        try:
            await self.snap.store.commit_merge(n)
        except StoreError:
            log.error("Write error in exception store: shutting down merge")
            return False
        try:
            for chunk in range(old_start + n - 1, old_start - 1, -1):
                self.snap.complete.remove(chunk)
        except ExceptionTableError as exc:
            log.error("%s", exc.message)
            return False
        return True

    # -- I/O -----------------------------------------------------------------------------

    async def map(self, bio: Bio) -> BlockDevice | None:
        """``snapshot_merge_map``: chunk by chunk, in sector order; a bio touching
        no chunk with an exception goes to the origin whole."""
        if bio.is_empty_flush or bio.nr_sectors == 0:
            return self.snap.cow if bio.target_ctx == 1 else self.snap.origin
        if bio.op is Op.DISCARD:
            return None  # once merging, discards no longer effect change
        shift = self.snap.store.chunk_shift
        first, last = bio.sector >> shift, (bio.end_sector - 1) >> shift
        if not self.snap.valid or not self.snap.complete.covers_any(first, last):
            # no chunk is (still) in the COW: the whole bio goes to the origin
            if bio.is_write:
                await do_origin(self.snap.origin, bio, throttle=False)
            return self.snap.origin
        sector = bio.sector
        while sector < bio.end_sector:
            chunk = sector >> shift
            nr = min(bio.end_sector, (chunk + 1) << shift) - sector
            await self._map_piece(bio.clone(sector, nr), chunk)
            sector += nr
        return None

    async def _map_piece(self, piece: Bio, chunk: int) -> None:
        new_chunk = self.snap.complete.get(chunk) if self.snap.valid else None
        if new_chunk is None:
            if piece.is_write:
                await do_origin(self.snap.origin, piece, throttle=False)
            await self.snap.origin.submit(piece)
            return
        step = self.step
        if piece.is_write and step.first_chunk <= chunk < step.first_chunk + step.nr_chunks:
            await step.done.wait()
            if step.failed:
                raise DmIOError("snapshot merge failed")
            await self.snap.origin.submit(piece)
            return
        cs = self.snap.store.chunk_size
        piece.sector = new_chunk * cs + (piece.sector & self.snap.store.chunk_mask)
        if not piece.is_write:
            await self.snap.cow.submit(piece)
            return
        self.snap.tracker.track(chunk)
        try:
            await self.snap.cow.submit(piece)
        finally:
            self.snap.tracker.untrack(chunk)
