"""Where the blocking syscalls of backing files run: inline or in a worker thread.

Measured by ``tools/bench_inline.py``, written down in ``docs/io-policy.md``:
``pread``/``pwrite`` of at most :data:`IoPolicy.inline_max_bytes` (default
1 MiB, the largest request FUSE sends; ``Config.inline_max_bytes`` sets it) run
inline in the trio thread, larger ones, discard and zero-out run in a worker
thread under the policy's limiter (one policy, so one limiter, per daemon).  An
``fdatasync`` (and a flagged read/write) runs inline only while the daemon is
idle (:meth:`IoPolicy.sync`), else in a worker thread.  An inline call is a
cancellation point but yields to the scheduler only once every
:data:`IoPolicy.yield_every` calls, so a loop of inline I/O cannot starve the
other tasks.  A call started in a worker thread is never abandoned.

The syscalls themselves live in ``blockdev.py``; this module only decides
where they run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeVar

import trio

from dmuser.core.config import Config

_T = TypeVar("_T")


class IoPolicy:
    """Where the blocking syscalls of a set of backing files run (see the module docstring).

    One policy is shared by every backing file of a daemon (``DeviceManager``
    makes it from the daemon's :class:`~dmuser.core.config.Config`), so they
    share one worker-thread limiter.
    """

    __slots__ = ("inline_flush", "inline_max_bytes", "limiter", "write_behind_bytes",
                 "yield_every", "_inline_calls", "_syncs")

    def __init__(self, config: Config | None = None) -> None:
        config = config or Config()
        self.inline_max_bytes = config.inline_max_bytes
        self.inline_flush = config.inline_flush
        #: plain writes to a file between two starts of its writeback (0: never)
        self.write_behind_bytes = config.write_behind_bytes
        self.limiter = trio.CapacityLimiter(config.io_threads)
        #: an inline call yields to the trio scheduler once every this many calls
        self.yield_every = config.inline_yield_every
        self._inline_calls = 0
        self._syncs = 0  # sync() calls in progress

    def threads_only(self) -> IoPolicy:
        """This policy for a file whose syscalls may wait for FUSE, maybe for this
        daemon (``core/reentry.py``): every call in a worker thread, nothing inline,
        under the same limiter."""
        twin = copy.copy(self)
        twin.inline_max_bytes, twin.inline_flush = -1, False
        return twin

    async def inline_turn(self) -> None:
        """The scheduling part of one inline syscall: a cancellation point, and a
        full checkpoint (a scheduler round trip, ~10 us) every ``yield_every``
        calls only."""
        self._inline_calls += 1
        if self._inline_calls >= self.yield_every:
            self._inline_calls = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()

    async def sync(self, fn: Callable[..., _T], *args: Any, nbytes: int = 0) -> _T:
        """Run ``fn(*args)``, a call that waits for the disk (``fdatasync``, a
        flagged read or write of ``nbytes``): inline if the daemon is idle and
        ``nbytes`` is at most :attr:`inline_max_bytes`, else in a worker thread.

        With ``inline_flush`` on, the call first yields once, so that every task
        that is ready runs (and a concurrent sync, such as a mirror's other leg,
        registers itself).  If this is then the only sync in progress, no
        worker-thread call of this policy is running and no other task is ready,
        the trio thread would only wait for the disk anyway: the call runs inline,
        which saves the thread hand-off and the wake-up after it (~100-200 us,
        more under load; ``docs/io-policy.md``, "Flushes").  A request that
        arrives during an inline sync waits for it.  Concurrent syncs find each
        other and go to threads, so they still overlap.  Either way the call is a
        cancellation point and a started call is never abandoned.
        """
        self._syncs += 1
        try:
            if self.inline_flush and nbytes <= self.inline_max_bytes:
                await trio.lowlevel.checkpoint()
                if self._syncs == 1 and not self.limiter.borrowed_tokens \
                        and not trio.lowlevel.current_statistics().tasks_runnable:
                    return fn(*args)
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        finally:
            self._syncs -= 1

    async def run(self, fn: Callable[..., _T], *args: Any, nbytes: int = 1 << 30) -> _T:
        """Run a blocking syscall inline or in a worker thread (never abandoned)."""
        if nbytes <= self.inline_max_bytes:
            await self.inline_turn()
            return fn(*args)
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)


#: The policy of backing files opened without one (tests, tools): the defaults.
DEFAULT_POLICY = IoPolicy()
