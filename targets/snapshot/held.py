"""Origin writes held in memory until the exceptions they need are durable.

An origin write whose chunks need copy-outs is acknowledged once the copies
are started (``origin.py``): its data is copied into a :class:`HeldWrites`
buffer of its origin (``registry.Origin.held``) and reaches the origin device
only in :meth:`HeldWrites.drain`, after every exception it waits for is
committed (``Snapshot.wait_committed``: one area write with PREFLUSH|FUA per
snapshot covers every record committed since the last one).  The protocol and
its proof are in ``docs/snapshot-protocol.md`` ("Held origin writes").

Guarantees:

* A held write reaches the origin only after each of its exceptions is done
  (committed durably, or failed and its snapshot's invalid header written).
* Held writes reach the origin in the order they were acknowledged, one at a
  time; a later write overlapping a held one is held too (behind it), so no
  write to the origin overtakes an earlier acknowledged one.
* Reads of the origin device through ``snapshot-origin`` see held data
  (:meth:`HeldWrites.find` + :meth:`overlay`).
* :meth:`drain` returns only once every write held when it was called is on
  the origin device (not yet flushed: the caller flushes).  A failed origin
  write sets :attr:`HeldWrites.failed`, which the next flush reports (EIO), as
  a disk's write cache reports a lost write.
* Memory: ``bytes`` never exceeds the origin target's ``snapshot_hold_bytes``
  (the target drains before it would).

Concurrency: the index changes only between checkpoints; one drain runs at a
time (``_drain_lock``).  A drained write stays visible to reads until its
origin write completed.  Cancelling a drain leaves the writes not yet written
held (a later drain writes them).
"""

from __future__ import annotations

import logging

import trio

from dmuser.core.bio import Bio
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError
from dmuser.core.units import SECTOR_SHIFT
from dmuser.targets.snapshot.snap import PendingException, Snapshot

log = logging.getLogger(__name__)

#: buckets of the overlap index: 2^7 sectors (64 KiB)
BUCKET_SHIFT = 7


class HeldWrite:
    """One acknowledged origin write not yet on the origin device."""

    __slots__ = ("seq", "sector", "end_sector", "data", "waits", "snaps")

    def __init__(self, seq: int, sector: int, data: bytes, waits: list[PendingException],
                 snaps: set[Snapshot]) -> None:
        self.seq, self.sector, self.data, self.waits = seq, sector, data, waits
        #: snapshots whose invalidation (header write) must finish first
        self.snaps = snaps | {pe.snap for pe in waits}
        self.end_sector = sector + (len(data) >> SECTOR_SHIFT)


class HeldWrites:
    """The held origin writes of one origin device, oldest first."""

    def __init__(self) -> None:
        self._writes: dict[int, HeldWrite] = {}  # by seq; insertion order = age
        self._index: dict[int, list[HeldWrite]] = {}
        self._next_seq = 0
        self._drain_lock = trio.Lock()
        #: bytes of data held
        self.bytes = 0
        #: a drained write failed on the origin; the next flush fails and clears it
        self.failed = False
        #: the origin device the writes go to (set by the first hold)
        self.dev: BlockDevice | None = None
        #: a drain timer is armed (``origin.py``)
        self.timer_armed = False

    def __len__(self) -> int:
        return len(self._writes)

    def find(self, start: int, end: int) -> list[HeldWrite]:
        """Held writes overlapping sectors ``[start, end)``, oldest first."""
        if not self._writes or start >= end:
            return []
        found: dict[int, HeldWrite] = {}
        for bucket in range(start >> BUCKET_SHIFT, ((end - 1) >> BUCKET_SHIFT) + 1):
            for w in self._index.get(bucket, ()):
                if w.sector < end and start < w.end_sector:
                    found[w.seq] = w
        return [found[seq] for seq in sorted(found)]

    def hold(self, dev: BlockDevice, sector: int, data: bytes,
             waits: list[PendingException], snaps: set[Snapshot]) -> None:
        """Keep a copy of an acknowledged write (no checkpoint): it goes to ``dev``
        once ``waits`` are done and the invalidations of ``snaps`` are written."""
        w = HeldWrite(self._next_seq, sector, data, waits, snaps)
        self._next_seq += 1
        self.dev = dev
        self._writes[w.seq] = w
        for bucket in range(sector >> BUCKET_SHIFT, ((w.end_sector - 1) >> BUCKET_SHIFT) + 1):
            self._index.setdefault(bucket, []).append(w)
        self.bytes += len(data)

    def _remove(self, w: HeldWrite) -> None:
        del self._writes[w.seq]
        for bucket in range(w.sector >> BUCKET_SHIFT, ((w.end_sector - 1) >> BUCKET_SHIFT) + 1):
            lst = self._index[bucket]
            lst.remove(w)
            if not lst:
                del self._index[bucket]
        self.bytes -= len(w.data)

    @staticmethod
    def overlay(sector: int, buf: memoryview, writes: list[HeldWrite]) -> None:
        """Copy the parts of ``writes`` (oldest first) that fall in ``buf`` at ``sector``."""
        end = sector + (len(buf) >> SECTOR_SHIFT)
        for w in writes:
            lo, hi = max(sector, w.sector), min(end, w.end_sector)
            if lo < hi:
                buf[(lo - sector) << SECTOR_SHIFT:(hi - sector) << SECTOR_SHIFT] = \
                    w.data[(lo - w.sector) << SECTOR_SHIFT:(hi - w.sector) << SECTOR_SHIFT]

    async def drain(self, everything: bool = False) -> None:
        """Write the held writes to the origin, oldest first, each after its exceptions.

        Without ``everything``, only the writes held when the call started
        (what a flush must cover); with it, until none is left (suspend,
        snapshot activation).
        """
        async with self._drain_lock:
            limit = self._next_seq
            while self._writes:
                w = next(iter(self._writes.values()))
                if not everything and w.seq >= limit:
                    break
                for pe in w.waits:
                    await pe.snap.wait_committed(pe)
                for snap in w.snaps:
                    await snap.wait_invalidated()
                assert self.dev is not None
                try:
                    await self.dev.submit(Bio.write(w.sector, w.data))
                except DmIOError as exc:
                    log.error("held origin write at sector %d failed: %s", w.sector, exc)
                    self.failed = True
                self._remove(w)
