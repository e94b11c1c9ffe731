"""MappedDevice: suspend / drain / reload / resume semantics, info(), close()."""

from __future__ import annotations

import errno
from typing import Any

import pytest
import trio
from support.data import pattern
from support.fakes import MemDevice, RecordingDevice
from support.targets import DictResolver, ProbeTarget
from trio.testing import wait_all_tasks_blocked

from dmuser.core.errors import DeviceBusyError, DmError, DmIOError
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.target import StatusType

S = 512


async def make_md(res: Any, text: str, name: str = "md", **kw: str) -> MappedDevice:
    md = MappedDevice(name, **kw)
    await md.load(await res.build(text, name))
    await md.resume()
    return md


async def test_first_resume_makes_table_live() -> None:
    res = DictResolver({"m": MemDevice(16)})
    md = MappedDevice("md")
    assert md.nr_sectors == 0 and md.live is None
    table = await res.build("0 16 linear m 0", "md")
    await md.load(table)
    assert md.live is None and md.inactive is table
    await md.resume()
    assert md.live is table and md.inactive is None and not md.suspended
    assert md.nr_sectors == 16


async def test_suspend_holds_new_io() -> None:
    mem = MemDevice(16)
    md = await make_md(DictResolver({"m": mem}), "0 16 linear m 0")
    await md.suspend()
    assert md.suspended
    done: list[int] = []

    async def writer() -> None:
        await md.write(0, b"\x11" * S)
        done.append(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await wait_all_tasks_blocked()
        assert not done
        assert mem.buf[:S] == bytes(S)
        assert md.info().in_flight == 0  # held at the door, not inside the table
        await md.resume()
    assert done == [1]
    assert mem.buf[:S] == b"\x11" * S


async def test_suspend_waits_for_in_flight_io() -> None:
    gate = RecordingDevice(16, "gate", closed=True)
    md = await make_md(DictResolver({"g": gate}), "0 8 linear g 0\n8 8 unit-probe 0")
    (probe,) = ProbeTarget.instances
    suspended = trio.Event()

    async def do_suspend() -> None:
        await md.suspend()
        suspended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(md.write, 0, b"\x22" * S)
        await wait_all_tasks_blocked()
        assert len(gate.bios) == 1 and md.info().in_flight == 1

        nursery.start_soon(do_suspend)
        await wait_all_tasks_blocked()
        assert md.suspended and not suspended.is_set()
        assert probe.events[-1] == "presuspend"  # presuspend before the drain...
        assert "postsuspend" not in probe.events  # ...postsuspend only after it

        nursery.start_soon(md.write, 1, b"\x33" * S)  # arrives while suspending
        await wait_all_tasks_blocked()
        assert len(gate.bios) == 1, "new I/O must not enter while suspending"

        gate.gate.set()
        await suspended.wait()
        assert len(gate.done) == 1 and md.info().in_flight == 0
        assert probe.events[-1] == "postsuspend"
        await wait_all_tasks_blocked()
        assert len(gate.bios) == 1, "new I/O must stay held until resume"
        await md.resume()
    assert len(gate.done) == 2
    assert gate.buf[: 2 * S] == b"\x22" * S + b"\x33" * S


async def test_reload_resume_swaps_table_and_closes_old() -> None:
    m1, m2 = MemDevice(8, "m1"), MemDevice(8, "m2")
    m1.buf[:] = b"\x01" * len(m1.buf)
    m2.buf[:] = b"\x02" * len(m2.buf)
    res = DictResolver({"m1": m1, "m2": m2})
    md = await make_md(res, "0 8 unit-probe 0 m1 0")
    (probe,) = ProbeTarget.instances

    new = await res.build("0 4 linear m2 0", "md")
    await md.load(new)
    assert md.info().inactive and md.live is not new
    assert await md.read(0, 1) == b"\x01" * S  # the old table is still live
    assert not probe.closed

    await md.resume()
    assert md.live is new and md.inactive is None and not md.suspended
    assert probe.closed
    assert probe.events == ["open", "preresume", "resume", "presuspend", "postsuspend", "close"]
    assert res.refs == {"m1": 0, "m2": 1}
    assert md.nr_sectors == 4
    assert await md.read(0, 1) == b"\x02" * S


async def test_bio_in_flight_during_reload_completes_on_old_table() -> None:
    old_dev, new_dev = RecordingDevice(8, "old", closed=True), MemDevice(8, "new")
    res = DictResolver({"old": old_dev, "new": new_dev})
    md = await make_md(res, "0 8 unit-probe 0 old 0")
    (probe,) = ProbeTarget.instances
    data = pattern(7, 2 * S)
    resumed = trio.Event()

    async def do_resume() -> None:
        await md.resume()
        resumed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(md.write, 3, data)
        await wait_all_tasks_blocked()
        assert len(old_dev.bios) == 1
        await md.load(await res.build("0 8 linear new 0", "md"))
        nursery.start_soon(do_resume)
        await wait_all_tasks_blocked()
        assert not resumed.is_set()
        assert md.live is not None and md.live.targets[0] is probe
        assert not probe.closed, "the old table must not be closed while a bio uses it"
        old_dev.gate.set()
    assert resumed.is_set()
    assert old_dev.buf[3 * S : 5 * S] == data
    assert new_dev.buf == bytes(8 * S)
    assert probe.closed
    assert md.live is not None and md.live.targets[0].name == "linear"
    assert res.refs == {"old": 0, "new": 1}


async def test_resume_when_not_suspended_and_no_inactive_is_noop() -> None:
    md = await make_md(DictResolver({}), "0 8 unit-probe 0")
    (probe,) = ProbeTarget.instances
    live = md.live
    assert probe.events == ["open", "preresume", "resume"]
    await md.resume()
    assert probe.events == ["open", "preresume", "resume"]
    assert md.live is live and not md.suspended


async def test_suspend_idempotent_then_plain_resume() -> None:
    md = await make_md(DictResolver({}), "0 8 unit-probe 0")
    (probe,) = ProbeTarget.instances
    live = md.live
    await md.suspend()
    await md.suspend()
    assert probe.events.count("presuspend") == 1
    assert probe.events.count("postsuspend") == 1
    await md.resume()
    assert md.live is live and not probe.closed
    assert probe.events[-2:] == ["preresume", "resume"]
    assert (await md.read(2, 1))[:1] == b"\x02"  # I/O flows again


async def test_resume_without_any_table() -> None:
    md = MappedDevice("empty")
    await md.resume()  # not suspended, nothing to do
    assert not md.suspended
    await md.suspend()
    with pytest.raises(DmError) as info:  # dm_resume: no map -> EINVAL
        await md.resume()
    assert info.value.errno == errno.EINVAL
    assert md.suspended


async def test_load_replaces_and_clear_closes_inactive() -> None:
    res = DictResolver({"m": MemDevice(8)})
    md = await make_md(res, "0 8 zero")
    await md.load(await res.build("0 8 unit-probe 0 m 0", "md"))
    first = ProbeTarget.instances[-1]
    await md.load(await res.build("0 8 unit-probe 0 m 0", "md"))
    second = ProbeTarget.instances[-1]
    assert first.closed and not second.closed
    assert res.refs == {"m": 1}
    assert md.table_lines(StatusType.TABLE, inactive=True) == ["0 8 unit-probe 0"]
    assert md.table_lines(StatusType.TABLE) == ["0 8 zero "]
    await md.clear()
    assert second.closed and md.inactive is None
    assert res.refs == {"m": 0}
    assert md.live is not None and md.live.targets[0].name == "zero"


async def test_info_fields() -> None:
    gate = RecordingDevice(64, "gate", closed=True)
    res = DictResolver({"g": gate})
    md = await make_md(res, "0 16 linear g 0\n16 8 zero", name="vol", uuid="U-1",
                       path="/mnt/vol")
    i = md.info()
    assert (i.name, i.uuid, i.path) == ("vol", "U-1", "/mnt/vol")
    assert (i.suspended, i.live, i.inactive) == (False, True, False)
    assert (i.open_count, i.event_nr, i.nr_targets, i.nr_sectors, i.in_flight) == (0, 0, 2, 24, 0)
    assert md.status_name == "/mnt/vol"
    md.open_count += 2
    async with trio.open_nursery() as nursery:
        nursery.start_soon(md.read, 0, 2)
        nursery.start_soon(md.read, 4, 2)
        await wait_all_tasks_blocked()
        assert md.info().in_flight == 2
        gate.gate.set()
    await md.load(await res.build("0 8 zero", "vol"))
    await md.suspend()
    i = md.info()
    assert (i.suspended, i.live, i.inactive, i.open_count, i.in_flight) == (True, True, True, 2, 0)
    assert i.nr_sectors == 24  # still the live table's size


async def test_close_fails_held_io_with_enxio() -> None:
    mem = MemDevice(8)
    res = DictResolver({"m": mem})
    md = await make_md(res, "0 8 linear m 0")
    await md.suspend()
    errors: list[DmIOError] = []

    async def writer() -> None:
        try:
            await md.write(0, b"\x44" * S)
        except DmIOError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await wait_all_tasks_blocked()
        await md.close()
    assert len(errors) == 1 and errors[0].errno == errno.ENXIO
    assert mem.buf[:S] == bytes(S)
    assert res.refs == {"m": 0}
    assert md.live is None and md.inactive is None and not md.suspended
    with pytest.raises(DmIOError) as info:
        await md.read(0, 1)
    assert info.value.errno == errno.ENXIO


async def test_close_refused_while_held() -> None:
    md = await make_md(DictResolver({}), "0 8 zero")
    md.holders = 1
    with pytest.raises(DeviceBusyError):
        await md.close()
    assert md.live is not None and not md.suspended


async def test_stacked_device_suspend_holds_upper_io() -> None:
    mem = MemDevice(16)
    lower = await make_md(DictResolver({"m": mem}), "0 16 linear m 0", name="lower")
    upper = await make_md(DictResolver({"lower": lower}), "0 8 linear lower 8", name="upper")
    assert upper.table_lines(StatusType.TABLE) == ["0 8 linear lower 8"]
    await lower.suspend()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(upper.write, 1, b"\x55" * S)
        await wait_all_tasks_blocked()
        assert mem.buf[9 * S : 10 * S] == bytes(S)
        assert upper.info().in_flight == 1 and lower.info().in_flight == 0
        await lower.resume()
    assert mem.buf[9 * S : 10 * S] == b"\x55" * S


async def test_old_table_destroyed_after_new_table_resumes() -> None:
    log: list[str] = []
    res = DictResolver({})
    md = await make_md(res, "0 8 unit-probe 0")
    old = ProbeTarget.instances[-1]
    await md.load(await res.build("0 8 unit-probe 0", "md"))
    new = ProbeTarget.instances[-1]
    old.events, new.events = log, log  # one shared, ordered log
    log.clear()
    await md.resume()
    assert log == ["presuspend", "postsuspend", "preresume", "resume", "close"]


async def test_concurrent_suspend_returns_only_when_drained() -> None:
    gate = RecordingDevice(8, "gate", closed=True)
    md = await make_md(DictResolver({"g": gate}), "0 8 linear g 0")
    done: list[str] = []

    async def suspender(tag: str) -> None:
        await md.suspend()
        done.append(tag)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(md.read, 0, 1)
        await wait_all_tasks_blocked()
        nursery.start_soon(suspender, "first")
        await wait_all_tasks_blocked()
        nursery.start_soon(suspender, "second")  # already suspending: must still wait
        await wait_all_tasks_blocked()
        assert done == []
        gate.gate.set()
    assert sorted(done) == ["first", "second"]
    assert md.suspended and md.info().in_flight == 0


async def test_resume_waits_for_a_suspend_in_progress() -> None:
    gate = RecordingDevice(8, "gate", closed=True)
    md = await make_md(DictResolver({"g": gate}), "0 8 unit-probe 0 g 0")
    (probe,) = ProbeTarget.instances
    probe.events.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(md.read, 0, 1)
        await wait_all_tasks_blocked()
        nursery.start_soon(md.suspend)
        await wait_all_tasks_blocked()
        nursery.start_soon(md.resume)
        await wait_all_tasks_blocked()
        assert md.suspended and probe.events == ["presuspend"]
        gate.gate.set()
    assert probe.events == ["presuspend", "postsuspend", "preresume", "resume"]
    assert not md.suspended
