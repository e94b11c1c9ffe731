"""Region hash (dm-spec §5.6): states, pending counts, recovery slots, the log-ordering rules."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.target import TargetContext
from dmuser.targets.mirror.log.core import CoreLog
from dmuser.targets.mirror.region_hash import RegionHash, RegionState

RS = 8  # region size in sectors
BEGIN = 100


class RecordingLog(CoreLog):
    """A core log that records the calls the region hash makes."""

    def __init__(self, nr_regions: int, *args: str) -> None:
        super().__init__(TargetContext(BEGIN, nr_regions * RS, "t", lambda w: None),  # type: ignore[arg-type, return-value]
                         [str(RS), *args])
        self.calls: list[str] = []

    def mark_region(self, region: int) -> None:
        self.calls.append(f"mark {region}")
        super().mark_region(region)

    def clear_region(self, region: int) -> None:
        self.calls.append(f"clear {region}")
        super().clear_region(region)

    async def flush(self) -> None:
        self.calls.append("flush")
        await trio.lowlevel.checkpoint()


class Harness:
    def __init__(self, nr_regions: int = 8, *log_args: str) -> None:
        self.log = RecordingLog(nr_regions, *log_args)
        self.dispatched: list[Any] = []
        self.wakeups = 0
        self.rh = RegionHash(self.log, BEGIN, 1, self.dispatched.extend, self._wake)

    def _wake(self) -> None:
        self.wakeups += 1


def wbio(region: int, flags: ReqFlag = ReqFlag.NONE) -> Bio:
    return Bio.write(BEGIN + region * RS + 1, bytes(512), flags)


def test_addressing() -> None:
    h = Harness()
    assert h.rh.bio_to_region(wbio(3)) == 3
    assert h.rh.bio_to_region(Bio.write(BEGIN + RS - 1, bytes(512))) == 0
    assert h.rh.region_to_sector(5) == 5 * RS


def test_missing_region_state_comes_from_log_without_an_entry() -> None:
    h = Harness(8, "nosync")
    assert h.rh.get_state(2) is RegionState.CLEAN
    h.log.set_region_sync(2, False)
    assert h.rh.get_state(2) is RegionState.NOSYNC
    assert h.rh.regions == {}


async def test_write_cycle_clean_dirty_clean() -> None:
    h = Harness(8, "nosync")
    h.rh.inc(3)
    h.rh.inc(3)
    assert h.rh.get_state(3) is RegionState.DIRTY
    assert h.log.calls == ["mark 3"]  # marked once, on the CLEAN -> DIRTY edge
    assert not h.log.is_clean(3)
    h.rh.dec(3)
    assert h.rh.get_state(3) is RegionState.DIRTY and h.wakeups == 0
    h.rh.dec(3)
    assert h.rh.get_state(3) is RegionState.CLEAN and h.wakeups == 1
    assert h.rh.lists["clean"].keys() == {3}
    assert not h.log.is_clean(3)  # only update_states sets the bit again ...
    await h.rh.update_states(True)
    assert h.log.calls == ["mark 3", "clear 3", "flush"]  # ... followed by the log flush
    assert h.log.is_clean(3) and h.rh.regions == {}


async def test_nosync_region_stays_nosync_after_writes() -> None:
    h = Harness(8)
    h.rh.inc(4)
    assert h.rh.get_state(4) is RegionState.NOSYNC and h.log.calls == []
    h.rh.dec(4)
    await h.rh.update_states(True)
    assert h.rh.get_state(4) is RegionState.NOSYNC and 4 in h.rh.regions


async def test_flush_failure_makes_regions_nosync() -> None:
    h = Harness(8, "nosync")
    h.rh.mark_nosync(Bio.flush())
    assert h.rh.flush_failure and h.rh.regions == {}
    h.rh.inc(2)
    h.rh.dec(2)
    assert h.rh.get_state(2) is RegionState.NOSYNC


def test_mark_nosync_write() -> None:
    h = Harness(8, "nosync")
    h.rh.mark_nosync(Bio(Op.DISCARD, BEGIN, RS))  # discards never degrade
    assert h.log.get_sync_count() == 8
    h.rh.inc(6)
    h.rh.mark_nosync(wbio(6))
    assert h.rh.get_state(6) is RegionState.NOSYNC
    assert h.log.get_sync_count() == 7 and not h.log.in_sync(6)


async def test_no_recovery_before_start() -> None:
    h = Harness(4)
    h.rh.recovery_prepare()
    assert h.rh.recovery_start() is None and h.rh.recovery_in_flight == 0
    h.rh.start_recovery()
    h.rh.recovery_prepare()
    reg = h.rh.recovery_start()
    assert reg is not None and reg.key == 0 and reg.state is RegionState.RECOVERING
    h.rh.recovery_prepare()  # only one slot
    assert h.rh.recovery_start() is None and h.rh.recovery_in_flight == 1


async def test_recovery_success_then_next_region() -> None:
    h = Harness(3)
    h.rh.start_recovery()
    order = []
    for _ in range(3):
        h.rh.recovery_prepare()
        reg = h.rh.recovery_start()
        assert reg is not None
        order.append(reg.key)
        h.rh.recovery_end(reg, True)
        await h.rh.update_states(True)
    assert order == [0, 1, 2]
    assert h.log.get_sync_count() == 3 and all(h.log.is_clean(r) for r in range(3))
    assert h.rh.recovery_in_flight == 0 and h.rh.regions == {}


@pytest.mark.parametrize(("errors_handled", "in_sync"), [(True, False), (False, True)])
async def test_failed_recovery(errors_handled: bool, in_sync: bool) -> None:
    h = Harness(2)
    h.rh.start_recovery()
    h.rh.recovery_prepare()
    reg = h.rh.recovery_start()
    assert reg is not None
    h.rh.recovery_end(reg, False)
    await h.rh.update_states(errors_handled)
    assert h.log.in_sync(0) is in_sync
    assert "clear 0" not in h.log.calls  # the clean bit is never set by a failed resync
    assert h.rh.recovery_in_flight == 0


async def test_recovery_waits_for_writes_in_flight_and_delays_new_ones() -> None:
    h = Harness(2)
    h.rh.inc(0)                # NOSYNC region with a write in flight
    h.rh.start_recovery()
    h.rh.recovery_prepare()
    assert h.rh.get_state(0) is RegionState.RECOVERING
    assert h.rh.recovery_start() is None          # not quiesced yet
    h.rh.delay("late-write", 0)
    h.rh.dec(0)                                   # last write done: quiesced
    reg = h.rh.recovery_start()
    assert reg is not None and reg.key == 0
    h.rh.recovery_end(reg, True)
    assert h.dispatched == []
    await h.rh.update_states(True)
    assert h.dispatched == ["late-write"]         # handed back when recovery ends


async def test_mark_nosync_of_recovering_region_ends_its_recovery() -> None:
    h = Harness(2)
    h.rh.inc(0)
    h.rh.start_recovery()
    h.rh.recovery_prepare()
    assert h.rh.recovery_in_flight == 1
    h.rh.mark_nosync(wbio(0))
    assert h.rh.get_state(0) is RegionState.NOSYNC and h.rh.recovery_in_flight == 0
    h.rh.dec(0)
    assert h.rh.recovery_start() is None
    h.rh.recovery_prepare()  # the slot is free again; the cursor has moved on
    reg = h.rh.recovery_start()
    assert reg is not None and reg.key == 1


async def test_stop_recovery_waits_for_the_slot() -> None:
    h = Harness(2)
    h.rh.start_recovery()
    h.rh.recovery_prepare()
    reg = h.rh.recovery_start()
    assert reg is not None
    stopped = trio.Event()

    async def stopper() -> None:
        await h.rh.stop_recovery()
        await h.rh.wait_recovery_stopped()
        stopped.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stopper)
        await trio.testing.wait_all_tasks_blocked()
        assert not stopped.is_set()
        h.rh.recovery_end(reg, True)
        await h.rh.update_states(True)
    assert stopped.is_set()
    h.rh.recovery_prepare()  # no slot any more
    assert h.rh.recovery_start() is None
