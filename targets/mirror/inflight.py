"""The bios inside a mirror: each with its region and the event its submitter waits on.

:class:`InFlight` owns every bio the mirror's daemon handles and the daemon's
queues (reads, writes, failures).  It is shared by the mirror set (reads,
suspend, stop) and the write path (``writes.py``).

Guarantees:

* :meth:`InFlight.complete` ends a bio exactly once: it drops the region
  count the write path took (``counted``) and wakes the submitter.
* :meth:`InFlight.abort_all` fails every bio not yet completed, so a stopping
  mirror leaves no submitter waiting.

Everything changes between checkpoints (trio is single-threaded).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from dmuser.core.bio import Bio
from dmuser.core.errors import DmIOError


class MirrorIo:
    """A bio inside the mirror: its region, and the event its submitter waits on."""

    __slots__ = ("bio", "region", "done", "error", "counted")

    def __init__(self, bio: Bio, region: int) -> None:
        self.bio = bio
        self.region = region
        self.done = trio.Event()
        self.error: DmIOError | None = None
        self.counted = False  # inc'd in the region hash; dec'd on completion


class InFlight:
    """Bios in the mirror's machinery and the daemon's queues.

    Args:
        dec_region: the region hash's ``dec``, for a completed counted write.
        wakeup: wakes the mirror daemon.
    """

    def __init__(self, dec_region: Callable[[int], None], wakeup: Callable[[], None]) -> None:
        self._dec_region = dec_region
        self._wakeup = wakeup
        self.reads: list[MirrorIo] = []
        self.writes: list[MirrorIo] = []
        self.failures: list[MirrorIo] = []
        self._ios: set[MirrorIo] = set()

    def take(self) -> tuple[list[MirrorIo], list[MirrorIo], list[MirrorIo]]:
        """Empty the daemon's queues: (reads, writes, failures) of this pass."""
        taken = self.reads, self.writes, self.failures
        self.reads, self.writes, self.failures = [], [], []
        return taken

    def queue(self, queue: list[MirrorIo], io: MirrorIo) -> None:
        """Put ``io`` on one of the queues above and wake the daemon."""
        queue.append(io)
        self._wakeup()

    def track(self, io: MirrorIo) -> None:
        """Count ``io`` as inside the machinery (``abort_all`` fails it)."""
        self._ios.add(io)

    async def wait(self, queue: list[MirrorIo], io: MirrorIo) -> None:
        """Queue ``io`` for the daemon and wait for it; raises its error."""
        self._ios.add(io)
        self.queue(queue, io)
        await io.done.wait()
        if io.error is not None:
            raise io.error

    def complete(self, io: MirrorIo, error: DmIOError | None) -> None:
        """End a bio (bio_endio + mirror_end_io): dec its region, wake its submitter."""
        if io.done.is_set():
            return
        self._ios.discard(io)
        if io.counted:
            io.counted = False
            self._dec_region(io.region)
        io.error = error
        io.done.set()

    def abort_all(self) -> None:
        """Fail every bio not yet completed (queued, held, delayed or in flight)."""
        self.reads, self.writes, self.failures = [], [], []
        for io in list(self._ios):
            io.counted = False
            self.complete(io, DmIOError("mirror: device closed"))
