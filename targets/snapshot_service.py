"""The background half of a snapshot target: its copier, kcopyd client and helper tasks.

A trio nursery belongs to the task that opened it, but a target is opened
(table load) and closed (table destroy) by different control requests.  So
the nurseries live in a service task: :meth:`Service.start` starts it in the
table's nursery (``ti.nursery``, the daemon's service nursery) or, when the
table has none (tables built directly in tests), as a trio system task, and
returns once it is ready; :meth:`Service.stop` asks it to finish and returns
only after every copy, kcopyd job, kcopyd callback and helper task has
finished.  Nothing outlives the target.

Copy-outs do not go through kcopyd: :meth:`Service.copy` is one task that
reads the origin chunk and writes it to the COW chunk (``pread``/``pwrite``
inline for file devices), then runs the caller's completion in the same task.
A kcopyd job costs about nine scheduler passes (job task, a dm-io task per
read and per write, their wake-ups, the callback worker) where this costs one;
at 64 KiB chunks that was a third of a copy-out's time.  Same guarantees as
kcopyd for this use: plain writes (no flush, no FUA), the read is never
written when it failed, memory is bounded (:data:`COPY_POOL_PAGES`; a copy
larger than that runs alone; no FIFO order between waiters), and a started
copy is always finished (``stop()`` waits for it).  kcopyd is still used for
merging and for zeroing discarded chunks.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from dmuser.bio import Bio
from dmuser.dm_io import Region
from dmuser.errors import DmError, DmIOError
from dmuser.kcopyd import KcopydClient
from dmuser.units import SECTOR_SHIFT, pages_for

log = logging.getLogger(__name__)

#: Largest read/write of a copy (sectors): 1 MiB, the largest I/O run inline.
COPY_SLICE = 2048
#: Memory for copies in flight, in pages (16 MiB: 256 copies of 64 KiB chunks).
COPY_POOL_PAGES = 4096

#: ``done(failed)``: a copy's completion, awaited in the copy's task.
CopyDoneFn = Callable[[bool], Awaitable[None]]


class Service:
    """A copier, a kcopyd client and two nurseries: ``io`` tasks (copies, metadata
    writes, full-chunk writes) run to completion; ``bg`` tasks (the merge loop)
    are cancelled by stop()."""

    def __init__(self, name: str, nursery: trio.Nursery | None = None) -> None:
        self.name = name
        self.kc: KcopydClient | None = None
        self._parent = nursery
        self._io: trio.Nursery | None = None
        self._bg: trio.Nursery | None = None
        self._pages_in_use = 0  # copy memory taken (changed only between checkpoints)
        self._pages_freed = trio.Event()
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._started = False

    async def start(self) -> None:
        ready = trio.Event()
        if self._parent is not None:
            self._parent.start_soon(self._main, ready, name=f"snapshot service {self.name}")
        else:
            trio.lowlevel.spawn_system_task(self._main, ready,
                                            name=f"snapshot service {self.name}")
        self._started = True
        await ready.wait()
        if self.kc is None:
            raise DmError(f"{self.name}: Could not create kcopyd client")

    async def _main(self, ready: trio.Event) -> None:
        try:
            # kcopyd closes first (its callbacks may start io tasks), then io, then bg.
            async with trio.open_nursery() as io, KcopydClient() as kc:
                async with trio.open_nursery() as bg:
                    self.kc, self._io, self._bg = kc, io, bg
                    ready.set()
                    await self._stop.wait()
                    bg.cancel_scope.cancel()
                self._bg = None
        except Exception:
            log.exception("%s: snapshot background task failed", self.name)
        finally:
            self._io = self._bg = None
            ready.set()
            self._stopped.set()

    def start_io(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` to completion in the background (stop() waits for it).

        Returns False (and runs nothing) when the service is not running.
        """
        if self._io is None:
            log.error("%s: service not running; dropping %s", self.name, fn)
            return False
        self._io.start_soon(fn, *args)
        return True

    def copy(self, src: Region, dst: Region, done: CopyDoneFn) -> bool:
        """Copy ``src.count`` sectors of ``src`` to ``dst`` in the background, then
        await ``done(failed)`` in the same task.  Returns at once; False (nothing
        started, ``done`` not called) when the service is not running."""
        return self.start_io(self._copy, src, dst, done)

    async def _copy(self, src: Region, dst: Region, done: CopyDoneFn) -> None:
        failed = False
        offset = 0
        while offset < src.count and not failed:
            n = min(COPY_SLICE, src.count - offset)
            pages = pages_for(n)
            # no checkpoint when memory is free: a copy-out costs no extra scheduler pass
            while self._pages_in_use and self._pages_in_use + pages > COPY_POOL_PAGES:
                await self._pages_freed.wait()
            self._pages_in_use += pages
            try:
                buf = bytearray(n << SECTOR_SHIFT)
                await src.dev.submit(Bio.read(src.sector + offset, buf))
                await dst.dev.submit(Bio.write(dst.sector + offset, buf))
            except DmIOError:
                failed = True
            finally:
                self._pages_in_use -= pages
                self._pages_freed.set()
                self._pages_freed = trio.Event()
            offset += n
        await done(failed)

    def start_bg(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` until it returns or stop() cancels it."""
        if self._bg is None:
            raise DmError(f"{self.name}: snapshot service not running")
        self._bg.start_soon(fn, *args)

    async def stop(self) -> None:
        if not self._started:
            return
        self._stop.set()
        await self._stopped.wait()
