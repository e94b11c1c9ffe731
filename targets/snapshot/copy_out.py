"""Starting copy-outs: runs of consecutive chunks, and the inline copy.

A copy-out copies origin chunks to the COW chunks of their pending
exceptions before the exceptions may commit.  Two ways, one contract (the
kernel's ``start_copy``: plain writes, no flush or FUA, a failed read is never
written, the commit loop learns the outcome):

* **inline** (:func:`copy_inline`): when the origin and the COW are backing
  files this daemon reads and writes inline anyway (plain ``FileDevice``
  whose policy runs a call of this size in the trio thread), the copy is one
  ``pread`` and one ``pwrite`` right here, before the caller's next
  checkpoint.  That is what the kcopyd job would do through dm-io, minus
  ~150-250 us of job, sub-job, page-pool and dm-io bookkeeping per copy on
  this machine (``docs/benchmarks.md``, "Issue 12, third pass").  The buffer
  is one transient ``bytes`` of at most ``INLINE_COPY_MAX_BYTES``.
* **kcopyd** (``Service.copy``) for everything else: stacked devices, NBD,
  files whose syscalls run in threads (``core/reentry.py``), larger runs.

The inline copy is earlier than the kcopyd one would be, never later: it
happens while the exceptions are freshly allocated and before any write they
protect can be issued, so it reads exactly what the kcopyd copy would read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dmuser.core.blockdev import BlockDevice, FileDevice
from dmuser.core.units import SECTOR_SHIFT

if TYPE_CHECKING:
    from dmuser.targets.snapshot.snap import PendingException, Snapshot

log = logging.getLogger(__name__)

#: the largest run copied inline (larger runs go to kcopyd, whose page pool
#: bounds their memory): 256 KiB, four 64 KiB chunks
INLINE_COPY_MAX_BYTES = 256 << 10


def follows(prev: PendingException, pe: PendingException) -> bool:
    """``pe`` extends a run ending with ``prev``: same snapshot, allocated next,
    next origin chunk, next COW chunk (so no metadata area lies between)."""
    return pe.seq == prev.seq + 1 and pe.snap is prev.snap \
        and pe.old_chunk == prev.old_chunk + 1 and pe.new_chunk == prev.new_chunk + 1


def start_copies(fresh: Sequence[PendingException]) -> None:
    """Start the copies of newly allocated pending exceptions, in allocation order,
    one copy per run (:meth:`Snapshot.start_copy`).

    A run is a maximal sequence of exceptions of one snapshot, allocated one
    after the other (consecutive sequence numbers), with consecutive origin
    chunks and consecutive COW chunks: a write spanning several chunks
    becomes one read and one write per snapshot, except where the COW
    allocation skips a metadata area (the COW chunks are then not
    consecutive, so a run never crosses an area).

    At most ``INLINE_COPY_MAX_BYTES`` of one call's runs are copied inline (a
    write over many fragmented chunks must not hold the event loop for
    hundreds of cold reads); the rest go to kcopyd.
    """
    if len(fresh) == 1:  # the common case: one chunk of one snapshot
        fresh[0].snap.start_copy(fresh)
        return
    runs: dict[Snapshot, list[PendingException]] = {}
    budget = INLINE_COPY_MAX_BYTES  # inline copies of this call, in bytes

    def start(run: list[PendingException]) -> None:
        nonlocal budget
        if run[0].snap.start_copy(run, inline=budget > 0):
            budget -= len(run) * run[0].snap.store.chunk_size << SECTOR_SHIFT

    for pe in fresh:
        run = runs.get(pe.snap)
        if run is not None:
            if follows(run[-1], pe):
                run.append(pe)
                continue
            start(run)
        runs[pe.snap] = [pe]
    for run in runs.values():
        start(run)


def _inline_file(dev: BlockDevice, nbytes: int) -> bool:
    return type(dev) is FileDevice and dev.serves_inline(nbytes)


def inline_ok(origin: BlockDevice, cow: BlockDevice, nr_sectors: int) -> bool:
    """A copy of ``nr_sectors`` between these devices may use :func:`copy_inline`."""
    nbytes = nr_sectors << SECTOR_SHIFT
    return nbytes <= INLINE_COPY_MAX_BYTES and _inline_file(origin, nbytes) \
        and _inline_file(cow, nbytes)


def copy_inline(origin: BlockDevice, src: int, cow: BlockDevice, dst: int,
                nr_sectors: int) -> bool:
    """Copy ``nr_sectors`` from ``origin`` at ``src`` to ``cow`` at ``dst`` now, in
    this thread (:func:`inline_ok` said yes); returns whether the copy failed.
    A failed or short read writes nothing."""
    assert isinstance(origin, FileDevice) and isinstance(cow, FileDevice)
    nbytes = nr_sectors << SECTOR_SHIFT
    try:
        return _copy(origin, src, cow, dst, nr_sectors, nbytes)
    except Exception:  # a bug: fail the run (the snapshot), never leave it pending
        log.exception("%s: inline copy-out failed", origin.status_name)
        return True


def _copy(origin: FileDevice, src: int, cow: FileDevice, dst: int, nr_sectors: int,
          nbytes: int) -> bool:
    try:
        data = origin.pread_inline(src, nbytes)
        if len(data) != nbytes:
            log.warning("%s: copy-out read of %d sectors at %d came back short",
                        origin.status_name, nr_sectors, src)
            return True
    except OSError as exc:
        log.warning("%s: copy-out read of %d sectors at %d failed: %s",
                    origin.status_name, nr_sectors, src, exc)
        return True
    try:
        cow.pwrite_inline(dst, data)
    except OSError as exc:
        log.warning("%s: copy-out write of %d sectors at %d failed: %s",
                    cow.status_name, nr_sectors, dst, exc)
        return True
    return False
