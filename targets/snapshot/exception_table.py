"""Chunk bookkeeping of a snapshot (from ``dm-snap.c``).

* :class:`ExceptionTable` -- completed exceptions ``old_chunk -> new_chunk``,
  with the kernel's runs of consecutive chunks (they matter only for merge's
  corruption checks) and a count per hash bucket for range checks.
* :class:`ChunkTracker` -- I/O in flight per chunk ("tracked chunks"): reads
  through a snapshot that go to the origin, and merge's COW writes.

Both are plain data structures changed only between checkpoints (trio is
single-threaded); only :meth:`ChunkTracker.wait_idle` awaits.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import trio

from dmuser.core.errors import DmError


class ExceptionTableError(DmError):
    """The in-core table and the store disagree (merge corruption checks)."""


#: The kernel's hash bucket of a chunk is ``chunk >> 8``; runs never cross one.
BUCKET_SHIFT = 8
BUCKET_SIZE = 1 << BUCKET_SHIFT
BUCKET_MASK = BUCKET_SIZE - 1


def _run_start(run: list[int]) -> int:
    return run[0]


class ExceptionTable:
    """Completed exceptions ``old_chunk -> new_chunk`` (the kernel's ``complete`` table).

    Lookups use a plain dict.  Runs are kept as the kernel keeps them (an
    inserted exception extends a run it directly follows or precedes, within
    its bucket ``old_chunk >> 8``) only so that :meth:`remove` reports the
    kernel's errors for chunks removed out of order.  A count per bucket lets
    :meth:`covers` answer for a whole bucket (256 chunks) with one lookup.
    """

    def __init__(self) -> None:
        self._map: dict[int, int] = {}
        self._runs: dict[int, list[list[int]]] = {}  # bucket -> sorted [old, new, extra]
        self._count: dict[int, int] = {}             # bucket -> exceptions in it

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, old_chunk: int) -> bool:
        return old_chunk in self._map

    def get(self, old_chunk: int) -> int | None:
        return self._map.get(old_chunk)

    def covers(self, first: int, last: int) -> bool:
        """True if every chunk of ``[first, last]`` has an exception."""
        if first == last:
            return first in self._map
        has, count = self._map.__contains__, self._count
        while first <= last:
            bucket_end = (first | BUCKET_MASK) + 1
            if first & BUCKET_MASK == 0 and bucket_end <= last + 1:
                if count.get(first >> BUCKET_SHIFT) != BUCKET_SIZE:
                    return False
            elif not all(map(has, range(first, min(bucket_end, last + 1)))):
                return False
            first = bucket_end
        return True

    def covers_any(self, first: int, last: int) -> bool:
        """True if some chunk of ``[first, last]`` has an exception."""
        if first == last:
            return first in self._map
        return any(map(self._map.__contains__, range(first, last + 1)))

    def items(self) -> Iterable[tuple[int, int]]:
        return self._map.items()

    def insert(self, old_chunk: int, new_chunk: int) -> None:
        """Add one exception; O(log n) in its bucket (a bisect on the run starts).

        Same result as the kernel's walk of the bucket list: the last run
        starting at or before ``old_chunk`` is extended if the chunk directly
        follows it, else the next run if the chunk directly precedes it, else a
        new run goes between them.  (A chunk already in the table, which the
        kernel never inserts twice, takes the walk itself.)
        """
        bucket = self._runs.setdefault(old_chunk >> BUCKET_SHIFT, [])
        if old_chunk in self._map:
            self._map[old_chunk] = new_chunk
            self._insert_walk(bucket, old_chunk, new_chunk)
            return
        self._map[old_chunk] = new_chunk
        b = old_chunk >> BUCKET_SHIFT
        self._count[b] = self._count.get(b, 0) + 1
        i = bisect.bisect_right(bucket, old_chunk, key=_run_start)
        if i:
            run = bucket[i - 1]
            old, new, extra = run
            if old_chunk == old + extra + 1 and new_chunk == new + extra + 1:
                run[2] += 1
                return
        if i < len(bucket):
            run = bucket[i]
            old, new, extra = run
            if old_chunk == old - 1 and new_chunk == new - 1:
                run[0], run[1], run[2] = old - 1, new - 1, extra + 1
                return
        bucket.insert(i, [old_chunk, new_chunk, 0])

    @staticmethod
    def _insert_walk(bucket: list[list[int]], old_chunk: int, new_chunk: int) -> None:
        for i, run in enumerate(bucket):
            old, new, extra = run
            if old_chunk == old + extra + 1 and new_chunk == new + extra + 1:
                run[2] += 1
                return
            if old_chunk == old - 1 and new_chunk == new - 1:
                run[0], run[1], run[2] = old - 1, new - 1, extra + 1
                return
            if old_chunk < old:
                bucket.insert(i, [old_chunk, new_chunk, 0])
                return
        bucket.append([old_chunk, new_chunk, 0])

    def remove(self, old_chunk: int) -> None:
        """Forget one merged chunk; it must be the first or last of its run."""
        bucket = self._runs.get(old_chunk >> BUCKET_SHIFT, [])
        run = next((r for r in bucket if r[0] <= old_chunk <= r[0] + r[2]), None)
        if run is None:
            raise ExceptionTableError(f"Corruption detected: exception for block {old_chunk} "
                                      "is on disk but not in memory")
        old, _, extra = run
        if not extra:
            bucket.remove(run)
        elif old_chunk == old:
            run[0], run[1], run[2] = run[0] + 1, run[1] + 1, extra - 1
        elif old_chunk == old + extra:
            run[2] -= 1
        else:
            raise ExceptionTableError(f"Attempt to merge block {old_chunk} from the middle of "
                                      f"a chunk range [{old} - {old + extra}]")
        del self._map[old_chunk]
        self._count[old_chunk >> BUCKET_SHIFT] -= 1

    def swap(self, other: ExceptionTable) -> None:
        self._map, other._map = other._map, self._map
        self._runs, other._runs = other._runs, self._runs
        self._count, other._count = other._count, self._count


class ChunkTracker:
    """Counts I/O in flight per chunk; :meth:`wait_idle` waits until a range has none."""

    def __init__(self) -> None:
        self._count: dict[int, int] = {}
        self._idle: dict[int, trio.Event] = {}

    def track(self, chunk: int) -> None:
        self._count[chunk] = self._count.get(chunk, 0) + 1

    def untrack(self, chunk: int) -> None:
        n = self._count[chunk] - 1
        if n:
            self._count[chunk] = n
            return
        del self._count[chunk]
        event = self._idle.pop(chunk, None)
        if event is not None:
            event.set()

    async def wait_idle(self, first_chunk: int, nr_chunks: int = 1) -> None:
        """Return once no tracked I/O is left in ``[first_chunk, first_chunk + nr_chunks)``."""
        for chunk in range(first_chunk, first_chunk + nr_chunks):
            while chunk in self._count:
                await self._idle.setdefault(chunk, trio.Event()).wait()
