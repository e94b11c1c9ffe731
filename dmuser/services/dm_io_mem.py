"""dm-io memory descriptions and the page reservation (part of :mod:`dmuser.services.dm_io`).

Split out of ``dm_io.py`` for size; import these names from :mod:`dmuser.services.dm_io`.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from dmuser.core.units import PAGE_SIZE


class DmIoMem:
    """Memory for a request, seen as a list of byte segments.

    Subclasses only build the segment list; this base gives every kind the same
    operations: :meth:`gather` (data for a write), :meth:`read_view` (where a
    read lands) and :meth:`scatter` (copy read data back).
    """

    def __init__(self, segments: Sequence[memoryview | bytes | bytearray]) -> None:
        self._segs = [v for v in (memoryview(s).cast("B") for s in segments) if len(v)]
        self._starts = [0]
        for seg in self._segs:
            self._starts.append(self._starts[-1] + len(seg))
        self.nbytes = self._starts.pop()

    @property
    def readonly(self) -> bool:
        return any(seg.readonly for seg in self._segs)

    def _pieces(self, offset_bytes: int, len_bytes: int) -> list[memoryview]:
        """The memory's own views covering the range, in order (no copy)."""
        if offset_bytes < 0 or len_bytes < 0 or offset_bytes + len_bytes > self.nbytes:
            raise ValueError(f"bytes {offset_bytes}+{len_bytes} outside memory of {self.nbytes}")
        i = bisect.bisect_right(self._starts, offset_bytes) - 1
        rel, left, pieces = offset_bytes - self._starts[i], len_bytes, []
        while left:
            piece = self._segs[i][rel : rel + left]
            pieces.append(piece)
            left, i, rel = left - len(piece), i + 1, 0
        return pieces

    def gather(self, offset_bytes: int, len_bytes: int) -> memoryview:
        """The bytes to write: a slice of the memory if contiguous, else one copy."""
        pieces = self._pieces(offset_bytes, len_bytes)
        if len(pieces) == 1:
            return pieces[0]
        return memoryview(b"".join(pieces))

    def read_view(self, offset_bytes: int, len_bytes: int) -> tuple[memoryview, bool]:
        """Where to read the range: ``(view, True)`` in place, or ``(scratch, False)``,
        meaning the caller must :meth:`scatter` the scratch buffer afterwards."""
        pieces = self._pieces(offset_bytes, len_bytes)
        if len(pieces) == 1:
            return pieces[0], True
        return memoryview(bytearray(len_bytes)), False

    def scatter(self, offset_bytes: int, data: memoryview) -> None:
        """Copy ``data`` into the memory starting at ``offset_bytes``."""
        pos = 0
        for piece in self._pieces(offset_bytes, len(data)):
            piece[:] = data[pos : pos + len(piece)]
            pos += len(piece)


class PageListMem(DmIoMem):
    """DM_IO_PAGE_LIST: 4 KiB pages, data starting ``offset`` bytes into the first."""

    def __init__(self, pages: Sequence[bytearray | memoryview], offset: int = 0) -> None:
        views = [memoryview(p).cast("B") for p in pages]
        if any(len(v) != PAGE_SIZE for v in views):
            raise ValueError(f"every page must be {PAGE_SIZE} bytes")
        if views and not 0 <= offset < PAGE_SIZE:
            raise ValueError(f"offset {offset} outside the first page")
        super().__init__([views[0][offset:], *views[1:]] if views else [])


class VecMem(DmIoMem):
    """DM_IO_BVEC: a vector of segments, used in order."""

    def __init__(self, segments: Sequence[memoryview]) -> None:
        super().__init__(segments)


class BufferMem(DmIoMem):
    """DM_IO_KMEM / DM_IO_VMA: one contiguous buffer; never copied."""

    def __init__(self, buf: memoryview | bytes | bytearray) -> None:
        super().__init__([buf])


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    nr_pages: int
    pages_in_use: int
    tasks_waiting: int


class PagePool:
    """A counted reservation of pages with FIFO waiters.

    ``acquire(n)`` succeeds when ``n`` pages are free, or when nothing at all is
    in use (so a request larger than the pool runs alone instead of never).
    Waiters are served strictly in arrival order, so a large request is not
    starved by a stream of small ones.  Shared by dm-io and kcopyd.
    """

    def __init__(self, nr_pages: int) -> None:
        if nr_pages < 0:
            raise ValueError("nr_pages must be >= 0")
        self._total = nr_pages
        self._in_use = 0
        # Changed only between checkpoints: (pages wanted, granted event), FIFO.
        self._waiters: deque[tuple[int, trio.Event]] = deque()

    def _fits(self, n: int) -> bool:
        return self._in_use == 0 or self._in_use + n <= self._total

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            n, event = self._waiters.popleft()
            self._in_use += n
            event.set()

    def grow(self, nr_pages: int) -> None:
        if nr_pages < 0:
            raise ValueError("nr_pages must be >= 0")
        self._total += nr_pages
        self._wake()

    def shrink(self, nr_pages: int) -> None:
        if not 0 <= nr_pages <= self._total:
            raise ValueError(f"cannot give back {nr_pages} of {self._total} pages")
        self._total -= nr_pages

    async def acquire(self, nr_pages: int) -> None:
        """Take ``nr_pages``; a checkpoint.  Cancellation leaves nothing taken."""
        if not self._waiters and self._fits(nr_pages):
            await trio.lowlevel.checkpoint_if_cancelled()
            self._in_use += nr_pages
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        entry = (nr_pages, trio.Event())
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry[1].is_set():
                self.release(nr_pages)
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def try_acquire(self, nr_pages: int) -> bool:
        """Take ``nr_pages`` at once if no one waits and they fit; never a checkpoint."""
        if self._waiters or not self._fits(nr_pages):
            return False
        self._in_use += nr_pages
        return True

    def release(self, nr_pages: int) -> None:
        """Give pages back and grant them to waiters in arrival order."""
        self._in_use -= nr_pages
        self._wake()

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(self._total, self._in_use, len(self._waiters))
