"""One snapshot's state and exception machinery (the kernel's ``struct dm_snapshot``).

The ``snapshot`` and ``snapshot-merge`` targets each own a :class:`Snapshot`;
the origin registry (``registry.py``), handover (``handover.py``) and bio
routing (``route.py``) work on it through the public members below.  As in
``dm-snap.c``, one structure serves both target types (``is_merge``).

Guarantees (the protocol is written down in ``docs/snapshot-protocol.md``):

* A pending exception is allocated (:meth:`Snapshot.new_pending`) without a
  checkpoint, so lookup, allocation and insertion are atomic: a chunk never
  gets two pending exceptions, and COW chunks go out in the order chunks were
  looked at.
* Exceptions commit in allocation order, one call at a time: each copy (a
  kcopyd job, or inline: ``copy_out.py``) or full-chunk write ends in the commit
  loop, which one task at a time runs (an inline copy does the loop's ``hold``
  steps itself, in order); a copy finishing meanwhile only queues itself.  For P the data
  copy is durable, then the metadata area (PREFLUSH|FUA) is, before anything
  waiting on the exception is released.
* Deferred group commit: while no task waits in :meth:`Snapshot.wait_committed`,
  the store keeps committed records in memory (``hold``); the first waiter,
  an invalidation or :meth:`Snapshot.close` makes the loop write them all in
  one area write.  ``pe.done`` is set only after that write, so nothing that
  depends on durability (an origin write reaching the origin, a snapshot
  write) can run before it.
* A completed exception releases its waiters only once no tracked read of the
  chunk is left (``ChunkTracker``), so a snapshot read never sees origin data
  written after the snapshot.
* A failed copy or commit, or a full COW on an origin write, invalidates the
  snapshot (P: durably, see :meth:`Snapshot.invalidate`).

Fields: everything is changed only between checkpoints (trio is
single-threaded); ``pending``, ``complete`` and the sequence counters are
additionally only changed by allocation (no checkpoint inside) and by the
commit loop (``_committing``).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from dmuser.core.bio import Bio
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError
from dmuser.services.dm_io import Region
from dmuser.targets.snapshot.copy_out import copy_inline, inline_ok
from dmuser.targets.snapshot.exception_table import ChunkTracker, ExceptionTable
from dmuser.targets.snapshot.service import Service
from dmuser.targets.snapshot.store import CowFullError, ExceptionStore

log = logging.getLogger(__name__)


@dataclass(eq=False)
class PendingException:
    """A copy-out in progress (the kernel's ``dm_snap_pending_exception``).

    ``done`` is set once the exception was committed (or failed) and every
    tracked read of the chunk has finished; ``error`` says whether it failed.
    Waiters (origin writes, snapshot writes) are released by ``done``.
    """

    snap: Snapshot
    old_chunk: int
    new_chunk: int
    seq: int
    started: bool = False
    copy_error: bool = False
    error: bool = False
    done: trio.Event = field(default_factory=trio.Event)


class Snapshot:
    """The shared state of a snapshot or snapshot-merge target.

    Attributes:
        origin, cow: the origin and COW devices.
        store: the exception store (swapped by a handover).
        is_merge: this is a snapshot-merge target.
        valid: all I/O fails once False.
        overflowed: a PO store is full: writes fail, reads work.
        active: set by the first resume; origin writes ignore inactive snapshots.
        suspended: between postsuspend and resume.
        handover_pending: a destination waiting for the source's exceptions.
        merge_failed: the merge stopped on an error ("Merge failed").
        complete: completed exceptions; pending: pending ones by origin chunk.
        tracker: reads to the origin (and merge's COW writes) in flight per chunk.
        in_progress: copies started and not yet called back (the throttle).
    """

    def __init__(self, md_name: str, dev_end: int, origin: BlockDevice, cow: BlockDevice,
                 store: ExceptionStore, service: Service, *, is_merge: bool,
                 cow_threshold: int, table_event: Callable[[], None] | None = None) -> None:
        self.md_name = md_name
        #: dm_table_event of the snapshot's device: raised when it becomes invalid
        self.table_event = table_event
        #: origin writes at or beyond this sector do not concern this snapshot
        self.dev_end = dev_end
        self.origin, self.cow, self.store, self.service = origin, cow, store, service
        self.is_merge = is_merge
        #: dm_snapshot.snapshot_cow_threshold: copies in progress before writes wait
        self.cow_threshold = cow_threshold
        self.valid = True
        self.overflowed = False
        self.active = False
        self.suspended = False
        self.handover_pending = False
        self.merge_failed = False
        self.complete = ExceptionTable()
        self.pending: dict[int, PendingException] = {}
        self.tracker = ChunkTracker()
        self.in_progress = 0
        self._next_seq = 0           # exception_start_sequence
        self._complete_seq = 0       # exception_complete_sequence
        self._out_of_order: dict[int, PendingException] = {}
        self._committing = False     # a task is running the commit loop (_run_commits)
        self._waited: dict[int, int] = {}  # seq -> tasks in wait_committed for it
        self._closing = False        # close() started: commits are not held
        self._progress: trio.Event | None = None  # made by the first throttled writer
        self._dropped: trio.Event | None = None  # set once drop_snapshot finished

    def status(self) -> str:
        """The INFO status: ``Invalid``, ``Merge failed``, ``Overflow`` or the usage."""
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
        """:meth:`new_pending` for an origin write: a full COW invalidates the snapshot."""
        pe = self.new_pending(chunk)
        if pe is None:
            self.invalidate(errno.ENOMEM)
        return pe

    def start_copy(self, run: Sequence[PendingException], inline: bool = True) -> bool:
        """Copy a run of origin chunks to their COW chunks (``start_copy``, batched):
        inline now if ``inline`` and both devices are files served inline, else
        as one kcopyd job (``copy_out.py``); never waits.  True if copied inline.

        ``run``: pending exceptions of this snapshot with consecutive origin
        chunks and consecutive COW chunks (so the run crosses no metadata
        area), in allocation order (``copy_out.start_copies`` cuts them).  Their
        copy ends together: one failure fails them all, which invalidates
        the snapshot just as one failed per-chunk copy does.
        """
        first = run[0]
        for pe in run:
            pe.started = True
        self.in_progress += len(run)
        cs = self.store.chunk_size
        src = first.old_chunk * cs
        count = max(0, min(cs * len(run), self.origin.nr_sectors - src))
        if inline and self.service.running and inline_ok(self.origin, self.cow, count):
            dst = first.new_chunk * cs
            self._copied_inline(run, copy_inline(self.origin, src, self.cow, dst, count))
            return True
        if not self.service.copy(Region(self.origin, src, count),
                                 Region(self.cow, first.new_chunk * cs, count),
                                 lambda failed: self._copy_done(run, failed)):
            for pe in run:
                self._lost(pe)
        return False

    def start_full_bio(self, run: Sequence[PendingException], piece: Bio) -> None:
        """The snapshot write covers the run's chunks whole: it is their copy
        (``start_full_bio``), one COW write for the run (a run as in
        :meth:`start_copy`)."""
        for pe in run:
            pe.started = True
        self.in_progress += len(run)

        async def write() -> None:
            failed = False
            try:
                await self.cow.submit(piece)
            except DmIOError:
                failed = True
            await self._copy_done(run, failed)

        if not self.service.start_io(write):
            for pe in run:
                self._lost(pe)

    def _lost(self, pe: PendingException) -> None:
        """The service is gone (target closing): fail the exception and the snapshot."""
        self.copy_finished()
        self.invalidate(errno.EIO)
        if self.pending.get(pe.old_chunk) is pe:
            del self.pending[pe.old_chunk]
        pe.error = True
        pe.done.set()

    async def _copy_done(self, run: Sequence[PendingException], failed: bool) -> None:
        """A kcopyd copy (or full-chunk write) of ``run`` ended: commit, in allocation
        order.  Runs in the kcopyd callback worker or the full-chunk write's task."""
        self._queue_copied(run, failed)
        await self._run_commits()

    def _copied_inline(self, run: Sequence[PendingException], failed: bool) -> None:
        """An inline copy of ``run`` ended: :meth:`_copy_done` without a checkpoint.
        What the loop would only hold is held here (:meth:`_hold_nowait`); what
        needs a write or a completion goes to the loop, started in the service."""
        self._queue_copied(run, failed)
        if not (self._committing or self._hold_nowait()):
            self.service.start_io(self._run_commits)  # running (checked): it starts

    def _queue_copied(self, run: Sequence[PendingException], failed: bool) -> None:
        self.copy_finished(len(run))
        for pe in run:
            pe.copy_error = failed
            self._out_of_order[pe.seq] = pe

    def _hold_nowait(self) -> bool:
        """The commit loop's ``hold`` steps, synchronously: commit records in
        sequence order while the store can keep them in memory without I/O and
        no task waits for them.  True if the loop has nothing to do now."""
        while self._complete_seq in self._out_of_order:
            e = self._out_of_order[self._complete_seq]
            if e.copy_error or self._must_write(e.seq) \
                    or not self.store.hold_nowait(e.old_chunk, e.new_chunk, e):
                return False
            del self._out_of_order[self._complete_seq]
            self._complete_seq += 1
        return not (self.store.held and self._must_write(self._complete_seq - 1))

    def _must_write(self, upto: int) -> bool:
        """Records up to sequence ``upto`` may not stay in memory: a task waits for
        one of them, or the snapshot is invalid or closing."""
        return not self.valid or self._closing or bool(self._waited) and min(self._waited) <= upto

    async def _run_commits(self) -> None:
        """The commit loop: one task at a time runs it (``_committing``).

        A copy finishing meanwhile only queues its exception, and the running
        loop commits it when its turn comes (its checks follow every await),
        so commits never overlap and go in sequence order, as with the
        kernel's single kcopyd callback thread.  While no task waits for a
        record (:meth:`wait_committed`), the store keeps it in memory
        (deferred group commit); the loop writes the held records as soon as
        a task waits for one of them, the snapshot becomes invalid, or it
        closes.
        """
        if self._committing:
            return
        self._committing = True
        try:
            while True:
                if self._complete_seq in self._out_of_order:
                    e = self._out_of_order.pop(self._complete_seq)
                    self._complete_seq += 1
                    done = await self.store.commit_exception(
                        e.old_chunk, e.new_chunk, not e.copy_error, e,
                        hold=not self._must_write(e.seq))
                elif self.store.held and self._must_write(self._complete_seq - 1):
                    done = await self.store.commit_held()
                else:
                    break
                for ctx, ok in done:
                    await self._pending_complete(ctx, ok)
        except Exception:  # a bug: do not leave writers waiting forever
            log.exception("%s: snapshot commit failed", self.md_name)
            self.invalidate(errno.EIO)
            for e in self.pending.values():
                e.error = True
                e.done.set()
            self.pending.clear()
        finally:
            self._committing = False

    def _kick(self) -> None:
        """Start the commit loop in the service if records are held and it is idle."""
        if not self._committing and self.store.held and self._must_write(self._complete_seq - 1) \
                and not self.service.start_io(self._run_commits):
            log.error("%s: cannot commit held exceptions", self.md_name)

    async def wait_committed(self, pe: PendingException) -> None:
        """Wait until ``pe`` is done, making the commit it waits for happen now.

        Every task that must not return before the exception is durable uses
        this (a snapshot write, a synchronous origin write, a merge step, a
        handover, a drain of held origin writes): while it waits, commits are
        not held back.  Cancelling the wait leaves the commit to the service.
        """
        if pe.done.is_set():
            return
        self._waited[pe.seq] = self._waited.get(pe.seq, 0) + 1
        try:
            self._kick()
            await pe.done.wait()
        finally:
            if self._waited[pe.seq] == 1:
                del self._waited[pe.seq]
            else:
                self._waited[pe.seq] -= 1

    async def commit_all(self) -> None:
        """Wait until every exception pending now is committed (or failed)."""
        for pe in list(self.pending.values()):
            await self.wait_committed(pe)

    async def close(self) -> None:
        """Commit what is held and stop the service (the target's destructor)."""
        self._closing = True
        self._kick()
        await self.commit_all()
        await self.service.stop()

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
        pe.done.set()

    # -- invalidation and throttling -----------------------------------------------------

    def invalidate(self, reason: int) -> None:
        """``__invalidate_snapshot``: fail all I/O from now on; P rewrites its header."""
        if not self.valid:
            return
        if reason == errno.EIO:
            log.error("Invalidating snapshot: Error reading/writing.")
        elif reason == errno.ENOMEM:
            log.error("Invalidating snapshot: Unable to allocate exception.")
        self.valid = False
        if self.table_event is not None:  # as __invalidate_snapshot: 'dmsetup wait' wakes
            self.table_event()
        dropped = self._dropped = trio.Event()

        async def drop() -> None:
            try:
                await self.store.drop_snapshot()
            finally:
                dropped.set()

        if not self.service.start_io(drop):
            dropped.set()
        self._kick()  # held records fail now (their waiters must not hang)

    @property
    def invalidated(self) -> bool:
        """True once :meth:`invalidate` ran (its header write may still be under way)."""
        return self._dropped is not None

    @property
    def dropping(self) -> bool:
        """An invalidation's header write is under way."""
        return self._dropped is not None and not self._dropped.is_set()

    async def wait_invalidated(self) -> None:
        """Return once an invalidation's header write is done (the kernel does it inline)."""
        if self._dropped is not None:
            await self._dropped.wait()

    def copy_finished(self, n: int = 1) -> None:
        """``n`` copies (or full-chunk writes, or zeroings) counted in ``in_progress`` ended."""
        self.in_progress -= n
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    @property
    def throttled(self) -> bool:
        """More than ``cow_threshold`` copies are in progress: writes wait."""
        return self.in_progress > self.cow_threshold

    async def wait_throttle(self) -> None:
        """Wait while more than ``cow_threshold`` copies are in progress."""
        while self.in_progress > self.cow_threshold:
            if self._progress is None:
                self._progress = trio.Event()
            await self._progress.wait()
