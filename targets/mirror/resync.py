"""Mirror resync: copying out-of-sync regions between legs (dm-spec §5.10).

Guarantees:

* One region at a time (the region hash's recovery slots), in ascending order
  (the dirty log's resync cursor), and only once the region's writes in flight
  have drained; writes arriving meanwhile wait in the region hash.
* Each copy goes from the leg that is the default *when the copy is issued* to
  every other leg, at the same leg-relative sector; the last region is short
  when the target length is not a multiple of the region size.
* Without ``handle_errors`` kcopyd ignores errors (the region is recorded as
  in sync anyway, as the kernel does); with it the copy stops at the first
  error and the region stays out of sync.  Errors fail the legs with SYNC.
* When every region is in sync for the first time since the set fell out of
  sync, a table event is raised and every leg's errors are forgotten.

Deviation from dm-raid1.c: error bits are mapped to legs, and a read error
blamed, using the *source* leg recorded at issue time.  The kernel uses the
default leg at completion time, which differs only if the default moved while
the copy ran (the kernel's comment assumes it cannot).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from dmuser.services.dm_io import Region
from dmuser.services.kcopyd import KcopydClient, KcopydFlag
from dmuser.targets.mirror.legs import ErrorType, Leg, LegSet
from dmuser.targets.mirror.log import DirtyLog
from dmuser.targets.mirror.region_hash import RegionHash, RhRegion

log = logging.getLogger(__name__)


class Resync:
    """``do_recovery`` and its kcopyd completion, for one mirror set."""

    def __init__(self, rh: RegionHash, dirty_log: DirtyLog, legs: LegSet, target_len: int,
                 table_event: Callable[[], None]) -> None:
        self.rh = rh
        self.log = dirty_log
        self.legs = legs
        self.target_len = target_len
        self.region_size = dirty_log.get_region_size()
        self.nr_regions = -(-target_len // self.region_size)
        self._table_event = table_event

    def do_recovery(self, kc: KcopydClient) -> None:
        """One daemon pass's recovery step: start copies, then update the in-sync flag."""
        self.rh.recovery_prepare()
        while (reg := self.rh.recovery_start()) is not None:
            self._recover(kc, reg)
        if not self.legs.in_sync and self.log.get_sync_count() == self.nr_regions:
            self._table_event()
            self.legs.in_sync = True
            self.legs.reset_flags()

    def _recover(self, kc: KcopydClient, reg: RhRegion) -> None:
        src_leg = self.legs.default
        rel = self.rh.region_to_sector(reg.key)
        count = self.region_size
        if reg.key == self.nr_regions - 1:
            count = self.target_len & (self.region_size - 1) or self.region_size
        src = Region(src_leg.dev, src_leg.offset + rel, count)
        dests = [Region(leg.dev, leg.offset + rel, count)
                 for leg in self.legs if leg is not src_leg]
        flags = KcopydFlag.NONE if self.legs.handle_errors else KcopydFlag.IGNORE_ERROR
        kc.copy(src, dests, flags, self._recovery_done, (reg, src_leg))

    def _recovery_done(self, read_err: bool, write_err: int,
                       context: tuple[RhRegion, Leg]) -> None:
        reg, src_leg = context
        if read_err:
            log.error("Unable to read primary mirror during recovery")
            self.legs.fail(src_leg, ErrorType.SYNC)
        if write_err:
            log.error("Write error during recovery (error = %#x)", write_err)
            others = [leg for leg in self.legs if leg is not src_leg]
            for bit, leg in enumerate(others):
                if write_err >> bit & 1:
                    self.legs.fail(leg, ErrorType.SYNC)
        self.rh.recovery_end(reg, not (read_err or write_err))
