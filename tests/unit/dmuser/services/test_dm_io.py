"""dm-io: error bits, memory kinds, splitting, flags, async notify, reservation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from support.data import pattern
from support.fakes import Gauge, MemDevice, RecordingDevice

from dmuser.core.bio import Op, ReqFlag
from dmuser.core.blockdev import FileDevice
from dmuser.core.errors import DmIOError
from dmuser.core.units import PAGE_SIZE, SECTOR_SIZE
from dmuser.services.dm_io import (
    BufferMem,
    DmIoClient,
    DmIoMem,
    DmIoRegionError,
    IoRequest,
    PageListMem,
    PagePool,
    Region,
    VecMem,
    dm_io,
    dm_io_sync,
)

W, R = Op.WRITE, Op.READ
NONE = ReqFlag.NONE


def sloppy_failing_device(nr_sectors: int) -> MemDevice:
    """Fails every bio, reads without zero-filling the buffer: dm-io must do it."""
    dev = MemDevice(nr_sectors, "sloppy")
    dev.fail_all = True
    dev.zero_failed_reads = False
    return dev


def make_mem(kind: str, nbytes: int, fill: bytes | None = None) -> DmIoMem:
    """A memory of ``kind`` holding exactly ``nbytes`` (initial content ``fill``)."""
    data = fill if fill is not None else bytes(nbytes)
    if kind == "buffer":
        return BufferMem(bytearray(data))
    if kind == "vec":
        segs, pos = [], 0
        for size in [1000, 3096, 512, 7]:
            segs.append(memoryview(bytearray(data[pos : pos + size])))
            pos += size
        segs.append(memoryview(bytearray(data[pos:])))
        return VecMem(segs)
    offset = 512
    pages = [bytearray(PAGE_SIZE) for _ in range((nbytes + offset + PAGE_SIZE - 1) // PAGE_SIZE)]
    mem = PageListMem(pages, offset)
    mem.scatter(0, memoryview(data))
    return mem


def mem_bytes(mem: DmIoMem, nbytes: int) -> bytes:
    return bytes(mem.gather(0, nbytes))


KINDS = ["buffer", "vec", "pagelist"]


@pytest.mark.parametrize("kind", KINDS)
async def test_memory_kinds_write_then_read(kind: str, tmp_path: Path) -> None:
    nbytes = 3 * 1024 * 1024 + 4096  # several bios, odd tail
    path = tmp_path / "img"
    path.write_bytes(bytes(nbytes + 8192))
    dev = FileDevice(str(path))
    client = DmIoClient()
    data = pattern(1, nbytes)
    try:
        bits = await dm_io(client, IoRequest(W, NONE, make_mem(kind, nbytes, data)),
                           [Region(dev, 16, nbytes // SECTOR_SIZE)])
        assert bits == 0
        assert path.read_bytes()[16 * SECTOR_SIZE : 16 * SECTOR_SIZE + nbytes] == data
        back = make_mem(kind, nbytes, b"\xff" * nbytes)
        bits = await dm_io(client, IoRequest(R, NONE, back), [Region(dev, 16, nbytes // 512)])
        assert bits == 0 and mem_bytes(back, nbytes) == data
    finally:
        dev.close()


async def test_contiguous_memory_is_not_copied() -> None:
    buf = bytearray(pattern(1, 8192))
    probe = RecordingDevice(64)
    await dm_io(DmIoClient(), IoRequest(W, NONE, BufferMem(buf)), [Region(probe, 0, 16)])
    data = probe.bios[0].data
    assert data is not None and data.obj is buf
    view = BufferMem(buf).gather(4096, 100)
    buf[4096] ^= 0xFF
    assert view[0] == buf[4096]


async def test_multi_region_write_lands_identically(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(bytes(1 << 20))
    file_dev = FileDevice(str(path))
    mems = [MemDevice(4096, f"m{i}") for i in range(3)]
    data = pattern(1, 5 * 4096)
    regions = [Region(mems[0], 0, 40), Region(mems[1], 100, 40), Region(mems[2], 7, 40),
               Region(file_dev, 3, 40)]
    try:
        bits = await dm_io(DmIoClient(), IoRequest(W, NONE, make_mem("vec", len(data), data)),
                           regions)
    finally:
        file_dev.close()
    assert bits == 0
    for r in regions[:3]:
        assert isinstance(r.dev, MemDevice)
        assert bytes(r.dev.buf[r.sector * 512 : (r.sector + 40) * 512]) == data[: 40 * 512]
    assert path.read_bytes()[3 * 512 : 43 * 512] == data[: 40 * 512]


async def test_every_error_bit_reports_its_region() -> None:
    client = DmIoClient()
    data = pattern(1, 8192)
    for failing in range(16):
        devs = [MemDevice(64, f"d{i}") for i in range(4)]
        for i, d in enumerate(devs):
            if failing >> i & 1:
                d.fail_sectors.add(9)
        bits = await dm_io(client, IoRequest(W, NONE, BufferMem(data)),
                           [Region(d, 0, 16) for d in devs])
        assert bits == failing
        for i, d in enumerate(devs):
            assert d.buf[:8192] == (bytes(8192) if failing >> i & 1 else data)


async def test_out_of_range_region_sets_its_bit_only() -> None:
    ok, small = MemDevice(64), MemDevice(8)
    data = pattern(1, 16 * 512)
    bits = await dm_io(DmIoClient(), IoRequest(W, NONE, BufferMem(data)),
                       [Region(ok, 0, 16), Region(small, 0, 16)])
    assert bits == 0b10
    assert bytes(ok.buf[: len(data)]) == data


@pytest.mark.parametrize("kind", KINDS)
async def test_failed_read_is_zero_filled_per_bio(kind: str) -> None:
    nbytes = 3 * 1024 * 1024  # three 1 MiB bios
    dev = MemDevice(nbytes // 512)
    data = pattern(1, nbytes)
    dev.buf[:] = data
    dev.fail_sectors.add(2500)  # inside the second bio
    mem = make_mem(kind, nbytes, b"\xff" * nbytes)
    bits = await dm_io(DmIoClient(), IoRequest(R, NONE, mem), [Region(dev, 0, nbytes // 512)])
    assert bits == 1
    got = mem_bytes(mem, nbytes)
    mib = 1 << 20
    assert got[:mib] == data[:mib]
    assert got[mib : 2 * mib] == bytes(mib)
    assert got[2 * mib :] == data[2 * mib :]


@pytest.mark.parametrize("kind", KINDS)
async def test_failed_read_zero_filled_even_if_device_does_not(kind: str) -> None:
    mem = make_mem(kind, 8192, b"\xff" * 8192)
    region = Region(sloppy_failing_device(64), 0, 16)
    bits = await dm_io(DmIoClient(), IoRequest(R, NONE, mem), [region])
    assert bits == 1 and mem_bytes(mem, 8192) == bytes(8192)


async def test_discard_and_write_zeroes_carry_no_data() -> None:
    for op in (Op.DISCARD, Op.WRITE_ZEROES):
        ok = RecordingDevice(64)
        unsupported = MemDevice(64, discard=False, write_zeroes=False)
        ok.buf[:] = unsupported.buf[:] = b"\xaa" * (64 * 512)
        bits = await dm_io(DmIoClient(), IoRequest(op, NONE, None),
                           [Region(ok, 8, 16), Region(unsupported, 8, 16)])
        assert bits == 0b10
        assert [(b.op, b.sector, b.nr_sectors, b.data) for b in ok.bios] == [(op, 8, 16, None)]
        buf = ok.buf
        assert buf[8 * 512 : 24 * 512] == bytes(16 * 512) and buf[:8 * 512] == b"\xaa" * 4096
        assert unsupported.buf == b"\xaa" * (64 * 512)


async def test_write_zeroes_on_file(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(b"\xaa" * 65536)
    dev = FileDevice(str(path))
    try:
        await dm_io_sync(DmIoClient(), IoRequest(Op.WRITE_ZEROES, NONE, None),
                         [Region(dev, 16, 32)])
    finally:
        dev.close()
    content = path.read_bytes()
    assert content[16 * 512 : 48 * 512] == bytes(32 * 512)
    assert content[: 16 * 512] == b"\xaa" * 8192
    assert content[48 * 512 :] == b"\xaa" * (65536 - 48 * 512)


async def test_count_zero_region_skipped_unless_preflush() -> None:
    a, b = RecordingDevice(64), RecordingDevice(64)
    client = DmIoClient()
    assert await dm_io(client, IoRequest(W, NONE, None), [Region(a, 5, 0), Region(b, 5, 0)]) == 0
    assert a.bios == [] and b.bios == []
    assert await dm_io(client, IoRequest(W, ReqFlag.PREFLUSH, None), [Region(a, 5, 0)]) == 0
    [bio] = a.bios
    assert (bio.op, bio.nr_sectors, bio.data) == (Op.WRITE, 0, None)
    assert bio.flags & ReqFlag.PREFLUSH and bio.is_empty_flush
    assert a.flushes == 1


async def test_flags_copied_to_every_bio_and_sync_added() -> None:
    probe = RecordingDevice(8192)
    nbytes = 3 * 1024 * 1024
    flags = ReqFlag.FUA | ReqFlag.META
    await dm_io(DmIoClient(), IoRequest(W, flags, BufferMem(bytes(nbytes))),
                [Region(probe, 0, nbytes // 512)])
    assert len(probe.bios) == 3
    assert sorted(b.sector for b in probe.bios) == [0, 2048, 4096]
    assert all(b.nr_sectors == 2048 for b in probe.bios)
    assert all(b.flags == flags | ReqFlag.SYNC for b in probe.bios)


async def test_async_notify_gets_bits_and_context() -> None:
    good, bad = RecordingDevice(64), MemDevice(64)
    bad.fail_all = True
    seen: list[tuple[int, Any]] = []
    done = trio.Event()

    def notify(bits: int, context: Any) -> None:
        seen.append((bits, context))
        done.set()

    async with DmIoClient() as client:
        req = IoRequest(W, ReqFlag.FUA, BufferMem(bytes(4096)), notify, "ctx")
        assert await dm_io(client, req, [Region(good, 0, 8), Region(bad, 0, 8)]) == 0
        assert seen == []  # returned before the I/O ran
        await done.wait()
    assert seen == [(0b10, "ctx")]
    assert good.bios[0].flags == ReqFlag.FUA  # no REQ_SYNC for async I/O


async def test_client_exit_waits_for_async_io(autojump_clock: trio.abc.Clock) -> None:
    dev = RecordingDevice(64, delay=5)
    seen: list[int] = []

    async def notify(bits: int, _ctx: Any) -> None:
        await trio.sleep(1)
        seen.append(bits)

    async with DmIoClient() as client:
        req = IoRequest(W, NONE, BufferMem(b"\x01" * 512), notify)
        await dm_io(client, req, [Region(dev, 0, 1)])
    assert seen == [0]
    assert dev.buf[0] == 1


async def test_misuse_raises_before_io() -> None:
    a, b = RecordingDevice(64), RecordingDevice(64)
    client = DmIoClient()
    buf = BufferMem(bytearray(4096))
    with pytest.raises(ValueError):
        await dm_io(client, IoRequest(R, NONE, buf), [Region(a, 0, 8), Region(b, 0, 8)])
    with pytest.raises(ValueError):
        await dm_io(client, IoRequest(W, NONE, buf), [Region(a, 0, 1)] * 65)
    with pytest.raises(ValueError):
        await dm_io(client, IoRequest(W, NONE, buf), [Region(a, 0, 9)])
    with pytest.raises(ValueError):
        await dm_io(client, IoRequest(R, NONE, BufferMem(bytes(4096))), [Region(a, 0, 8)])
    with pytest.raises(ValueError):
        Region(a, -1, 8)
    with pytest.raises(RuntimeError):
        await dm_io(client, IoRequest(W, NONE, buf, lambda bits, ctx: None), [Region(a, 0, 8)])
    assert a.bios == [] and b.bios == []
    assert await dm_io(client, IoRequest(W, NONE, buf), [Region(a, 0, 1)] * 64) == 0


async def test_dm_io_sync_raises_with_error_bits() -> None:
    good, bad = MemDevice(64), MemDevice(64)
    bad.fail_sectors.add(3)
    req = IoRequest(W, NONE, BufferMem(bytes(4096)))
    await dm_io_sync(DmIoClient(), req, [Region(good, 0, 8)])
    with pytest.raises(DmIoRegionError) as info:
        await dm_io_sync(DmIoClient(), req, [Region(good, 0, 8), Region(bad, 0, 8)])
    assert info.value.error_bits == 0b10 and isinstance(info.value, DmIOError)


async def _max_concurrency(client: DmIoClient, n_regions: int, sectors: int) -> int:
    gauge = Gauge()
    regions = [Region(RecordingDevice(64, gauge=gauge, delay=1), 0, sectors)
               for _ in range(n_regions)]
    assert await dm_io(client, IoRequest(W, NONE, BufferMem(bytes(sectors * 512))), regions) == 0
    return gauge.max_active


async def test_reservation_bounds_bios_in_flight(autojump_clock: trio.abc.Clock) -> None:
    assert await _max_concurrency(DmIoClient(1000), 16, 8) == 16  # unbounded control
    client = DmIoClient(reserved_pages=4)
    assert await _max_concurrency(client, 16, 8) == 4
    client.get(4)
    assert await _max_concurrency(client, 16, 8) == 8
    client.put(6)
    assert await _max_concurrency(client, 16, 8) == 2
    assert client.statistics().nr_pages == 2
    with pytest.raises(ValueError):
        client.put(3)


async def test_io_larger_than_reservation_runs_alone(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(100):
        assert await _max_concurrency(DmIoClient(reserved_pages=1), 3, 64) == 1


async def test_reservation_shared_by_concurrent_calls(autojump_clock: trio.abc.Clock) -> None:
    client = DmIoClient(reserved_pages=3)
    gauge = Gauge()

    async def writer() -> None:
        dev = RecordingDevice(64, gauge=gauge, delay=1)
        assert await dm_io(client, IoRequest(W, NONE, BufferMem(bytes(4096))),
                           [Region(dev, 0, 8)]) == 0

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(writer)
    assert gauge.max_active == 3
    assert client.statistics().pages_in_use == 0


async def test_pool_cancelled_waiter_takes_nothing(autojump_clock: trio.abc.Clock) -> None:
    pool = PagePool(2)
    await pool.acquire(2)
    with trio.move_on_after(1):
        await pool.acquire(1)
        pytest.fail("acquired from an exhausted pool")
    assert pool.statistics().tasks_waiting == 0
    pool.release(2)
    await pool.acquire(2)
    assert pool.statistics().pages_in_use == 2


async def test_pool_serves_waiters_in_arrival_order() -> None:
    """A large waiter is not overtaken by a small one that would fit (the NBD
    server's budget relies on it), and a cancelled waiter takes nothing."""
    pool = PagePool(100)
    await pool.acquire(60)
    order: list[str] = []

    async def take(name: str, n: int) -> None:
        await pool.acquire(n)
        order.append(name)
        pool.release(n)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "huge", 100)  # the whole pool: waits for all of it
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "small", 10)  # would fit, but comes second
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0) as scope:  # cancelled while waiting: holds nothing
            await pool.acquire(1)
        assert scope.cancelled_caught and order == []
        pool.release(60)
    assert order == ["huge", "small"] and pool.statistics().pages_in_use == 0
