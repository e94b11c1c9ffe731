"""dm-io parallel bios: large bios of one request run in worker threads, started at once.

What must hold whatever runs where: every region gets the same data, bit i of
the result is exactly ``regions[i]``'s failure, a started thread is always
waited for (also when the caller is cancelled), small bios stay inline.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from dmuser import blockdev
from dmuser.bio import Bio, Op, ReqFlag
from dmuser.blockdev import POLICY, FileDevice, ThreadedBio
from dmuser.dm_io import BufferMem, DmIoClient, IoRequest, Region, dm_io

MiB = 1 << 20
SECTORS = 4096  # 2 MiB files


class JournalFile(FileDevice):
    """A FileDevice that records which thread ran each bio's syscalls."""

    def __init__(self, path: Path, journal: list[tuple[str, str]]) -> None:
        super().__init__(str(path))
        self.journal = journal
        self.fail = False

    def _submit_blocking(self, bio: Bio) -> None:
        self.journal.append((self.path, "thread" if threading.current_thread()
                             is not threading.main_thread() else "main"))
        if self.fail:
            raise OSError(5, "injected")
        super()._submit_blocking(bio)

    async def _submit(self, bio: Bio) -> None:
        self.journal.append((self.path, "inline"))
        if self.fail:
            raise OSError(5, "injected")
        await super()._submit(bio)


@pytest.fixture(autouse=True)
def parallel_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel bios are off by default (``POLICY.parallel_min_bytes`` 0): turn them on."""
    monkeypatch.setattr(POLICY, "parallel_min_bytes", 256 << 10)


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(3):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes(SECTORS * 512))
        paths.append(p)
    return paths


async def test_large_write_to_several_regions_uses_threads_and_lands_everywhere(
        files: list[Path]) -> None:
    journal: list[tuple[str, str]] = []
    devs = [JournalFile(p, journal) for p in files]
    data = os.urandom(MiB)
    bits = await dm_io(DmIoClient(), IoRequest(Op.WRITE, ReqFlag.NONE, BufferMem(data)),
                       [Region(d, 2048, 2048) for d in devs])
    assert bits == 0
    for p in files:
        assert p.read_bytes()[MiB:] == data
    kinds = sorted(kind for _, kind in journal)
    # every bio but the last one in threads; the trio thread writes one itself
    assert kinds == ["inline", "thread", "thread"]
    for d in devs:
        d.close()


async def test_error_bits_are_per_region_when_threaded(files: list[Path]) -> None:
    journal: list[tuple[str, str]] = []
    devs = [JournalFile(p, journal) for p in files]
    devs[0].fail = True  # runs in a thread
    devs[2].fail = True  # runs inline
    data = os.urandom(MiB)
    bits = await dm_io(DmIoClient(), IoRequest(Op.WRITE, ReqFlag.NONE, BufferMem(data)),
                       [Region(d, 0, 2048) for d in devs])
    assert bits == 0b101
    assert files[1].read_bytes()[:MiB] == data
    assert {kind for path, kind in journal if path == devs[0].path} == {"thread"}
    for d in devs:
        d.close()


async def test_small_bios_stay_inline(files: list[Path]) -> None:
    journal: list[tuple[str, str]] = []
    devs = [JournalFile(p, journal) for p in files]
    small = POLICY.parallel_min_bytes // 512 - 8
    await dm_io(DmIoClient(), IoRequest(Op.WRITE, ReqFlag.NONE, BufferMem(bytes(small * 512))),
                [Region(d, 0, small) for d in devs])
    assert [kind for _, kind in journal] == ["inline"] * 3
    for d in devs:
        d.close()


async def test_preflush_and_fua_run_in_the_thread_in_order(
        files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_sync, real_write = os.fdatasync, blockdev._pwrite_durable
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append("sync"), real_sync(fd))[1])
    monkeypatch.setattr(blockdev, "_pwrite_durable",  # FUA: the write made durable itself
                        lambda *a: (calls.append("durable write"), real_write(*a))[1])
    dev = FileDevice(str(files[0]))
    handle = dev.start_submit(Bio(Op.WRITE, 0, 2048, memoryview(bytearray(MiB)),
                                  ReqFlag.PREFLUSH | ReqFlag.FUA))
    assert isinstance(handle, ThreadedBio)
    await handle.wait()
    assert calls == ["sync", "durable write"]
    dev.close()


async def test_cancelled_caller_still_waits_for_its_threads(files: list[Path]) -> None:
    """A cancelled request never leaves a thread writing into memory it gave back."""
    gate = threading.Event()
    finished: list[bool] = []

    class Slow(FileDevice):
        def _submit_blocking(self, bio: Bio) -> None:
            gate.wait(5)
            super()._submit_blocking(bio)
            finished.append(True)

    devs = [Slow(str(files[0])), Slow(str(files[1]))]
    data = os.urandom(MiB)
    with trio.CancelScope() as scope:
        scope.cancel()
        trio.lowlevel.current_trio_token().run_sync_soon(gate.set)
        await dm_io(DmIoClient(), IoRequest(Op.WRITE, ReqFlag.NONE, BufferMem(data)),
                    [Region(d, 0, 2048) for d in devs])
    # whatever was started has finished before dm_io returned or raised
    assert len(finished) in (0, 1, 2)
    started = len(finished)
    await trio.sleep(0.05)
    assert len(finished) == started
    for d in devs:
        d.close()


async def write_1m_to_two(files: list[Path]) -> list[str]:
    """One 1 MiB dm-io write to the first two files; where each bio ran."""
    journal: list[tuple[str, str]] = []
    devs = [JournalFile(p, journal) for p in files[:2]]
    try:
        await dm_io(DmIoClient(), IoRequest(Op.WRITE, ReqFlag.NONE, BufferMem(bytes(MiB))),
                    [Region(d, 0, 2048) for d in devs])
    finally:
        for d in devs:
            d.close()
    return [kind for _, kind in journal]


async def test_off_by_default_means_inline(files: list[Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(POLICY, "parallel_min_bytes", 0)
    assert await write_1m_to_two(files) == ["inline", "inline"]


async def test_no_free_thread_falls_back_to_inline(files: list[Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(POLICY, "limiter", trio.CapacityLimiter(1))
    token = object()
    POLICY.limiter.acquire_on_behalf_of_nowait(token)  # the only thread is busy
    try:
        assert await write_1m_to_two(files) == ["inline", "inline"]
    finally:
        POLICY.limiter.release_on_behalf_of(token)
