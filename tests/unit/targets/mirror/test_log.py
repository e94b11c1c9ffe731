"""Dirty logs (dm-spec §5.3-§5.5): core bitsets, and the disk log's kernel-compatible format."""

from __future__ import annotations

import struct

import pytest
from support.fakes import MemDevice
from support.oracles import decode_disk_log

from dmuser.core.errors import DmIOError
from dmuser.core.target import StatusType, TargetContext
from dmuser.targets.mirror.log import DirtyLog, DirtyLogError, create_dirty_log
from dmuser.targets.mirror.log.core import CoreLog
from dmuser.targets.mirror.log.disk import MIRROR_MAGIC, DiskLog

S = 512


def log_dev(nr_sectors: int = 16, name: str = "254:48") -> MemDevice:
    """A log device: fails reads, writes or flushes on demand, counts what it did."""
    return MemDevice(nr_sectors, name)


def ctx(length: int, devices: dict[str, MemDevice] | None = None) -> TargetContext:
    devs = devices or {}
    return TargetContext(0, length, "t", lambda word: devs[word])


def core(length: int, *args: str) -> CoreLog:
    log = create_dirty_log("core", ctx(length), list(args))
    assert isinstance(log, CoreLog)
    return log


def disk(dev: MemDevice, length: int, *args: str, callback=None, events=None) -> DiskLog:  # type: ignore[no-untyped-def]
    log = create_dirty_log("disk", ctx(length, {"log": dev}), ["log", *args],
                           flush_callback=callback,
                           table_event=(lambda: events.append(1)) if events is not None else None)
    assert isinstance(log, DiskLog)
    return log


def header(dev: MemDevice) -> tuple[int, int, int]:
    """(magic, version, nr_regions) of the log on ``dev``, read by the independent reader."""
    log = decode_disk_log(bytes(dev.buf), 0)
    return log.magic, log.version, log.nr_regions


# -- construction --------------------------------------------------------------------------


@pytest.mark.parametrize(("type_name", "args", "warning"), [
    ("corex", ["8"], 'Module for logging type "corex" not found.'),
    ("core", [], "wrong number of arguments to dirty region log"),
    ("core", ["8", "sync", "x"], "wrong number of arguments to dirty region log"),
    ("core", ["8", "Sync"], "unrecognised sync argument to dirty region log: Sync"),
    ("core", ["x"], "invalid region size x"),
    ("core", ["1"], "invalid region size 1"),
    ("core", ["12"], "invalid region size 12"),
    ("core", ["128"], "invalid region size 128"),   # larger than the target (100)
    ("core", ["-8"], "invalid region size -8"),
    ("disk", ["log"], "wrong number of arguments to disk dirty region log"),
    ("disk", ["log", "8", "sync", "x"], "wrong number of arguments to disk dirty region log"),
    ("disk", ["log", "8", "maybe"], "unrecognised sync argument to dirty region log: maybe"),
    ("disk", ["log", "3"], "invalid region size 3"),
])
def test_constructor_warnings(type_name: str, args: list[str], warning: str) -> None:
    with pytest.raises(DirtyLogError) as info:
        create_dirty_log(type_name, ctx(100, {"log": log_dev()}), args)
    assert str(info.value) == warning


def test_disk_log_device_lookup_and_size() -> None:
    with pytest.raises(DirtyLogError, match="Device lookup failed"):
        create_dirty_log("disk", ctx(100), ["nolog", "8"])
    # 1024 + round_up(513 regions, 64)/8 = 1024 + 72 bytes -> 3 sectors, the device has 2
    with pytest.raises(DirtyLogError) as info:
        disk(log_dev(2), 513 * 2, "2")
    assert str(info.value) == "log device 254:48 too small: need 1536 bytes"
    assert disk(log_dev(3), 513 * 2, "2").buf_size == 1536


@pytest.mark.parametrize(("length", "region_size", "regions", "bitset"), [
    (8192, 1024, 8, 8), (8193, 1024, 9, 8), (64 * 1024, 1024, 64, 8), (65 * 2, 2, 65, 16),
    (1024 * 1024, 1024, 1024, 128),
])
def test_geometry(length: int, region_size: int, regions: int, bitset: int) -> None:
    log = core(length, str(region_size))
    assert (log.region_count, log.bitset_size, log.get_region_size()) == (regions, bitset,
                                                                          region_size)
    assert bytes(log.clean_bits.buf) == b"\xff" * bitset  # padding bits are 1 too


@pytest.mark.parametrize(("args", "sync_count", "table"), [
    (["1024"], 0, "core 1 1024 "),
    (["1024", "sync"], 0, "core 2 1024 sync "),
    (["1024", "nosync"], 8, "core 2 1024 nosync "),
])
def test_core_sync_modes_and_status(args: list[str], sync_count: int, table: str) -> None:
    log = core(8192, *args)
    assert log.get_sync_count() == sync_count
    assert all(log.in_sync(r) == bool(sync_count) for r in range(8))
    assert all(log.is_clean(r) for r in range(8))
    assert log.status(StatusType.TABLE) == table
    assert log.status(StatusType.INFO) == "1 core"


# -- the bitset interface ---------------------------------------------------------------------


def test_bit_order_is_little_endian() -> None:
    log = core(100 * 2, "2")
    log.mark_region(9)
    assert log.clean_bits.buf[1] == 0xFF & ~0x02
    log.set_region_sync(70, True)
    assert log.sync_bits.buf[8] == 0x40


async def test_resync_work_ascending_cursor_only_moves_forward() -> None:
    log = core(8 * 4, "4")
    log.set_region_sync(2, True)
    got = [log.get_resync_work() for _ in range(3)]
    assert got == [0, 1, 3]
    assert log.recovering_bits.test(3)
    log.set_region_sync(0, False)  # out of sync behind the cursor: not retried yet
    log.set_region_sync(1, True)
    assert [log.get_resync_work() for _ in range(5)] == [4, 5, 6, 7, None]
    assert log.get_resync_work() is None
    await log.resume()  # rewinds the cursor: 0 is handed out again, 3-7 are still recovering
    assert [log.get_resync_work(), log.get_resync_work()] == [0, None]


async def test_resume_rewinds_and_recovering_regions_are_skipped() -> None:
    log = core(4 * 4, "4")
    assert [log.get_resync_work() for _ in range(4)] == [0, 1, 2, 3]
    log.set_region_sync(1, False)   # clears recovering, stays out of sync
    await log.resume()
    assert log.get_resync_work() == 1
    assert log.get_resync_work() is None


def test_set_region_sync_counts() -> None:
    log = core(4 * 4, "4")
    log.set_region_sync(1, True)
    log.set_region_sync(1, True)  # the kernel counts again
    assert log.get_sync_count() == 2
    log.set_region_sync(1, False)
    log.set_region_sync(1, False)  # only when the bit was set
    assert log.get_sync_count() == 1
    assert not log.in_sync(1)


def test_touched_flags() -> None:
    log = core(4 * 4, "4")
    assert not log.touched_cleaned and not log.touched_dirtied
    log.mark_region(0)
    assert log.touched_dirtied and not log.touched_cleaned
    log.touched_dirtied = False
    log.get_resync_work()  # sets a recovering bit
    assert log.touched_cleaned


def test_clear_region_ignored_after_flush_failure() -> None:
    log = core(4 * 4, "4")
    log.mark_region(2)
    log.flush_failed = True
    log.clear_region(2)
    assert not log.is_clean(2)


# -- disk log: format, resume, flush ------------------------------------------------------------


async def test_disk_new_log_on_zeroed_device_matches_kernel_bytes() -> None:
    dev = log_dev(2048, "254:0")
    dev.buf[2048:] = b"\x5a" * (len(dev.buf) - 2048)   # beyond buf_size: never touched
    log = disk(dev, 65536, "1024")
    assert log.buf_size == 1536
    await log.resume()
    assert header(dev) == (MIRROR_MAGIC, 2, 64)
    assert dev.buf[:4] == b"rRiM"
    assert dev.buf[1024:1032] == bytes(8)  # default mode: every region dirty
    assert log.get_sync_count() == 0
    for r in range(64):
        log.clear_region(r)
    await log.flush()
    # the exact bytes of the mirror-disklog vector after the resync
    assert bytes(dev.buf[:16]) == bytes.fromhex("7252694d020000004000000000000000")
    assert dev.buf[16:1024] == bytes(1008)
    assert dev.buf[1024:1032] == b"\xff" * 8
    assert dev.buf[1032:2048] == bytes(1016)
    assert dev.buf[2048:] == b"\x5a" * (len(dev.buf) - 2048)
    assert log.status(StatusType.INFO) == "3 disk 254:0 A"
    assert log.status(StatusType.TABLE) == "disk 2 254:0 1024 "


async def test_disk_reload_trusts_clean_bits_and_keeps_opaque_bytes() -> None:
    dev = log_dev()
    log = disk(dev, 20 * 8, "8")
    await log.resume()
    for r in (0, 3, 9, 19):
        log.clear_region(r)
    await log.flush()
    dev.buf[16:1024] = b"\x11" * 1008
    dev.buf[1024 + 8 : 1536] = b"\x22" * (512 - 8)
    again = disk(dev, 20 * 8, "8")
    await again.resume()
    assert [r for r in range(20) if again.in_sync(r)] == [0, 3, 9, 19]
    assert again.get_sync_count() == 4
    assert dev.buf[1024:1027] == bytes([0b1001, 0b10, 0b1000])
    assert dev.buf[16:1024] == b"\x11" * 1008  # written back unchanged
    assert dev.buf[1032:1536] == b"\x22" * 504


async def test_disk_grown_device_new_regions_dirty_padding_cleared() -> None:
    dev = log_dev()
    dev.buf[:16] = struct.pack("<IIQ", MIRROR_MAGIC, 2, 4)
    dev.buf[1024:1032] = b"\xff" * 8
    log = disk(dev, 8 * 8, "8")
    await log.resume()
    assert [log.in_sync(r) for r in range(8)] == [True] * 4 + [False] * 4
    assert dev.buf[1024:1032] == b"\x0f" + bytes(7)
    assert header(dev)[2] == 8


@pytest.mark.parametrize(("mode", "expected"), [("sync", 0x00), ("nosync", 0xFF)])
async def test_disk_sync_words_reinitialise(mode: str, expected: int) -> None:
    dev = log_dev()
    dev.buf[:16] = struct.pack("<IIQ", MIRROR_MAGIC, 2, 8)
    dev.buf[1024] = 0x5A
    log = disk(dev, 8 * 8, "8", mode)
    await log.resume()
    assert dev.buf[1024] == expected
    assert log.get_sync_count() == (8 if expected else 0)
    assert log.status(StatusType.TABLE) == f"disk 3 254:48 8 {mode} "


async def test_disk_version_1_read_as_2() -> None:
    dev = log_dev()
    dev.buf[:16] = struct.pack("<IIQ", MIRROR_MAGIC, 1, 8)
    dev.buf[1024] = 0x81
    log = disk(dev, 8 * 8, "8")
    await log.resume()
    assert header(dev) == (MIRROR_MAGIC, 2, 8)
    assert [r for r in range(8) if log.in_sync(r)] == [0, 7]


async def test_disk_unknown_version_is_a_failed_read() -> None:
    dev = log_dev()
    dev.buf[:16] = struct.pack("<IIQ", MIRROR_MAGIC, 7, 8)
    dev.buf[1024] = 0xFF
    events: list[int] = []
    log = disk(dev, 8 * 8, "8", events=events)
    await log.resume()
    assert header(dev) == (MIRROR_MAGIC, 7, 8)  # the unknown version is written back
    assert log.get_sync_count() == 0
    assert log.status(StatusType.INFO) == "3 disk 254:48 D"
    assert events == [1]


async def test_disk_read_failure_marks_device_failed() -> None:
    dev = log_dev()
    dev.fail_read = True
    events: list[int] = []
    log = disk(dev, 8 * 8, "8", "nosync", events=events)
    await log.resume()
    assert log.status(StatusType.INFO) == "3 disk 254:48 D"
    assert log.get_sync_count() == 8  # nosync sets the bits of all "new" regions
    assert header(dev) == (0, 0, 8)   # the zeroed in-memory header goes back
    assert events == [1]


async def test_disk_resume_write_and_flush_failures() -> None:
    dev = log_dev()
    dev.fail_write = True
    log = disk(dev, 8 * 8, "8")
    with pytest.raises(DmIOError):
        await log.resume()
    assert log.status(StatusType.INFO) == "3 disk 254:48 D"
    dev2 = log_dev()
    dev2.fail_flush = True
    log2 = disk(dev2, 8 * 8, "8")
    with pytest.raises(DmIOError):
        await log2.resume()
    assert log2.status(StatusType.INFO) == "3 disk 254:48 F"


async def test_disk_flush_protocol() -> None:
    dev = log_dev()
    calls: list[str] = []

    async def legs_flush() -> None:
        calls.append(f"legs@{dev.writes}")

    log = disk(dev, 8 * 8, "8", "nosync", callback=legs_flush)
    await log.resume()
    writes, flushes = dev.writes, dev.flushes
    await log.flush()  # the resume's bit changes set touched flags: written once more
    writes, flushes = dev.writes, dev.flushes
    await log.flush()  # nothing touched: no I/O
    assert (dev.writes, dev.flushes) == (writes, flushes)
    assert log.mark_is_durable(3) is False  # clean: a write must wait for mark + flush
    log.mark_region(3)  # dirtied only: write + log flush, no leg flush
    assert log.mark_is_durable(3) is False  # marked, not yet flushed
    calls.clear()
    await log.flush()
    assert (dev.writes, dev.flushes, calls) == (writes + 1, flushes + 1, [])
    assert log.mark_is_durable(3) is True
    log.mark_region(3)  # dmuser: already dirty, so nothing is touched and nothing written
    assert not log.touched_dirtied
    await log.flush()
    assert (dev.writes, dev.flushes) == (writes + 1, flushes + 1)
    log.clear_region(3)  # cleaned only: legs flushed *before* the write, no log flush
    await log.flush()
    assert calls == [f"legs@{writes + 1}"]
    assert (dev.writes, dev.flushes) == (writes + 2, flushes + 1)
    assert not log.touched_cleaned and not log.touched_dirtied


async def test_disk_flush_callback_failure_dirties_everything_until_reload() -> None:
    dev = log_dev()

    async def legs_flush() -> None:
        raise DmIOError("leg flush failed")

    log = disk(dev, 8 * 8, "8", "nosync", callback=legs_flush)
    await log.resume()
    log.clear_region(1)
    await log.flush()
    assert dev.buf[1024] == 0
    log.clear_region(1)
    assert not log.is_clean(1)
    again = disk(dev, 8 * 8, "8")
    await again.resume()
    assert again.get_sync_count() == 0


async def test_disk_flush_write_failure_raises() -> None:
    dev = log_dev()
    log = disk(dev, 8 * 8, "8")
    await log.resume()
    log.mark_region(0)
    dev.fail_write = True
    with pytest.raises(DmIOError):
        await log.flush()
    assert log.status(StatusType.INFO) == "3 disk 254:48 D"
    dev.fail_write = False
    dev.fail_flush = True
    with pytest.raises(DmIOError):
        await log.flush()
    assert log.status(StatusType.INFO) == "3 disk 254:48 F"


async def test_disk_postsuspend_flushes() -> None:
    dev = log_dev()
    log = disk(dev, 8 * 8, "8")
    await log.resume()
    await log.flush()
    log.clear_region(5)
    await log.postsuspend()
    assert dev.buf[1024] & 0x20


def test_dirty_log_is_a_protocol() -> None:
    assert issubclass(CoreLog, DirtyLog) and issubclass(DiskLog, CoreLog)
