"""kcopyd: splitting, error semantics, WRITE_SEQ, zeroing, memory bound, callbacks, throttle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from support.data import pattern
from support.fakes import Gauge, MemDevice, RecordingDevice

from dmuser.core.bio import Bio, Op
from dmuser.core.blockdev import FileDevice
from dmuser.services.dm_io import Region
from dmuser.services.kcopyd import CopyResult, KcopydClient, KcopydFlag, KcopydThrottle

MiB_SECTORS = 2048
BIG = 5 * MiB_SECTORS  # 5 MiB: ten 512 KiB slices
IGN, SEQ = KcopydFlag.IGNORE_ERROR, KcopydFlag.WRITE_SEQ


def source(nr_sectors: int, seed: int = 7, **options: Any) -> RecordingDevice:
    """A source device of pseudo-random content (``pattern(seed, ...)``)."""
    return RecordingDevice(nr_sectors, "src", seed=seed, **options)


def filled(nr_sectors: int, byte: int = 0xAA, name: str = "dst",
           **options: Any) -> RecordingDevice:
    """A destination device filled with ``byte``."""
    return RecordingDevice(nr_sectors, name, fill=byte, **options)


def sectors(dev: MemDevice, start: int, count: int) -> bytes:
    return bytes(dev.buf[start * 512 : (start + count) * 512])


@pytest.mark.parametrize("count", [100, 1024, BIG])
@pytest.mark.parametrize("n_dests", [1, 2, 3])
async def test_copy_is_byte_exact(count: int, n_dests: int) -> None:
    src = source(BIG + 50)
    dests = [filled(BIG + 300, name=f"d{i}") for i in range(n_dests)]
    regions = [Region(d, 10 + 37 * i, count) for i, d in enumerate(dests)]
    async with KcopydClient() as kc:
        assert await kc.copy_wait(Region(src, 50, count), regions) == CopyResult(False, 0)
    for r, d in zip(regions, dests, strict=True):
        assert sectors(d, r.sector, count) == sectors(src, 50, count)
        assert sectors(d, 0, r.sector) == b"\xaa" * (r.sector * 512)  # nothing before
        assert d.buf[(r.sector + count) * 512] == 0xAA  # nothing after


async def test_copy_between_files(tmp_path: Path) -> None:
    data = pattern(3, BIG * 512)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(bytes(len(data)))
    a, b = FileDevice(str(tmp_path / "a")), FileDevice(str(tmp_path / "b"))
    try:
        async with KcopydClient() as kc:
            res = await kc.copy_wait(Region(a, 0, BIG), [Region(b, 0, BIG)])
        assert res == CopyResult(False, 0)
    finally:
        a.close()
        b.close()
    assert (tmp_path / "b").read_bytes() == data


async def test_small_inline_copies_run_in_the_worker(tmp_path: Path) -> None:
    """Small file copies submitted while the worker is idle run there (I/O, then
    callback); the rest get a task.  Either way: byte-exact, one callback at a
    time from one task, every page given back, cached buffers within the pool."""
    data = pattern(4, 64 * 128 * 512)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(bytes(len(data)))
    (tmp_path / "c").write_bytes(bytes(len(data)))
    a, b, c = (FileDevice(str(tmp_path / n)) for n in "abc")
    tasks: set[trio.lowlevel.Task] = set()
    order: list[int] = []
    active, max_active = [0], [0]

    async def callback(read_err: bool, write_err: int, context: Any) -> None:
        assert (read_err, write_err) == (False, 0)
        tasks.add(trio.lowlevel.current_task())
        active[0] += 1
        max_active[0] = max(max_active[0], active[0])
        await trio.lowlevel.checkpoint()
        active[0] -= 1
        order.append(context)

    try:
        async with KcopydClient(nr_pages=64) as kc:
            for i in range(64):
                kc.copy(Region(a, 128 * i, 128), [Region(b, 128 * i, 128), Region(c, 128 * i, 128)],
                        0, callback, i)
                if i % 3 == 0:
                    await trio.sleep(0)
            # one at a time, from the worker (the idle-worker case is the first one)
            result = await kc.copy_wait(Region(a, 0, 128), [Region(b, 0, 128)])
            assert result == CopyResult(False, 0)
            assert kc._cached_pages + kc.statistics().pages_in_use <= 64
        assert kc.statistics().pages_in_use == 0 and kc.statistics().jobs_done == 65
    finally:
        for dev in (a, b, c):
            dev.close()
    assert sorted(order) == list(range(64)) and max_active[0] == 1
    assert len(tasks) == 1 and trio.lowlevel.current_task() not in tasks
    assert (tmp_path / "b").read_bytes() == data and (tmp_path / "c").read_bytes() == data


async def test_small_job_is_one_read_and_one_write_per_dest() -> None:
    src, d1, d2 = source(2048), filled(2048), filled(2048)
    async with KcopydClient() as kc:
        await kc.copy_wait(Region(src, 0, 1024), [Region(d1, 0, 1024), Region(d2, 0, 1024)])
    assert [(b.op, b.sector, b.nr_sectors) for b in src.bios] == [(Op.READ, 0, 1024)]
    assert [(b.op, b.sector, b.nr_sectors) for b in d1.bios + d2.bios] == [(Op.WRITE, 0, 1024)] * 2


async def test_large_job_runs_parallel_slices(autojump_clock: trio.abc.Clock) -> None:
    src, dst = source(BIG, delay=lambda bio: 1), filled(BIG)
    async with KcopydClient(nr_pages=8 * 128) as kc:
        await kc.copy_wait(Region(src, 0, BIG), [Region(dst, 0, BIG)])
    assert sorted(b.sector for b in src.bios) == list(range(0, BIG, 1024))
    assert all(b.nr_sectors == 1024 for b in src.bios)
    assert src.gauge.max_bytes == 8 * 1024 * 512  # split count 8
    assert trio.current_time() == pytest.approx(2)  # 8 slices, then 2


async def test_sub_job_size_and_split_count_are_tunable() -> None:
    src = source(BIG)
    async with KcopydClient(sub_job_size=256, split_count=3) as kc:
        assert kc.sub_job_size == 256
        await kc.copy_wait(Region(src, 0, 1000), [Region(filled(BIG), 0, 1000)])
    assert sorted((b.sector, b.nr_sectors) for b in src.bios) == [
        (0, 256), (256, 256), (512, 256), (768, 232)]
    assert KcopydClient(sub_job_size=0).sub_job_size == 1024
    assert KcopydClient(sub_job_size=5000).sub_job_size == 2048
    assert KcopydClient().statistics().nr_pages == 128
    assert KcopydClient(sub_job_size=2048).statistics().nr_pages == 256


async def test_read_error_stops_job_without_writing_that_slice() -> None:
    src = source(BIG)
    src.fail_sectors.add(3 * 1024 + 5)  # slice 3
    dst = filled(BIG)
    async with KcopydClient(split_count=1) as kc:
        res = await kc.copy_wait(Region(src, 0, BIG), [Region(dst, 0, BIG)])
    assert res == CopyResult(True, 0)
    assert sorted(b.sector for b in src.bios) == [0, 1024, 2048, 3072]  # no new slice after
    assert sectors(dst, 0, 3072) == sectors(src, 0, 3072)
    assert sectors(dst, 3072, BIG - 3072) == b"\xaa" * ((BIG - 3072) * 512)


async def test_read_error_with_ignore_error_writes_zeros() -> None:
    src = source(BIG)
    src.fail_sectors.add(3 * 1024 + 5)
    dst = filled(BIG)
    async with KcopydClient() as kc:
        res = await kc.copy_wait(Region(src, 0, BIG), [Region(dst, 0, BIG)], IGN)
    assert res == CopyResult(True, 0)
    assert len(src.bios) == 10
    assert sectors(dst, 3072, 1024) == bytes(1024 * 512)
    assert sectors(dst, 0, 3072) == sectors(src, 0, 3072)
    assert sectors(dst, 4096, BIG - 4096) == sectors(src, 4096, BIG - 4096)


@pytest.mark.parametrize("count", [512, BIG])
async def test_failing_destination_sets_exactly_its_bit(count: int) -> None:
    src, ok0, bad, ok2 = source(BIG), filled(BIG), filled(BIG), filled(BIG)
    bad.fail_all = True
    dests = [Region(d, 0, count) for d in (ok0, bad, ok2)]
    async with KcopydClient() as kc:
        assert await kc.copy_wait(Region(src, 0, count), dests[:2]) == CopyResult(False, 0b10)
        assert await kc.copy_wait(Region(src, 0, count), dests, IGN) == CopyResult(False, 0b10)
    assert sectors(ok0, 0, count) == sectors(src, 0, count)
    assert sectors(ok2, 0, count) == sectors(src, 0, count)


async def test_write_err_is_or_over_slices_with_ignore_error() -> None:
    src, d0, d1, d2 = source(BIG), filled(BIG), filled(BIG), filled(BIG)
    d0.fail_sectors.add(1024 + 3)  # slice 1 on dest 0
    d2.fail_sectors.add(5 * 1024)  # slice 5 on dest 2
    async with KcopydClient() as kc:
        res = await kc.copy_wait(Region(src, 0, BIG), [Region(d, 0, BIG) for d in (d0, d1, d2)],
                                 IGN)
    assert res == CopyResult(False, 0b101)
    assert sectors(d1, 0, BIG) == sectors(src, 0, BIG)
    assert sectors(d0, 2048, BIG - 2048) == sectors(src, 2048, BIG - 2048)


def _slow_early_reads(bio: Bio) -> float:
    """Reads of early slices take longest, so slices finish in reverse order."""
    return (20 - bio.sector // 1024) if bio.op is Op.READ else 1


async def test_without_write_seq_writes_complete_out_of_order(
        autojump_clock: trio.abc.Clock) -> None:
    src, dst = source(BIG, delay=_slow_early_reads), filled(BIG)
    async with KcopydClient(nr_pages=10 * 128, split_count=10) as kc:
        await kc.copy_wait(Region(src, 0, BIG), [Region(dst, 0, BIG)])
    order = [b.sector for b in dst.bios]
    assert order != sorted(order)  # the WRITE_SEQ test below would notice a regression


async def test_split_job_calls_back_once_after_every_slice_with_errors_merged(
        autojump_clock: trio.abc.Clock) -> None:
    """The master's callback waits for all sub-jobs (slices finish out of order here)."""
    src, d0, d1 = source(BIG, delay=_slow_early_reads), filled(BIG), filled(BIG, name="d1")
    d1.fail_sectors.add(7 * 1024)  # slice 7 on dest 1, which finishes before slices 0..6
    seen: list[tuple[bool, int, int, int]] = []

    def callback(read_err: bool, write_err: int, _context: Any) -> None:
        seen.append((read_err, write_err, len(d0.done), len(d1.done)))

    async with KcopydClient(nr_pages=10 * 128, split_count=10) as kc:
        kc.copy(Region(src, 0, BIG), [Region(d0, 0, BIG), Region(d1, 0, BIG)], IGN, callback)
    assert seen == [(False, 0b10, 10, 9)]  # once, every write done, bit 1 only
    assert sectors(d0, 0, BIG) == sectors(src, 0, BIG)


async def test_write_seq_writes_in_ascending_order_one_at_a_time(
        autojump_clock: trio.abc.Clock) -> None:
    src, dst = source(BIG, delay=_slow_early_reads), filled(BIG)
    async with KcopydClient(nr_pages=10 * 128, split_count=10) as kc:
        assert await kc.copy_wait(Region(src, 0, BIG), [Region(dst, 0, BIG)], SEQ) == \
            CopyResult(False, 0)
    assert [b.sector for b in dst.bios] == list(range(0, BIG, 1024))
    assert dst.gauge.max_writes == 1
    assert sectors(dst, 0, BIG) == sectors(src, 0, BIG)


async def test_write_seq_stops_writing_after_failed_write(autojump_clock: trio.abc.Clock) -> None:
    src, dst = source(BIG, delay=_slow_early_reads), filled(BIG)
    dst.fail_sectors.add(2 * 1024 + 1)  # slice 2
    async with KcopydClient(nr_pages=10 * 128, split_count=10) as kc:
        res = await kc.copy_wait(Region(src, 0, BIG), [Region(dst, 0, BIG)], SEQ | IGN)
    assert res == CopyResult(False, 1)
    assert [b.sector for b in dst.bios] == [0, 1024, 2048]  # later slices never written
    assert sectors(dst, 3072, BIG - 3072) == b"\xaa" * ((BIG - 3072) * 512)


async def test_write_seq_cancels_ignore_error_on_read_error(
        autojump_clock: trio.abc.Clock) -> None:
    src, dst = source(BIG, delay=_slow_early_reads), filled(BIG)
    src.fail_sectors.add(2 * 1024)
    async with KcopydClient(nr_pages=10 * 128, split_count=10) as kc:
        res = await kc.copy_wait(Region(src, 0, BIG), [Region(dst, 0, BIG)], SEQ | IGN)
    assert res == CopyResult(True, 0)
    assert [b.sector for b in dst.bios] == [0, 1024]  # no zeros written for slice 2


async def test_zero_uses_write_zeroes_when_every_dest_supports_it() -> None:
    a, b = filled(BIG), filled(BIG)
    async with KcopydClient() as kc:
        assert await kc.zero_wait([Region(a, 8, BIG - 8), Region(b, 0, BIG)]) == \
            CopyResult(False, 0)
    assert {bio.op for bio in a.bios + b.bios} == {Op.WRITE_ZEROES}
    assert all(bio.data is None for bio in a.bios)
    assert sectors(a, 8, BIG - 8) == bytes((BIG - 8) * 512)
    assert sectors(a, 0, 8) == b"\xaa" * 4096
    assert sectors(b, 0, BIG - 8) == bytes((BIG - 8) * 512)  # dests[0].count sectors
    assert sectors(b, BIG - 8, 8) == b"\xaa" * 4096


async def test_zero_falls_back_to_writing_zeros() -> None:
    a, b = filled(BIG), RecordingDevice(BIG, write_zeroes=False)
    b.buf[:] = b"\xbb" * len(b.buf)
    async with KcopydClient() as kc:
        assert await kc.zero_wait([Region(a, 0, BIG), Region(b, 0, BIG)]) == CopyResult(False, 0)
    assert {bio.op for bio in a.bios + b.bios} == {Op.WRITE}
    assert len(a.bios) == 10
    assert a.buf == bytes(BIG * 512) and b.buf == bytes(BIG * 512)


async def test_zero_count_job_calls_back_without_io() -> None:
    src, dst = source(64), filled(64)
    async with KcopydClient() as kc:
        assert await kc.copy_wait(Region(src, 0, 0), [Region(dst, 0, 0)]) == CopyResult(False, 0)
        assert await kc.zero_wait([Region(dst, 0, 0)]) == CopyResult(False, 0)
    assert src.bios == [] and dst.bios == []


@pytest.mark.parametrize("nr_pages", [256, 16])
async def test_page_pool_bounds_bytes_in_flight(nr_pages: int,
                                                autojump_clock: trio.abc.Clock) -> None:
    gauge = Gauge()
    src = source(BIG, gauge=gauge, delay=lambda bio: 1)
    dst = filled(BIG, gauge=gauge, delay=lambda bio: 1)
    seen: list[int] = []
    async with KcopydClient(nr_pages=nr_pages) as kc:
        kc.copy(Region(src, 0, BIG), [Region(dst, 0, BIG)], 0, lambda r, w, c: None)
        while kc.statistics().jobs_in_flight:
            seen.append(kc.statistics().pages_in_use)
            await trio.sleep(0.5)
    # 256 pages = two 128-page sub-jobs; 16 pages: one sub-job runs alone.
    assert gauge.max_bytes == max(nr_pages, 128) * 4096
    assert max(seen) == max(nr_pages, 128)
    assert sectors(dst, 0, BIG) == sectors(src, 0, BIG)


async def test_exit_waits_for_jobs_and_jobs_started_by_callbacks(
        autojump_clock: trio.abc.Clock) -> None:
    src, dst = source(BIG, delay=lambda bio: 3), filled(BIG)
    results: list[tuple[bool, int, Any]] = []

    def second(read_err: bool, write_err: int, context: Any) -> None:
        results.append((read_err, write_err, context))

    def first(read_err: bool, write_err: int, context: Any) -> None:
        results.append((read_err, write_err, context))
        kc.copy(Region(src, 1024, 1024), [Region(dst, 1024, 1024)], 0, second, "two")

    async with KcopydClient() as kc:
        kc.copy(Region(src, 0, 1024), [Region(dst, 0, 1024)], 0, first, "one")
        assert results == []
    assert results == [(False, 0, "one"), (False, 0, "two")]
    assert sectors(dst, 0, 2048) == sectors(src, 0, 2048)
    assert kc.statistics().jobs_done == 2 and kc.statistics().sectors_copied == 2048


async def test_callbacks_run_one_at_a_time_in_one_worker(autojump_clock: trio.abc.Clock) -> None:
    src = source(4096)
    tasks: set[trio.lowlevel.Task] = set()
    active, max_active, count = [0], [0], [0]

    async def callback(read_err: bool, write_err: int, context: Any) -> None:
        tasks.add(trio.lowlevel.current_task())
        active[0] += 1
        max_active[0] = max(max_active[0], active[0])
        await trio.sleep(1)
        active[0] -= 1
        count[0] += 1

    async with KcopydClient() as kc:
        for i in range(20):
            kc.copy(Region(src, 8 * i, 8), [Region(filled(64), 0, 8)], 0, callback, i)
    assert count[0] == 20 and max_active[0] == 1
    assert len(tasks) == 1 and trio.lowlevel.current_task() not in tasks


async def test_prepared_callback_runs_in_worker() -> None:
    got: list[tuple[bool, int, Any]] = []
    async with KcopydClient() as kc:
        job = kc.prepare_callback(lambda r, w, c: got.append((r, w, c)), "ctx")
        assert kc.statistics().jobs_in_flight == 1
        job.do_callback(False, 0b101)
        with pytest.raises(RuntimeError):
            job.do_callback()
    assert got == [(False, 0b101, "ctx")]


async def test_misuse_raises() -> None:
    src = source(64)
    kc = KcopydClient()
    with pytest.raises(RuntimeError):
        kc.copy(Region(src, 0, 8), [Region(filled(64), 0, 8)], 0, lambda r, w, c: None)
    async with kc:
        with pytest.raises(ValueError):
            await kc.copy_wait(Region(src, 0, 8), [Region(filled(64), 0, 8)] * 9)
        with pytest.raises(ValueError):
            await kc.copy_wait(Region(src, 0, 8), [])
        assert kc.statistics().jobs_in_flight == 0
        assert await kc.copy_wait(Region(src, 0, 8), [Region(filled(64), 0, 8)] * 8) == \
            CopyResult(False, 0)


async def _timed_copy(throttle: KcopydThrottle) -> float:
    src = source(BIG, delay=lambda bio: 0.05)
    start = trio.current_time()
    async with KcopydClient(throttle=throttle) as kc:
        assert await kc.copy_wait(Region(src, 0, BIG), [Region(filled(BIG), 0, BIG)]) == \
            CopyResult(False, 0)
    return trio.current_time() - start


async def test_throttle_slows_copies(autojump_clock: trio.abc.Clock) -> None:
    free = KcopydThrottle(100)
    unthrottled = await _timed_copy(free)
    assert free.sleeps == 0
    limited = KcopydThrottle(20)
    throttled = await _timed_copy(limited)
    assert limited.sleeps > 0
    assert throttled > 3 * unthrottled


async def test_cancelled_copy_wait_does_not_stop_the_job(autojump_clock: trio.abc.Clock) -> None:
    src, dst = source(BIG, delay=lambda bio: 10), filled(BIG)
    async with KcopydClient() as kc:
        with trio.move_on_after(1):
            await kc.copy_wait(Region(src, 0, BIG), [Region(dst, 0, BIG)])
        assert kc.statistics().jobs_in_flight == 1
    assert kc.statistics().jobs_done == 1
    assert sectors(dst, 0, BIG) == sectors(src, 0, BIG)


async def test_error_in_body_cancels_jobs_without_callbacks(
        autojump_clock: trio.abc.Clock) -> None:
    src, dst = source(BIG, delay=lambda bio: 100), filled(BIG)
    called: list[Any] = []
    caught = False
    try:
        async with KcopydClient() as kc:
            kc.copy(Region(src, 0, BIG), [Region(dst, 0, BIG)], 0, lambda *a: called.append(a))
            await trio.sleep(1)
            raise KeyError("boom")
    except* KeyError:
        caught = True
    assert caught and called == []
    assert trio.current_time() < 50  # did not wait for the 100 s read
