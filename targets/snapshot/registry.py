"""The origin registry (the kernel's ``_origins`` hash) and origin-write copy-outs.

Every snapshot registers under its origin device when its target is
constructed and leaves when the target is destroyed (``handover.py``);
a resumed ``snapshot-origin`` target records itself too.  An origin write
asks :func:`do_origin` (or, on the direct path, :func:`origin_write_is_plain`)
for the copy-outs it needs in every active snapshot of that origin.

Concurrency: trio is single-threaded, so the registry and each snapshot's
tables are changed only between checkpoints.  The invariant "a chunk has at
most one pending exception per snapshot" holds because lookup, allocation and
insertion of a pending exception happen without a checkpoint in between
(:func:`origin_write_nowait`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from dmuser.core.bio import Bio
from dmuser.core.blockdev import BlockDevice
from dmuser.targets.snapshot.copy_out import start_copies
from dmuser.targets.snapshot.held import HeldWrites
from dmuser.targets.snapshot.snap import PendingException, Snapshot

log = logging.getLogger(__name__)

#: Split boundary of an origin with no snapshot (the kernel's 2^31 sectors).
NO_SNAPSHOT_SPLIT = 1 << 31


def origin_key(dev: BlockDevice) -> tuple[Any, ...]:
    """Identity of an origin block device (image files are shared by the manager)."""
    key = getattr(dev, "key", None)
    return ("file", *key) if isinstance(key, tuple) else ("obj", id(dev))


@dataclass(eq=False)
class Origin:
    """The snapshots of one origin device, largest chunk size first."""

    key: tuple[Any, ...]
    snapshots: list[Snapshot] = field(default_factory=list)
    #: resumed snapshot-origin targets of this device (resume adds, postsuspend removes)
    origin_targets: list[object] = field(default_factory=list)
    #: origin writes acknowledged before their exceptions were durable (``held.py``)
    held: HeldWrites = field(default_factory=HeldWrites)

    def insert(self, snap: Snapshot) -> None:
        size = snap.store.chunk_size
        i = next((i for i, s in enumerate(self.snapshots) if s.store.chunk_size < size),
                 len(self.snapshots))
        self.snapshots.insert(i, snap)

    def min_chunk_size(self) -> int:
        sizes = [s.store.chunk_size for s in self.snapshots if s.store.chunk_size]
        return min(sizes, default=NO_SNAPSHOT_SPLIT)


ORIGINS: dict[tuple[Any, ...], Origin] = {}


def lookup_origin(dev: BlockDevice) -> Origin | None:
    return ORIGINS.get(origin_key(dev))


def get_origin(dev: BlockDevice) -> Origin:
    key = origin_key(dev)
    origin = ORIGINS.get(key)
    if origin is None:
        origin = ORIGINS[key] = Origin(key)
    return origin


def drop_origin_if_unused(origin: Origin) -> None:
    if not origin.snapshots and not origin.origin_targets and not origin.held:
        ORIGINS.pop(origin.key, None)


def origin_write_nowait(snapshots: Iterable[Snapshot], sector: int,
                        fresh: list[PendingException]) -> list[PendingException]:
    """``__origin_write``: the copy-outs a write at ``sector`` needs.

    Never blocks.  Returns the pending exceptions the write must wait for
    (empty: it may go to the origin now).  Exceptions it allocates are marked
    started and appended to ``fresh``: the caller starts their copies once it
    has looked at every chunk of the write (:func:`~.copy_out.start_copies`:
    consecutive chunks become one job).
    """
    waits: list[PendingException] = []
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
        if not pe.started:
            pe.started = True
            fresh.append(pe)
    return waits


def _needs_no_copy(snap: Snapshot, start: int, end: int) -> bool:
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
        if snap.throttled or snap.dropping:  # an invalid snapshot needs nothing
            return False
        if snap.active and snap.valid and not snap.is_merge \
                and not _needs_no_copy(snap, sector, end):
            return False
    return True


def collect_copies(origin: Origin, start: int, end: int) -> list[PendingException]:
    """Steps 2-3 of an origin write without waiting (no checkpoint): start every
    copy-out a write of ``[start, end)`` needs now, and return the pending
    exceptions it must wait for (empty: it may go to the origin).

    When every chunk the write touches is already copied in every snapshot,
    one range check per snapshot decides that.  Otherwise the range is cut at
    the smallest chunk size of the origin's snapshots, so each piece lies
    inside one chunk of every snapshot, and the pieces are looked at in
    sector order, so COW chunks are allocated in the kernel's order.
    """
    snaps = [s for s in origin.snapshots if s.active and s.valid and not s.is_merge]
    if all(_needs_no_copy(s, start, end) for s in snaps):
        return []
    step = origin.min_chunk_size()
    waits: list[PendingException] = []
    fresh: list[PendingException] = []
    for sector in (start, *range((start // step + 1) * step, end, step)):
        waits.extend(origin_write_nowait(snaps, sector, fresh))
    if fresh:
        start_copies(fresh)
    return waits


async def wait_throttle(origin: Origin) -> None:
    """Wait while any snapshot of the origin has too many copies in progress."""
    for snap in list(origin.snapshots):
        await snap.wait_throttle()


async def do_origin(origin_dev: BlockDevice, bio: Bio, throttle: bool) -> None:
    """Copy out every chunk a write to the origin is about to overwrite (``do_origin``).

    Returns when no active snapshot needs a copy of any chunk the bio touches
    and each copy it needed is durably committed (:func:`collect_copies`, then
    ``Snapshot.wait_committed``, until nothing is left); the caller then sends
    the bio to the origin (whole: it is never split).
    """
    origin = lookup_origin(origin_dev)
    if origin is None or not origin.snapshots:
        return
    if throttle:
        await wait_throttle(origin)
    while waits := collect_copies(origin, bio.sector, bio.end_sector):
        for pe in waits:
            await pe.snap.wait_committed(pe)
    for snap in list(origin.snapshots):  # a full COW invalidated one: header first
        await snap.wait_invalidated()
