"""The bytes every NBD connection of the daemon may hold at once (``docs/nbd.md``, "Memory").

A request's payload (a WRITE's data, read from the socket; a READ's data, until
its reply is sent; the zeros of a WRITE_ZEROES done as writes) is charged to one
:class:`ByteBudget` shared by every connection of the daemon before it is
allocated, and returned once the reply is sent.  Guarantees:

* **Bound.** :attr:`ByteBudget.held` never exceeds :attr:`ByteBudget.total`: a
  request larger than the whole budget is charged the whole budget, so it runs
  alone rather than never (a client may send up to ``nbd.MAX_PAYLOAD``).
* **Order.** Waiters are served first come, first served (a trio.Lock is fair):
  a large request is not starved by a stream of small ones.
* **Backpressure, not failure.** :meth:`ByteBudget.acquire` only waits; the
  connection that waits stops reading requests, so its client is held back by
  TCP.  Nothing is dropped or answered with an error.
* **Cancellation.** A cancelled :meth:`acquire` holds nothing.
"""

from __future__ import annotations

import trio

#: the default budget of a daemon, for all its NBD connections together
NBD_BUDGET = 64 << 20


class ByteBudget:
    """A semaphore counted in bytes, first come, first served."""

    def __init__(self, total: int = NBD_BUDGET) -> None:
        self.total = total
        self.held = 0
        #: the largest :attr:`held` seen (what the tests check)
        self.peak = 0
        self._queue = trio.Lock()
        self._freed = trio.Event()

    async def acquire(self, n: int) -> int:
        """Take ``n`` bytes (at most :attr:`total`), waiting while they do not fit;
        the amount taken, to hand to :meth:`release`.  Without waiters and with
        room, it returns without a trip through the scheduler."""
        cost = min(n, self.total)
        if not cost:
            return 0
        if self.held + cost > self.total or self._queue.locked():
            async with self._queue:  # the head of the queue waits for room
                while self.held + cost > self.total:
                    self._freed = trio.Event()
                    await self._freed.wait()
                self._take(cost)
        else:
            self._take(cost)
        return cost

    def _take(self, cost: int) -> None:
        self.held += cost
        self.peak = max(self.peak, self.held)

    def release(self, cost: int) -> None:
        """Return what :meth:`acquire` took."""
        if cost:
            self.held -= cost
            self._freed.set()
