"""The ``core`` dirty log: every bitset in memory (dm-spec §5.4, dm-log.c core_*).

Table arguments: ``<region_size> [sync|nosync]``.

* ``region_count`` = ceil(target length / region_size); each bitset is
  round_up(region_count, 64) / 8 bytes.
* At construction: clean bits all 1 (padding included), recovering bits all 0;
  sync bits all 1 and sync_count = region_count with ``nosync``, otherwise all
  0 and 0 (``sync`` and the default behave the same: a full resync on every
  table load).
* Nothing persists.  ``resume`` only rewinds the resync cursor (sync_search).

:class:`CoreLog` also implements the bitset logic the ``disk`` log shares
(``create_log_context`` and the ``core_*`` methods of the kernel).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from dmuser.core.args import U32_MAX, parse_uint
from dmuser.core.target import StatusType, TargetContext
from dmuser.formats.disklog import bitset_bytes
from dmuser.targets.mirror.log.base import Bitset, DirtyLog, DirtyLogError, EventFn, FlushCallback


class SyncMode(enum.Enum):
    DEFAULT = ""
    FORCESYNC = "sync"
    NOSYNC = "nosync"


class CoreLog(DirtyLog):
    name = "core"

    def __init__(self, ti: TargetContext, args: Sequence[str], *,
                 flush_callback: FlushCallback | None = None,
                 table_event: EventFn | None = None) -> None:
        super().__init__(ti, args, flush_callback=flush_callback, table_event=table_event)
        self._create_context(args)

    # -- create_log_context ---------------------------------------------------------------

    def _create_context(self, args: Sequence[str]) -> None:
        """Parse ``<region_size> [sync|nosync]`` and allocate the bitsets."""
        if not 1 <= len(args) <= 2:
            raise DirtyLogError("wrong number of arguments to dirty region log")
        self.sync = SyncMode.DEFAULT
        if len(args) > 1:
            if args[1] == "sync":
                self.sync = SyncMode.FORCESYNC
            elif args[1] == "nosync":
                self.sync = SyncMode.NOSYNC
            else:
                raise DirtyLogError(f"unrecognised sync argument to dirty region log: {args[1]}")
        size = parse_uint(args[0], U32_MAX)
        if size is None or size < 2 or size > self.ti.len or size & (size - 1):
            raise DirtyLogError(f"invalid region size {args[0]}")
        self.region_size = size
        self.region_count = -(-self.ti.len // size)
        self.bitset_size = bitset_bytes(self.region_count)
        self.touched_cleaned = self.touched_dirtied = False
        self.flush_failed = False
        self._alloc_clean_bits()
        self.clean_bits.fill(True)
        self.sync_bits = Bitset(bytearray(self.bitset_size), self)
        self.sync_bits.fill(self.sync is SyncMode.NOSYNC)
        self.sync_count = self.region_count if self.sync is SyncMode.NOSYNC else 0
        self.recovering_bits = Bitset(bytearray(self.bitset_size), self)
        self.sync_search = 0

    def _alloc_clean_bits(self) -> None:
        self.clean_bits = Bitset(bytearray(self.bitset_size), self)

    # -- the dirty-log interface ----------------------------------------------------------

    def in_sync(self, region: int) -> bool:
        return self.sync_bits.test(region)

    def is_clean(self, region: int) -> bool:
        return self.clean_bits.test(region)

    def mark_region(self, region: int) -> None:
        # dmuser: a bit already clear is left alone, so touched_dirtied means "a
        # bit went from clean to dirty".  The kernel sets it anyway, which costs
        # the disk log a log write and flush per daemon pass for nothing.
        if self.clean_bits.test(region):
            self.clean_bits.clear(region)

    def mark_is_durable(self, region: int) -> bool:
        """The core log persists nothing: a mark needs no flush."""
        return True

    def clear_region(self, region: int) -> None:
        if not self.flush_failed:
            self.clean_bits.set(region)

    def get_resync_work(self) -> int | None:
        if self.sync_search >= self.region_count:
            return None
        while True:
            region = self.sync_bits.find_next_zero(self.sync_search, self.region_count)
            self.sync_search = region + 1
            if region >= self.region_count:
                return None
            if not self.recovering_bits.test(region):
                break
        self.recovering_bits.set(region)
        return region

    def set_region_sync(self, region: int, in_sync: bool) -> None:
        self.recovering_bits.clear(region)
        if in_sync:
            # The kernel counts unconditionally, even if the bit was already set.
            self.sync_bits.set(region)
            self.sync_count += 1
        elif self.sync_bits.test(region):
            self.sync_count -= 1
            self.sync_bits.clear(region)

    def get_sync_count(self) -> int:
        return self.sync_count

    async def resume(self) -> None:
        self.sync_search = 0

    def _sync_word(self) -> str:
        return "" if self.sync is SyncMode.DEFAULT else f"{self.sync.value} "

    def status(self, kind: StatusType) -> str:
        if kind is StatusType.INFO:
            return "1 core"
        nargs = 1 if self.sync is SyncMode.DEFAULT else 2
        return f"core {nargs} {self.region_size} {self._sync_word()}"
