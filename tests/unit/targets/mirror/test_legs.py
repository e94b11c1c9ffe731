"""mirror read balancing (dmuser extension, ``message 0 read_balance on|off``).

Off by default (the kernel reads the default leg); on, reads of regions in
sync take turns over the legs without errors.  A leg with errors, or a region
out of sync, is never read from anything but the healthy default path.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from support.fakes import Entry, RecordingDevice
from support.targets import TYPES, DictResolver

from dmuser.core.errors import TargetArgError
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.table import Table, TargetServices, parse_table
from dmuser.core.target import StatusType
from dmuser.targets.mirror.target import MirrorTarget

S = 512


class Rig:
    def __init__(self, nursery: trio.Nursery | None, names: str, sectors: int = 64) -> None:
        self.nursery = nursery
        self.journal: list[Entry] = []
        # identical legs: same data
        self.devs = {n: RecordingDevice(sectors, n, journal=self.journal, seed=7) for n in names}
        self.resolver = DictResolver(self.devs)
        self.md = MappedDevice("m")

    async def start(self, table: str) -> MirrorTarget:
        table_ = await Table.build("t", parse_table(table), self.resolver.get,
                                   self.resolver.release, TargetServices(nursery=self.nursery),
                types=TYPES)
        await self.md.load(table_)
        await self.md.resume()
        await trio.testing.wait_all_tasks_blocked()
        assert self.md.live is not None
        target = self.md.live.targets[0]
        assert isinstance(target, MirrorTarget)
        return target

    async def read_each(self, count: int, nr: int = 8) -> list[str]:
        """Read ``count`` times; the legs that served the reads, in order."""
        self.journal.clear()
        for i in range(count):
            await self.md.read((i * nr) % 64, nr)
        return [e.dev for e in self.journal if e.kind == "read" and e.nr_sectors]

    async def close(self) -> None:
        await self.md.close()
        assert self.resolver.outstanding() == 0


@pytest.fixture
async def svc(nursery: trio.Nursery) -> trio.Nursery:
    """The service nursery a :class:`Rig` hands to its tables."""
    return nursery


async def test_off_by_default_reads_the_default_leg(svc: trio.Nursery) -> None:
    rig = Rig(svc, "ab")
    target = await rig.start("0 64 mirror core 2 16 nosync 2 a 0 b 0")
    assert target.ms.legs.read_balance is False
    assert await rig.read_each(6) == ["a"] * 6
    await rig.close()


async def test_on_alternates_legs_and_off_restores(svc: trio.Nursery) -> None:
    rig = Rig(svc, "abc")
    target = await rig.start("0 64 mirror core 2 16 nosync 3 a 0 b 0 c 0")
    assert await target.message(["read_balance", "on"]) is None
    got = await rig.read_each(6)
    assert got == ["a", "b", "c", "a", "b", "c"]
    data = bytes(rig.devs["a"].buf[:64 * S])
    assert await rig.md.read(0, 64) == data
    await target.message(["read_balance", "off"])
    assert await rig.read_each(4) == ["a"] * 4
    # the extension changes neither the table nor the status strings
    assert target.status(StatusType.TABLE) == "core 2 16 nosync 3 a 0 b 0 c 0"
    assert target.status(StatusType.INFO) == "3 a b c 4/4 1 AAA 1 core"
    await rig.close()


async def test_failed_leg_is_never_read(svc: trio.Nursery) -> None:
    rig = Rig(svc, "abc")
    target = await rig.start("0 64 mirror core 2 16 nosync 3 a 0 b 0 c 0")
    await target.message(["read_balance", "on"])
    rig.devs["b"].fail_read = True
    await rig.read_each(3)  # b fails once, the read is retried elsewhere
    assert target.ms.legs.legs[1].error_count
    got = await rig.read_each(8)
    assert "b" not in got and set(got) == {"a", "c"}
    await rig.close()


async def test_leg_with_write_error_is_never_read(svc: trio.Nursery) -> None:
    rig = Rig(svc, "ab")
    target = await rig.start("0 64 mirror core 2 16 nosync 2 a 0 b 0")
    await target.message(["read_balance", "on"])
    rig.devs["b"].fail_write = True
    await rig.md.write(0, b"\x55" * 8 * S)  # reaches a; b now has a write error
    await trio.testing.wait_all_tasks_blocked()
    got = await rig.read_each(8)
    assert got == ["a"] * 8
    assert await rig.md.read(0, 8) == b"\x55" * 8 * S
    await rig.close()


async def test_out_of_sync_region_reads_only_the_default_leg(svc: trio.Nursery) -> None:
    rig = Rig(svc, "ab")
    rig.devs["b"].buf[:] = bytes(len(rig.devs["b"].buf))  # b differs: needs resync
    rig.devs["b"].write_gate = trio.Event()  # resync copies to b never finish
    target = await rig.start("0 64 mirror core 2 16 sync 2 a 0 b 0")
    await target.message(["read_balance", "on"])
    assert target.ms.log.get_sync_count() == 0
    got = await rig.read_each(8)
    assert got and set(got) == {"a"}
    assert await rig.md.read(32, 8) == bytes(rig.devs["a"].buf[32 * S : 40 * S])
    rig.devs["b"].write_gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert target.ms.log.get_sync_count() == 4
    got = await rig.read_each(4)
    assert got == ["a", "b", "a", "b"]
    await rig.close()


@pytest.mark.parametrize(("words", "error"), [
    (["read_balance"], "read_balance takes one argument: on or off"),
    (["read_balance", "yes"], "read_balance takes one argument: on or off"),
    (["read_balance", "on", "x"], "read_balance takes one argument: on or off"),
    (["flush"], "Target type does not support messages"),
])
async def test_bad_messages(svc: trio.Nursery, words: list[str],
                            error: str) -> None:
    rig = Rig(svc, "ab")
    target = await rig.start("0 64 mirror core 2 16 nosync 2 a 0 b 0")
    with pytest.raises(TargetArgError, match=error):
        await target.message(words)
    assert target.ms.legs.read_balance is False
    await rig.close()
