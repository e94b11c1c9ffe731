"""Shared machinery of snapshot, snapshot-origin and snapshot-merge (from ``dm-snap.c``).

* ``snapshot_table``: :class:`ExceptionTable` (completed exceptions) and
  :class:`ChunkTracker` (I/O in flight per chunk: reads through a snapshot that
  go to the origin, merge's COW writes).  A copy-out releases the origin write
  only once no tracked read of the chunk is left, so a snapshot read never sees
  data written to the origin after the snapshot.
* :class:`PendingException` -- one copy-out in progress.
* The **origin registry** (the kernel's ``_origins`` hash): every snapshot
  registers under its origin device in its constructor and leaves in its
  destructor; :func:`origin_write_nowait` and :func:`do_origin` run the
  copy-outs an origin write needs in every active snapshot of that origin.
* :func:`get_device` and :func:`run_all`, small helpers of the three targets.

Concurrency: trio is single-threaded, so the registry, the tables and the
pending dicts are changed only between checkpoints.  The invariant "a chunk has
at most one pending exception per snapshot, and never both a pending and a
completed one for long" holds because lookup, allocation and insertion of a
pending exception happen without a checkpoint in between.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from dmuser.args import ArgReader
from dmuser.bio import Bio
from dmuser.blockdev import BlockDevice
from dmuser.dm_io import Region
from dmuser.errors import DmError, DmIOError, TargetArgError
from dmuser.target import TargetContext

if TYPE_CHECKING:
    from .snapshot import SnapshotTarget

log = logging.getLogger(__name__)

#: Split boundary of an origin with no snapshot (the kernel's 2^31 sectors).
NO_SNAPSHOT_SPLIT = 1 << 31


@dataclass(eq=False)
class PendingException:
    """A copy-out in progress (the kernel's ``dm_snap_pending_exception``).

    ``done`` is set once the exception was committed (or failed) and every
    tracked read of the chunk has finished; ``error`` says whether it failed.
    Waiters (origin writes, snapshot writes) are released by ``done``.
    """

    snap: SnapshotTarget
    old_chunk: int
    new_chunk: int
    seq: int
    started: bool = False
    copy_error: bool = False
    error: bool = False
    done: trio.Event = field(default_factory=trio.Event)


# -- the origin registry ------------------------------------------------------------------


def origin_key(dev: BlockDevice) -> tuple[Any, ...]:
    """Identity of an origin block device (image files are shared by the manager)."""
    key = getattr(dev, "key", None)
    return ("file", *key) if isinstance(key, tuple) else ("obj", id(dev))


@dataclass(eq=False)
class Origin:
    """The snapshots of one origin device, largest chunk size first."""

    key: tuple[Any, ...]
    snapshots: list[SnapshotTarget] = field(default_factory=list)
    #: resumed snapshot-origin targets of this device (resume adds, postsuspend removes)
    origin_targets: list[Any] = field(default_factory=list)

    def insert(self, snap: SnapshotTarget) -> None:
        size = snap.store.chunk_size
        i = next((i for i, s in enumerate(self.snapshots) if s.store.chunk_size < size),
                 len(self.snapshots))
        self.snapshots.insert(i, snap)

    def min_chunk_size(self) -> int:
        sizes = [s.store.chunk_size for s in self.snapshots if s.store.chunk_size]
        return min(sizes, default=NO_SNAPSHOT_SPLIT)


ORIGINS: dict[tuple[Any, ...], Origin] = {}


class _PendingDone:
    """The kernel's ``_pending_exceptions_done``: wakes whoever waits for *any* completion."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


PENDING_DONE = _PendingDone()


def lookup_origin(dev: BlockDevice) -> Origin | None:
    return ORIGINS.get(origin_key(dev))


def get_origin(dev: BlockDevice) -> Origin:
    key = origin_key(dev)
    origin = ORIGINS.get(key)
    if origin is None:
        origin = ORIGINS[key] = Origin(key)
    return origin


def drop_origin_if_unused(origin: Origin) -> None:
    if not origin.snapshots and not origin.origin_targets:
        ORIGINS.pop(origin.key, None)


def origin_write_nowait(snapshots: Iterable[SnapshotTarget], sector: int,
                        with_bio: bool = True) -> list[PendingException]:
    """``__origin_write``: start the copy-outs a write at ``sector`` needs.

    Never blocks.  Returns the pending exceptions the write must wait for
    (empty: it may go to the origin now).  With ``with_bio`` the first new
    copy is started last, to give the others a head start, as the kernel does.
    """
    waits: list[PendingException] = []
    start_last: PendingException | None = None
    for snap in snapshots:
        if snap.is_merge or not snap.active or not snap.valid or sector >= snap.dev_end:
            continue
        chunk = sector >> snap.store.chunk_shift
        pe = snap.pending.get(chunk)
        if pe is None:
            if chunk in snap.complete:
                continue
            pe = snap.new_pending_for_origin(chunk)
            if pe is None:
                continue
        waits.append(pe)
        if pe.started:
            continue
        if with_bio and start_last is None:
            start_last = pe
            pe.started = True
        else:
            snap.start_copy(pe)
    if start_last is not None:
        start_last.snap.start_copy(start_last, already_marked=True)
    return waits


def _needs_no_copy(snap: SnapshotTarget, start: int, end: int) -> bool:
    """True if an origin write of ``[start, end)`` needs nothing from ``snap``: every
    chunk it touches has a completed exception and none has a pending one."""
    end = min(end, snap.dev_end)
    if start >= end:
        return True
    shift = snap.store.chunk_shift
    first, last = start >> shift, (end - 1) >> shift
    if not snap.complete.covers(first, last):
        return False
    pending = snap.pending
    return not pending or not any(map(pending.__contains__, range(first, last + 1)))


def origin_write_is_plain(origin_dev: BlockDevice, sector: int, nr_sectors: int) -> bool:
    """True if :func:`do_origin` would return at once for a write of these
    sectors: no snapshot is throttled or being invalidated, and none needs a
    copy of any chunk they touch.  Synchronous, for the direct path
    (``SnapshotOriginTarget.direct_remap``); conservative: any doubt is False."""
    origin = lookup_origin(origin_dev)
    if origin is None or not origin.snapshots:
        return True
    end = sector + nr_sectors
    for snap in origin.snapshots:
        if snap.in_progress > snap.cow_threshold or snap._dropped is not None:
            return False
        if snap.active and snap.valid and not snap.is_merge \
                and not _needs_no_copy(snap, sector, end):
            return False
    return True


async def do_origin(origin_dev: BlockDevice, bio: Bio, throttle: bool) -> None:
    """Copy out every chunk a write to the origin is about to overwrite (``do_origin``).

    Returns when no active snapshot needs a copy of any chunk the bio touches;
    the caller then sends the bio to the origin (whole: it is never split).
    When every chunk the bio touches is already copied in every snapshot, one
    range check per snapshot decides that.  Otherwise the bio is cut at the
    smallest chunk size of the origin's snapshots, so each piece lies inside
    one chunk of every snapshot, and the pieces are looked at in sector order,
    so COW chunks are allocated in the kernel's order; pieces already copied
    cost a lookup each.
    """
    origin = lookup_origin(origin_dev)
    if origin is None or not origin.snapshots:
        return
    if throttle:
        for snap in list(origin.snapshots):
            await snap.wait_throttle()
    start, end = bio.sector, bio.end_sector
    while True:
        snaps = [s for s in origin.snapshots if s.active and s.valid and not s.is_merge]
        if all(_needs_no_copy(s, start, end) for s in snaps):
            break
        step = origin.min_chunk_size()
        waits: list[PendingException] = []
        for sector in (start, *range((start // step + 1) * step, end, step)):
            waits.extend(origin_write_nowait(snaps, sector))
        if not waits:
            break
        for pe in waits:
            await pe.done.wait()
    for snap in list(origin.snapshots):  # a full COW invalidated one: header first
        await snap.wait_invalidated()


# -- helpers of the three targets ---------------------------------------------------------


def get_device(ti: TargetContext, word: str, error: str) -> BlockDevice:
    """``dm_get_device`` with the target's own error text (the cause goes to the log)."""
    try:
        return ti.get_device(word)
    except DmError as exc:
        log.error("%s: %s: %s", ti.md_name, error, exc.message)
        raise TargetArgError(error) from None


async def run_all(jobs: Sequence[Awaitable[None]]) -> None:
    """Await every job (concurrently when several); then raise the first DmIOError."""
    if len(jobs) == 1:
        await jobs[0]
        return
    errors: list[DmIOError] = []

    async def one(job: Awaitable[None]) -> None:
        try:
            await job
        except DmIOError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(one, job)
    if errors:
        raise errors[0]


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


async def discard(snap: SnapshotTarget, bio: Bio) -> None:
    """Discards with discard_zeroes_cow: zero whole remapped chunks (dm-spec §4.7)."""
    cs, shift, mask = snap.store.chunk_size, snap.store.chunk_shift, snap.store.chunk_mask
    if snap.discard_passdown_origin:
        await snap.origin.submit(bio.clone(bio.sector, bio.nr_sectors))
    sector = bio.sector
    while sector < bio.end_sector:
        chunk = sector >> shift
        nr = min(bio.end_sector, (chunk + 1) << shift) - sector
        new_chunk = snap.complete.get(chunk)
        if new_chunk is not None:
            if nr == cs:
                assert snap.service.kc is not None
                snap.in_progress += 1
                try:
                    result = await snap.service.kc.zero_wait([Region(snap.cow, new_chunk * cs, cs)])
                finally:
                    snap.copy_finished()
                if result.write_err:
                    raise DmIOError("zeroing a COW chunk failed")
            else:
                piece = bio.clone(sector, nr)
                piece.sector = new_chunk * cs + (sector & mask)
                await snap.cow.submit(piece)
        sector += nr
