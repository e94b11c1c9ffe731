"""The dirty region log protocol for mirror (the kernel's ``dm-dirty-log.h``).

A dirty log keeps three bitsets over the mirror's regions (dm-spec §5.3):

* ``clean_bits``: 1 = no write in flight that might leave the legs different.
  These are the bits a persistent log stores.
* ``sync_bits``: 1 = the region is known identical on every leg.
* ``recovering_bits``: 1 = handed out for resync.

Bit ``i`` is bit ``i % 8`` of byte ``i // 8`` (little-endian bit order).  Every
bit *set* through the helpers sets ``touched_cleaned``, every bit *cleared* sets
``touched_dirtied``, in any of the three bitsets; a persistent log's ``flush``
acts on these two flags.  (dmuser: ``mark_region`` of a region whose clean bit
is already 0 changes nothing and touches nothing; the kernel sets
``touched_dirtied`` anyway.)

A constructor that rejects its arguments raises :class:`DirtyLogError` with
the kernel's DMWARN text; mirror turns any failure into its table error "Error
creating mirror dirty log", as the kernel does.

Concurrency: the mirror calls every mutating method from its single daemon task
(or from suspend/resume hooks while that task is idle); ``in_sync`` and
``is_clean`` only read, and may be called from anywhere.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from dmuser.core.target import StatusType, TargetContext


class DirtyLogError(Exception):
    """A dirty log constructor failed; the message is the kernel's DMWARN line."""


#: The mirror's flush callback: an empty PREFLUSH to every leg; raises DmIOError on failure.
FlushCallback = Callable[[], Awaitable[None]]
#: Raise a table event (dm_table_event).
EventFn = Callable[[], None]


class Bitset:
    """A little-endian bitset of whole 64-bit words, like the kernel's ``unsigned long`` sets."""

    __slots__ = ("buf", "owner")

    def __init__(self, buf: bytearray | memoryview, owner: DirtyLog) -> None:
        self.buf = buf
        self.owner = owner

    def test(self, bit: int) -> bool:
        return bool(self.buf[bit >> 3] >> (bit & 7) & 1)

    def set(self, bit: int) -> None:
        self.buf[bit >> 3] |= 1 << (bit & 7)
        self.owner.touched_cleaned = True

    def clear(self, bit: int) -> None:
        self.buf[bit >> 3] &= ~(1 << (bit & 7)) & 0xFF
        self.owner.touched_dirtied = True

    def fill(self, value: bool) -> None:
        """Set every byte (no touched bookkeeping: used at construction)."""
        self.buf[:] = (b"\xff" if value else b"\0") * len(self.buf)

    def find_next_zero(self, start: int, limit: int) -> int:
        """The first zero bit in ``[start, limit)``, or ``limit`` if there is none."""
        bit = start
        while bit < limit:
            byte = self.buf[bit >> 3]
            if byte == 0xFF and not bit & 7:
                bit += 8
                continue
            if not byte >> (bit & 7) & 1:
                return bit
            bit += 1
        return limit

    def weight(self) -> int:
        """Number of 1 bits in the whole buffer (padding included), like memweight()."""
        return int.from_bytes(self.buf, "little").bit_count()


class DirtyLog:
    """Base class and protocol of the dirty logs (``struct dm_dirty_log_type``).

    Attributes:
        name: registry name, printed in status.
        region_size: sectors per region.
        region_count: ceil(target length / region_size).
        touched_cleaned / touched_dirtied: see the module docstring.
    """

    name: str = ""
    region_size: int
    region_count: int
    touched_cleaned: bool = False
    touched_dirtied: bool = False

    def __init__(self, ti: TargetContext, args: Sequence[str], *,
                 flush_callback: FlushCallback | None = None,
                 table_event: EventFn | None = None) -> None:
        self.ti = ti
        self.flush_callback = flush_callback
        self.table_event = table_event or (lambda: None)

    def get_region_size(self) -> int:
        return self.region_size

    def in_sync(self, region: int) -> bool:
        """The sync bit.  Never blocks, never fails (core and disk)."""
        raise NotImplementedError

    def is_clean(self, region: int) -> bool:
        raise NotImplementedError

    def mark_region(self, region: int) -> None:
        """Clear the clean bit: a write is about to be in flight."""
        raise NotImplementedError

    def mark_is_durable(self, region: int) -> bool:
        """True when a write to ``region`` may be issued without a log flush: its
        dirty mark is already as durable as this log makes marks, and
        :meth:`mark_region` of it would change nothing that a flush must write.
        Never blocks.  (dmuser: lets mirror skip its daemon pass; the default
        says False, which is always safe.)"""
        return False

    def clear_region(self, region: int) -> None:
        """Set the clean bit, unless a flush has ever failed (then nothing, until reload)."""
        raise NotImplementedError

    def get_resync_work(self) -> int | None:
        """The next region to resync (ascending, from the sync_search cursor), or None."""
        raise NotImplementedError

    def set_region_sync(self, region: int, in_sync: bool) -> None:
        raise NotImplementedError

    def get_sync_count(self) -> int:
        raise NotImplementedError

    async def flush(self) -> None:
        """Make the log's state durable.  Raises DmIOError when that failed."""

    async def presuspend(self) -> None:
        pass

    async def postsuspend(self) -> None:
        pass

    async def resume(self) -> None:
        """Called on every resume, including the first.  Raises DmIOError on failure."""

    def status(self, kind: StatusType) -> str:
        raise NotImplementedError
