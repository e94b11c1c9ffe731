"""delay (dm-delay.c): constructor checks, classes and routing, held bios in order,
suspend flushing, status strings; the kernel's outputs replayed (vector ``delay-error``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trio
from support.data import pattern
from support.fakes import Entry, MemDevice, RecordingDevice
from support.targets import DictResolver
from support.vectors import load_manifest

from dmuser.control import dispatch
from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.errors import NotSupportedError, TableError
from dmuser.core.manager import DeviceManager
from dmuser.core.table import Table
from dmuser.core.target import StatusType
from dmuser.targets.delay import DelayTarget

S = 512


def _devices(journal: list[Entry] | None = None) -> dict[str, MemDevice]:
    journal = journal if journal is not None else []
    return {name: RecordingDevice(256, name, seed=i + 1, journal=journal)
            for i, name in enumerate(("254:0", "254:16", "254:32"))}


async def build(args: str, length: int = 64,
                devices: dict[str, MemDevice] | None = None) -> tuple[Table, DelayTarget]:
    table = await DictResolver(devices or _devices()).build(f"0 {length} delay {args}")
    target = table.targets[0]
    assert isinstance(target, DelayTarget)
    return table, target


async def ctr_error(args: str) -> str:
    with pytest.raises(TableError) as info:
        await build(args)
    prefix = "t: delay: "
    assert info.value.message.startswith(prefix)
    return info.value.message[len(prefix):]


# -- constructor ---------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "error"), [
    ("254:0 0", "Requires exactly 3, 6 or 9 arguments"),
    ("254:0 0 1 254:16", "Requires exactly 3, 6 or 9 arguments"),
    ("254:0 0 1 254:16 0 1 254:32", "Requires exactly 3, 6 or 9 arguments"),
    ("254:0 0 1 254:16 0 1 254:32 0 1 x", "Requires exactly 3, 6 or 9 arguments"),
    ("254:0 x 1", "Invalid device sector"),
    ("254:0 -1 1", "Invalid device sector"),
    (f"254:0 {1 << 64} 1", "Invalid device sector"),
    ("254:0 0 x", "Invalid delay"),
    ("254:0 0 -5", "Invalid delay"),
    ("nodev 0 1", "Device lookup failed"),
    ("nodev x 1", "Invalid device sector"),          # offset before device
    ("nodev 0 x", "Invalid delay"),                  # delay before device
    ("254:0 0 1 254:16 y 1", "Invalid device sector"),
    ("254:0 0 1 254:16 0 -5", "Invalid delay"),
    ("254:0 0 1 254:16 0 1 nodev 0 1", "Device lookup failed"),
])
async def test_constructor_errors(args: str, error: str) -> None:
    assert await ctr_error(args) == error


async def test_devices_are_released_after_a_failed_constructor() -> None:
    resolver = DictResolver(_devices())
    with pytest.raises(TableError):
        await resolver.build("0 64 delay 254:0 0 1 254:16 0 1 nodev 0 1")
    assert resolver.outstanding() == 0


@pytest.mark.parametrize(("delay", "loaded"), [("4294967295", 4294967295),
                                               ("4294967296", 0), ("4294967297", 1)])
async def test_delay_keeps_low_32_bits_like_sscanf(delay: str, loaded: int) -> None:
    table, target = await build(f"254:0 0 {delay}")
    assert target.read.delay_ms == loaded
    await table.close()


async def test_three_words_use_one_class_three_times() -> None:
    resolver = DictResolver(_devices())
    table = await resolver.build("0 64 delay 254:0 8 5")
    assert resolver.refs["254:0"] == 3  # like delay_ctr: dm_get_device once per class
    target = table.targets[0]
    assert isinstance(target, DelayTarget)
    assert [(c.start, c.delay_ms) for c in (target.read, target.write, target.flush)] == \
        [(8, 5)] * 3
    await table.close()
    assert resolver.outstanding() == 0


async def test_device_too_small_for_write_class() -> None:
    with pytest.raises(TableError, match="254:16 too small for target: start=200, len=64"):
        await build("254:0 0 0 254:16 200 50")


# -- status strings -------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "table_status"), [
    ("254:0 0 100", "254:0 0 100"),
    ("254:0 7 0 254:16 16 50", "254:0 7 0 254:16 16 50"),
    ("254:0 0 10 254:16 0 20 254:32 8 0", "254:0 0 10 254:16 0 20 254:32 8 0"),
])
async def test_table_status(args: str, table_status: str) -> None:
    table, target = await build(args)
    assert target.status(StatusType.TABLE) == table_status
    assert target.status(StatusType.INFO) == "0 0 0"
    await table.close()


# -- routing -----------------------------------------------------------------------------------


async def test_reads_writes_flushes_discards_go_to_their_class(
        autojump_clock: trio.abc.Clock) -> None:
    journal: list[Entry] = []
    devices = _devices(journal)
    table, _ = await build("254:0 4 0 254:16 8 0 254:32 12 0", devices=devices)
    buf = bytearray(2 * S)
    await table.submit(Bio.read(10, buf))
    assert bytes(buf) == devices["254:0"].buf[14 * S:16 * S]
    data = pattern(3, 2 * S)
    await table.submit(Bio.write(20, data))
    assert devices["254:16"].buf[28 * S:30 * S] == data
    await table.submit(Bio.flush())
    await table.submit(Bio(Op.DISCARD, 1, 2))
    assert [(e.dev, e.kind, e.sector, e.nr_sectors) for e in journal] == [
        ("254:0", "read", 14, 2), ("254:16", "write", 28, 2),
        ("254:32", "flush", 0, 0), ("254:16", "discard", 9, 2)]
    with pytest.raises(NotSupportedError):
        await table.submit(Bio(Op.WRITE_ZEROES, 0, 1))
    await table.close()


async def test_each_class_waits_its_own_delay(autojump_clock: trio.abc.Clock) -> None:
    table, target = await build("254:0 0 100 254:16 0 200 254:32 0 300")
    for bio, ms in ((Bio.read(0, bytearray(S)), 100), (Bio.write(0, bytes(S)), 200),
                    (Bio.flush(), 300), (Bio(Op.DISCARD, 0, 1), 200)):
        t0 = trio.current_time()
        await table.submit(bio)
        assert trio.current_time() - t0 == pytest.approx(ms / 1000)
    await table.close()


async def test_status_counts_held_bios_per_class(autojump_clock: trio.abc.Clock) -> None:
    table, target = await build("254:0 0 1000 254:16 0 1000 254:32 0 1000")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(table.submit, Bio.read(0, bytearray(S)))
        nursery.start_soon(table.submit, Bio.read(1, bytearray(S)))
        nursery.start_soon(table.submit, Bio(Op.DISCARD, 0, 1))
        nursery.start_soon(table.submit, Bio.write(0, bytes(S), ReqFlag.PREFLUSH))
        await trio.sleep(0.5)
        # the PREFLUSH write is an empty flush (flush class) and then a write
        assert target.status(StatusType.INFO) == "2 1 1"
    assert target.status(StatusType.INFO) == "0 0 0"
    await table.close()


# -- order ---------------------------------------------------------------------------------


async def test_expired_bios_are_sent_in_arrival_order(autojump_clock: trio.abc.Clock) -> None:
    journal: list[Entry] = []
    table, _ = await build("254:0 0 50", devices=_devices(journal))
    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(table.submit, Bio.write(i, bytes([i]) * S))
            await trio.lowlevel.checkpoint()
    assert [e.sector for e in journal] == list(range(20))
    await table.close()


async def test_release_keeps_list_order_across_classes(autojump_clock: trio.abc.Clock) -> None:
    # reads wait 100 ms, writes 10 ms: a later write overtakes an earlier read, but
    # bios that expire in the same scan leave in arrival order
    journal: list[Entry] = []
    table, target = await build("254:0 0 100 254:16 0 10", devices=_devices(journal))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(table.submit, Bio.read(0, bytearray(S)))
        await trio.sleep(0.001)
        nursery.start_soon(table.submit, Bio.write(1, bytes(S)))
        await trio.sleep(0.05)
        assert [e.kind for e in journal] == ["write"]
        for i in range(5):
            nursery.start_soon(table.submit, Bio.read(10 + i, bytearray(S)))
            await trio.lowlevel.checkpoint()
        await trio.sleep(0.02)
        await target.presuspend()  # releases everything at once, in list order
    assert [e.sector for e in journal] == [1, 0, 10, 11, 12, 13, 14]
    await table.close()


async def test_cancelled_waiter_leaves_counts_and_order_intact(
        autojump_clock: trio.abc.Clock) -> None:
    journal: list[Entry] = []
    table, target = await build("254:0 0 100", devices=_devices(journal))
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            nursery.start_soon(table.submit, Bio.read(0, bytearray(S)))
            await trio.lowlevel.checkpoint()
        inner = trio.CancelScope()

        async def doomed() -> None:
            with inner:
                await table.submit(Bio.read(5, bytearray(S)))

        nursery.start_soon(doomed)
        await trio.lowlevel.checkpoint()
        nursery.start_soon(table.submit, Bio.read(7, bytearray(S)))
        await trio.sleep(0.01)
        assert target.status(StatusType.INFO) == "3 0 0"
        inner.cancel()
        await trio.sleep(0.01)
        assert target.status(StatusType.INFO) == "2 0 0"
        assert not scope.cancel_called
    assert [e.sector for e in journal] == [0, 7]
    assert target.status(StatusType.INFO) == "0 0 0"
    await table.close()


# -- suspend -------------------------------------------------------------------------------


async def test_suspend_flushes_held_bios_and_resume_delays_again(
        tmp_path: Path, mgr: DeviceManager, autojump_clock: trio.abc.Clock) -> None:
    (tmp_path / "a.img").write_bytes(pattern(1, 64 * S))
    md = await mgr.create("d", "0 64 delay a.img 0 5000", str(tmp_path))
    done: list[float] = []

    async def read() -> None:
        await md.read(0, 1)
        done.append(trio.current_time())

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.sleep(1)
        await md.suspend()
        assert done and done[0] - t0 == pytest.approx(1)
        target = md.live.targets[0] if md.live else None
        assert isinstance(target, DelayTarget) and not target.may_delay
        await md.resume()
    assert target.may_delay
    t1 = trio.current_time()
    await md.read(0, 1)
    assert trio.current_time() - t1 == pytest.approx(5)


async def test_noflush_suspend_also_flushes(tmp_path: Path, mgr: DeviceManager,
                                            autojump_clock: trio.abc.Clock) -> None:
    (tmp_path / "a.img").write_bytes(pattern(1, 64 * S))
    md = await mgr.create("d", "0 64 delay a.img 0 5000", str(tmp_path))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(md.write, 0, pattern(2, S))
        await trio.sleep(1)
        t0 = trio.current_time()
        await md.suspend(noflush=True)
        assert trio.current_time() - t0 < 0.01
    assert (tmp_path / "a.img").read_bytes()[:S] == pattern(2, S)
    await md.resume()


# -- the kernel's outputs (vector delay-error, Debian 6.1) ---------------------------------

VECTOR = load_manifest("delay-error")
_IMAGES = {"/dev/vda": ("a.img", 32768), "/dev/vdb": ("b.img", 8192), "/dev/vdc": ("c.img", 8192)}
_MAJMIN = {"/dev/vda": "254:0", "/dev/vdb": "254:16", "/dev/vdc": "254:32"}


def _delay_examples() -> list[dict[str, Any]]:
    steps = VECTOR["steps"]
    out = []
    for i, step in enumerate(steps):
        m = re.match(r"dmsetup create (\S+) --table '(0 \d+ delay [^']*)'", step["command"])
        if m and steps[i + 1]["command"].startswith("dmsetup table"):
            out.append({"name": m[1], "table": m[2], "create": step,
                        "table_out": steps[i + 1], "status_out": steps[i + 2]})
    return out


def _images(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for dev, (name, sectors) in _IMAGES.items():
        path = tmp_path / name
        with open(path, "wb") as f:
            f.truncate(sectors * S)
        paths[dev] = str(path)
    return paths


@pytest.mark.parametrize("example", _delay_examples(), ids=lambda e: e["name"])
async def test_kernel_tables_statuses_and_errors(tmp_path: Path, mgr: DeviceManager,
                                                 example: dict[str, Any]) -> None:
    paths = _images(tmp_path)
    table = example["table"]
    for dev, path in paths.items():
        table = table.replace(dev, path)
    req = {"verb": "create", "name": example["name"], "table": table, "cwd": str(tmp_path)}
    if example["create"]["rc"] != 0:
        # the kernel's ti->error (or size check) is the last line the guest printed
        kernel = example["create"]["output"].strip().splitlines()[-1]
        want = re.sub(r" \(-E[A-Z]+\)$", "", kernel.split(": ", 3)[-1])
        with pytest.raises(TableError) as info:
            await dispatch(mgr, req)
        got = info.value.message
        if "too small" in want:
            want = want.split(" ", 1)[1]
            got = got.split(" ", 2)[2]
        else:
            got = got.split(": ", 1)[1]
        assert got == want
        return
    await dispatch(mgr, req)
    got_table = (await dispatch(mgr, {"verb": "table", "name": example["name"]})).output
    got_status = (await dispatch(mgr, {"verb": "status", "name": example["name"]})).output
    want_table = example["table_out"]["output"]
    for dev, path in paths.items():
        want_table = want_table.replace(_MAJMIN[dev], path)
    assert got_table == want_table
    assert got_status == example["status_out"]["output"]


def test_vector_covers_the_forms() -> None:
    names = {e["name"] for e in _delay_examples()}
    assert {"d3", "d6", "d9", "b1", "bd2", "bn", "bs"} <= names
