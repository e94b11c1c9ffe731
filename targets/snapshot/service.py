"""The background half of a snapshot target: its kcopyd client and helper tasks.

A trio nursery belongs to the task that opened it, but a target is opened
(table load) and closed (table destroy) by different control requests.  So
the nurseries live in a service task: :meth:`Service.start` starts it in the
table's nursery (``ti.nursery``, the daemon's service nursery) or, when the
table has none (tables built directly in tests), as a trio system task, and
returns once it is ready; :meth:`Service.stop` asks it to finish and returns
only after every copy, kcopyd job, kcopyd callback and helper task has
finished.  Nothing outlives the target.

Copy-outs that are not copied inline (``copy_out.py``) go through kcopyd
(:meth:`Service.copy`): one job per copy-out (a run of consecutive chunks,
``copy_out.start_copies``) on the service's
:class:`~dmuser.services.kcopyd.KcopydClient`, whose callback worker
awaits the caller's completion (the snapshot's ordered commit loop), as the
kernel runs ``copy_callback`` in kcopyd's thread.  kcopyd gives the
guarantees a copy-out needs: plain writes (no flush, no FUA), a failed read
is never written, memory is bounded by the client's page pool
(``Config.snapshot_copy_pool_pages``, 16 MiB by default: 256 copy-outs of
64 KiB chunks; a copy larger than the pool runs alone), and a
started copy is always finished (``stop()`` waits for the client, which waits
for every job and callback).  The client also runs merge copies and the
zeroing of discarded chunks.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from dmuser.core.errors import DmError
from dmuser.services.dm_io import Region
from dmuser.services.kcopyd import KcopydClient, KcopydFlag

log = logging.getLogger(__name__)

#: ``done(failed)``: a copy's completion, awaited by the kcopyd callback worker.
CopyDoneFn = Callable[[bool], Awaitable[None]]


def _copied(read_err: bool, write_err: int, done: CopyDoneFn) -> Awaitable[None]:
    """kcopyd callback of a copy: the caller's completion, awaited by the worker."""
    return done(read_err or bool(write_err))


class Service:
    """A kcopyd client (copy-outs, merge copies, zeroing) and two nurseries:
    ``io`` tasks (metadata writes, full-chunk writes) run to completion; ``bg``
    tasks (the merge loop) are cancelled by stop()."""

    def __init__(self, name: str, nursery: trio.Nursery | None = None,
                 pool_pages: int = 4096) -> None:
        self.name = name
        self._pool_pages = pool_pages
        self._kc: KcopydClient | None = None
        self._parent = nursery
        self._io: trio.Nursery | None = None
        self._bg: trio.Nursery | None = None
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
        if self._kc is None:
            raise DmError(f"{self.name}: Could not create kcopyd client")

    async def _main(self, ready: trio.Event) -> None:
        try:
            # kcopyd closes first (its callbacks may start io tasks), then io, then bg.
            async with trio.open_nursery() as io, KcopydClient(self._pool_pages) as kc:
                async with trio.open_nursery() as bg:
                    self._kc, self._io, self._bg = kc, io, bg
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

    @property
    def running(self) -> bool:
        """start_io() and copy() would start their work (not stopped, not stopping)."""
        return self._io is not None and self._kc is not None and self._kc.running

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
        """Copy ``src.count`` sectors of ``src`` to ``dst`` as a kcopyd job, then
        await ``done(failed)`` in the client's callback worker.  Returns at once;
        False (nothing started, ``done`` not called) when the service is not
        running."""
        kc = self._kc
        if kc is None or not kc.running:
            log.error("%s: service not running; dropping a copy", self.name)
            return False
        kc.copy(src, [dst], KcopydFlag.NONE, _copied, done)
        return True

    async def copy_wait(self, src: Region, dst: Region) -> tuple[bool, bool]:
        """Copy as one kcopyd job and wait for it (a merge step): (read failed, write failed)."""
        result = await self._client().copy_wait(src, [dst])
        return result.read_err, bool(result.write_err)

    async def zero(self, dst: Region) -> bool:
        """Zero ``dst`` as one kcopyd job and wait for it; True if it failed."""
        result = await self._client().zero_wait([dst])
        return bool(result.write_err)

    def _client(self) -> KcopydClient:
        if self._kc is None or not self._kc.running:
            raise DmError(f"{self.name}: snapshot service not running")
        return self._kc

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
