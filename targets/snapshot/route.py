"""How the ``snapshot`` target routes a bio (``snapshot_map`` in ``dm-snap.c``).

:func:`plan` looks at the bio chunk by chunk, in sector order, without a
checkpoint, so pending exceptions are allocated in sector order and two bios
can never create two exceptions for one chunk.  It returns the I/O to await:

* chunks with a completed exception go to their COW chunk; reads of chunks
  without one go to the origin and are *tracked* (the caller untracks them
  when the I/O is done), so a copy-out cannot release an origin write over them;
* writes to chunks without a completed exception wait for the exception's
  commit (a write covering a whole chunk is itself the copy), then go to the COW;
* consecutive pieces going to consecutive sectors of one device are one
  request; a bio whose chunks all map to consecutive COW chunks is planned
  with one lookup per chunk and sent as one piece.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Sequence
from typing import Any

import trio

from dmuser.core.bio import Bio
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError
from dmuser.services.dm_io import Region
from dmuser.targets.snapshot.copy_out import follows
from dmuser.targets.snapshot.snap import PendingException, Snapshot

log = logging.getLogger(__name__)


def plan(snap: Snapshot, bio: Bio, tracked: list[int]) -> list[Awaitable[None]]:
    """Route every chunk piece of ``bio`` (no checkpoint: allocation happens in order).

    Returns the I/O to await.  Consecutive pieces going to consecutive
    sectors of one device are merged into one request.
    """
    cs, shift, mask = snap.store.chunk_size, snap.store.chunk_shift, snap.store.chunk_mask
    sector, end = bio.sector, bio.end_sector
    first, last_chunk = sector >> shift, (end - 1) >> shift
    get = snap.complete.get
    new_first = get(first)
    if new_first is not None:  # fast path: one run of consecutive COW chunks
        chunk = first + 1
        while chunk <= last_chunk and get(chunk) == new_first + chunk - first:
            chunk += 1
        if chunk > last_chunk:
            piece = bio.clone(sector, bio.nr_sectors)
            piece.sector = new_first * cs + (sector & mask)
            return [snap.cow.submit(piece)]
    remaps: list[list[Any]] = []  # [dev, dev_sector, bio_sector, nr]
    jobs: list[Awaitable[None]] = []
    full: list[PendingException] = []  # fresh chunks the write covers whole, from full_sector
    full_sector = 0
    while sector < end:
        chunk = sector >> shift
        nr = min(end, (chunk + 1) << shift) - sector
        new_chunk = get(chunk)
        if new_chunk is not None or not bio.is_write:
            if new_chunk is not None:
                dev, dev_sector = snap.cow, new_chunk * cs + (sector & mask)
            else:
                dev, dev_sector = snap.origin, sector
                snap.tracker.track(chunk)
                tracked.append(chunk)
            last = remaps[-1] if remaps else None
            if last and last[0] is dev and last[1] + last[3] == dev_sector \
                    and last[2] + last[3] == sector:
                last[3] += nr
            else:
                remaps.append([dev, dev_sector, sector, nr])
        else:
            pe = snap.pending.get(chunk) or _new_for_write(snap, chunk)
            if pe is None:
                jobs.append(_fail_after_drop(snap, "snapshot COW device is full"))
            elif not pe.started and nr == cs:  # the write is the copy: one per run
                if full and follows(full[-1], pe):
                    full.append(pe)
                else:
                    if full:
                        jobs.append(_write_run(snap, bio, full_sector, full))
                    full, full_sector = [pe], sector
            else:
                jobs.append(_plan_write(snap, bio, pe, sector, nr))
        sector += nr
    if full:
        jobs.append(_write_run(snap, bio, full_sector, full))
    for dev, dev_sector, bio_sector, nr in remaps:
        piece = bio.clone(bio_sector, nr)
        piece.sector = dev_sector
        jobs.append(dev.submit(piece))
    return jobs


def _new_for_write(snap: Snapshot, chunk: int) -> PendingException | None:
    """Allocate a pending exception for a snapshot write; None if the COW is full
    (``PO``: ``Overflow``, else the snapshot is invalidated)."""
    pe = snap.new_pending(chunk)
    if pe is None:
        if snap.store.overflow_ok:
            if snap.valid and not snap.overflowed:
                snap.overflowed = True
                log.error("Snapshot overflowed: Unable to allocate exception.")
        else:
            snap.invalidate(errno.ENOMEM)
    return pe


def _plan_write(snap: Snapshot, bio: Bio, pe: PendingException, sector: int, nr: int,
                ) -> Awaitable[None]:
    """A write to part of a chunk without a completed exception (dm-spec §4.7
    step 9): start the copy if needed, wait for the commit, then write."""
    piece = bio.clone(sector, nr)
    piece.sector = pe.new_chunk * snap.store.chunk_size + (sector & snap.store.chunk_mask)
    if not pe.started:
        snap.start_copy((pe,))
    return _wait_pending((pe,), snap.cow, piece)


def _write_run(snap: Snapshot, bio: Bio, sector: int, run: list[PendingException],
               ) -> Awaitable[None]:
    """Fresh chunks the write covers whole (a run, ``copy_out.follows``): the write is
    their copy, one COW write for the run; then wait for their commits."""
    cs = snap.store.chunk_size
    piece = bio.clone(sector, len(run) * cs)
    piece.sector = run[0].new_chunk * cs
    snap.start_full_bio(run, piece)
    return _wait_pending(run, None, None)


async def _fail_after_drop(snap: Snapshot, text: str) -> None:
    await snap.wait_invalidated()
    raise DmIOError(text)


async def _wait_pending(pes: Sequence[PendingException], dev: BlockDevice | None,
                        piece: Bio | None) -> None:
    """Wait for the exceptions' commits, then send the queued snapshot bio to the COW."""
    for pe in pes:
        await pe.snap.wait_committed(pe)
    if any(pe.error for pe in pes):
        raise DmIOError("snapshot exception failed")
    if dev is not None and piece is not None:
        await dev.submit(piece)


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


async def discard(snap: Snapshot, bio: Bio, passdown_origin: bool) -> None:
    """Discards with discard_zeroes_cow: zero whole remapped chunks (dm-spec §4.7)."""
    cs, shift, mask = snap.store.chunk_size, snap.store.chunk_shift, snap.store.chunk_mask
    if passdown_origin:
        await snap.origin.submit(bio.clone(bio.sector, bio.nr_sectors))
    sector = bio.sector
    while sector < bio.end_sector:
        chunk = sector >> shift
        nr = min(bio.end_sector, (chunk + 1) << shift) - sector
        new_chunk = snap.complete.get(chunk)
        if new_chunk is not None:
            if nr == cs:
                snap.in_progress += 1
                try:
                    failed = await snap.service.zero(Region(snap.cow, new_chunk * cs, cs))
                finally:
                    snap.copy_finished()
                if failed:
                    raise DmIOError("zeroing a COW chunk failed")
            else:
                piece = bio.clone(sector, nr)
                piece.sector = new_chunk * cs + (sector & mask)
                await snap.cow.submit(piece)
        sector += nr
