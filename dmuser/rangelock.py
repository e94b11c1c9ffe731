"""An exclusive lock on ranges of sectors.

Writes take the range they touch, widened to whole sectors, so a
read-modify-write of a partial edge sector can never interleave with another
write of the same sector (which would silently undo it).  Non-overlapping
ranges proceed concurrently.  Waiters are woken when any overlapping holder
leaves and re-check; the number of holders is bounded by the FUSE request
concurrency, so a linear scan is cheap.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class RangeLock:
    def __init__(self) -> None:
        self._held: list[tuple[int, int, trio.Event]] = []

    @asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        """Hold ``[start, end)`` exclusively for the body of the ``async with``."""
        while True:
            busy = next((ev for s, e, ev in self._held if s < end and start < e), None)
            if busy is None:
                break
            await busy.wait()
        entry = (start, end, trio.Event())
        self._held.append(entry)
        try:
            yield
        finally:
            self._held.remove(entry)
            entry[2].set()

    def held(self) -> int:
        return len(self._held)
