"""The background half of a snapshot target: its kcopyd client and helper tasks.

A trio nursery belongs to the task that opened it, but a target is opened
(table load) and closed (table destroy) by different control requests.  So
the nurseries live in a trio *system task*: :meth:`Service.start` spawns it and
returns once it is ready; :meth:`Service.stop` asks it to finish and returns
only after every kcopyd job, kcopyd callback and helper task has finished.
Nothing outlives the target.  (If the core grows a per-device service nursery,
only this module changes.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from dmuser.errors import DmError
from dmuser.kcopyd import KcopydClient

log = logging.getLogger(__name__)


class Service:
    """A kcopyd client and two nurseries: ``io`` tasks (metadata writes, full-chunk
    writes) run to completion; ``bg`` tasks (the merge loop) are cancelled by stop()."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.kc: KcopydClient | None = None
        self._io: trio.Nursery | None = None
        self._bg: trio.Nursery | None = None
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._started = False

    async def start(self) -> None:
        ready = trio.Event()
        trio.lowlevel.spawn_system_task(self._main, ready, name=f"snapshot service {self.name}")
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
