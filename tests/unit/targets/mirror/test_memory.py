"""A slow leg does not make the mirror hold memory without bound (issue 12, part 4).

A stalled leg must not let bios, buffers or copies pile up inside the mirror:
what is in flight on it is bounded by the page reservations of the mirror's
dm-io client (writes) and kcopyd client (resync), whatever the number of
writers; the writers beyond that wait with nothing allocated for them (their
own buffers are bounded one level up, by the FUSE request limit,
``docs/io-policy.md``, "Memory").  Counted with the devices' in-flight gauge
and the clients' page statistics, not with timings.
"""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing
from support.fakes import Gauge, RecordingDevice
from support.targets import TYPES

from dmuser.core.mapped_device import MappedDevice
from dmuser.core.table import Table, TargetServices, parse_table
from dmuser.core.units import SECTOR_SHIFT
from dmuser.services.dm_io import DEFAULT_RESERVED_PAGES
from dmuser.targets.mirror.target import MirrorTarget

REGION = 2048  # 1 MiB regions
LEN = 32 * REGION  # room for every writer below at its own offset
PAGE = 4096


async def start(nursery: trio.Nursery, text: str, devs: dict[str, RecordingDevice],
                length: int = LEN) -> tuple[MappedDevice, MirrorTarget]:
    md = MappedDevice("m")
    table = await Table.build("m", parse_table(f"0 {length} mirror {text}"), lambda w: devs[w],
                              lambda d: None, TargetServices(nursery=nursery), types=TYPES)
    await md.load(table)
    await md.resume()
    assert md.live is not None
    target = md.live.targets[0]
    assert isinstance(target, MirrorTarget)
    await target.ms.flush_daemon()
    return md, target


@pytest.mark.parametrize("log", ["core 2 2048 nosync", "disk 3 log 2048 nosync"])
async def test_stalled_leg_bounds_writes_in_flight(nursery: trio.Nursery, log: str) -> None:
    """More writers than dm-io's reservation holds, one leg stalled: the stalled
    leg never holds more than the reservation, and every write lands once the
    leg moves again."""
    slow = Gauge()
    devs = {"a": RecordingDevice(LEN, "a"), "b": RecordingDevice(LEN, "b", gauge=slow),
            "log": RecordingDevice(8, "log")}
    md, target = await start(nursery, f"{log} 2 a 0 b 0", devs)
    for r in range(LEN // REGION):  # every region marked: the writes below go direct
        await md.write(r * REGION, bytes(PAGE))
    io = target.ms.writer._io
    assert io is not None
    nbytes = 256 << 10
    per_bio = nbytes // PAGE
    writers = 2 * DEFAULT_RESERVED_PAGES // per_bio  # twice what the reservation admits
    assert writers * nbytes <= LEN << SECTOR_SHIFT
    devs["b"].write_gate = trio.Event()
    payload = {i: os.urandom(nbytes) for i in range(writers)}

    async def writer(i: int) -> None:
        await md.write(i * (nbytes >> SECTOR_SHIFT), payload[i])

    async with trio.open_nursery() as inner:
        for i in range(writers):
            inner.start_soon(writer, i)
        await trio.testing.wait_all_tasks_blocked()
        stats, stalled = io.statistics(), slow.active
        devs["b"].write_gate.set()  # (before any assert: shielded writes wait for it)
    assert stats.nr_pages == DEFAULT_RESERVED_PAGES
    assert stats.pages_in_use <= stats.nr_pages
    assert stalled == DEFAULT_RESERVED_PAGES // per_bio  # the reservation is full, no more
    assert stats.tasks_waiting > 0  # the other writers wait, holding no pages
    assert slow.max_bytes <= DEFAULT_RESERVED_PAGES * PAGE
    assert io.statistics().pages_in_use == 0
    for i in range(writers):
        off = i * nbytes
        assert bytes(devs["a"].buf[off:off + nbytes]) == payload[i]
        assert bytes(devs["b"].buf[off:off + nbytes]) == payload[i]
    await md.suspend()
    await md.close()


async def test_stalled_leg_bounds_resync_copies(nursery: trio.Nursery) -> None:
    """A resync onto a stalled leg keeps at most kcopyd's pool in flight."""
    slow = Gauge()
    length = 4 * REGION
    devs = {"a": RecordingDevice(length, "a", seed=1),
            "b": RecordingDevice(length, "b", gauge=slow), "log": RecordingDevice(8, "log")}
    devs["b"].write_gate = trio.Event()
    md, target = await start(nursery, "core 2 2048 sync 2 a 0 b 0", devs, length)
    kc = target.ms._kc
    assert kc is not None
    await trio.testing.wait_all_tasks_blocked()
    stats, stalled, stalled_bytes = kc.statistics(), slow.active, slow.bytes
    devs["b"].write_gate.set()
    assert stalled > 0
    assert stalled_bytes <= stats.nr_pages * PAGE
    assert stats.pages_in_use <= stats.nr_pages
    with trio.fail_after(10):
        while target.ms.rh.log.get_sync_count() < length // REGION:
            await trio.sleep(0.01)
    assert slow.max_bytes <= kc.statistics().nr_pages * PAGE
    assert devs["b"].buf == devs["a"].buf
    await md.suspend()
    await md.close()
