"""FileDevice durability flags: PREFLUSH syncs before the write, FUA makes the
write itself durable (RWF_DSYNC, or write + fdatasync where the flag is
refused), and a flagged read/write is one call.  That call, and an empty
flush's fdatasync, run inline while the daemon is idle, else in a worker
thread (IoPolicy.sync)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from dmuser.core import blockdev
from dmuser.core.bio import Bio, ReqFlag
from dmuser.core.blockdev import FileDevice
from dmuser.core.config import Config
from dmuser.core.io_policy import IoPolicy

S = 512


@pytest.fixture
def dev(tmp_path: Path) -> FileDevice:
    path = tmp_path / "f.img"
    path.write_bytes(bytes(64 * S))
    d = FileDevice(str(path))
    yield d
    d.close()


class Trace:
    """Records fdatasync / pwritev(RWF_DSYNC) / thread hand-offs in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse_dsync: bool = False) -> None:
        self.calls: list[str] = []
        #: per fdatasync: whether it ran in the thread that made the Trace (the trio thread)
        self.sync_in_trio_thread: list[bool] = []
        main_thread = threading.get_ident()
        real_sync, real_pwritev, real_thread = os.fdatasync, os.pwritev, trio.to_thread.run_sync

        def fdatasync(fd: int) -> None:
            self.calls.append("fdatasync")
            self.sync_in_trio_thread.append(threading.get_ident() == main_thread)
            real_sync(fd)

        def pwritev(fd: int, bufs: list, offset: int, flags: int = 0) -> int:
            if flags & os.RWF_DSYNC:
                if refuse_dsync:
                    self.calls.append("dsync-refused")
                    raise OSError(errno.EOPNOTSUPP, "no RWF_DSYNC here")
                self.calls.append("pwrite-dsync")
            return real_pwritev(fd, bufs, offset, flags)

        async def run_sync(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls.append("thread")
            return await real_thread(fn, *args, **kwargs)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(blockdev.trio.to_thread, "run_sync", run_sync)


FLAGGED = [
    (ReqFlag.FUA, ["pwrite-dsync"]),
    (ReqFlag.PREFLUSH, ["fdatasync"]),
    (ReqFlag.PREFLUSH | ReqFlag.FUA, ["fdatasync", "pwrite-dsync"]),
]


@pytest.mark.parametrize("flags, expected", [*FLAGGED, (ReqFlag.NONE, [])])
async def test_flagged_write_is_one_inline_call_in_order_when_idle(
        dev: FileDevice, monkeypatch: pytest.MonkeyPatch, flags: ReqFlag,
        expected: list[str]) -> None:
    trace = Trace(monkeypatch)
    data = os.urandom(4 * S)
    await dev.submit(Bio.write(8, data, flags))
    assert trace.calls == expected
    assert all(trace.sync_in_trio_thread)
    assert Path(dev.path).read_bytes()[8 * S : 12 * S] == data


@pytest.mark.parametrize("flags, expected", FLAGGED)
@pytest.mark.parametrize("why", ["inline_flush off", "larger than inline_max_bytes"])
async def test_flagged_write_is_one_thread_call_in_order_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: ReqFlag,
        expected: list[str], why: str) -> None:
    (tmp_path / "f.img").write_bytes(bytes(64 * S))
    config = Config(inline_flush=False) if why == "inline_flush off" \
        else Config(inline_max_bytes=2 * S)
    d = FileDevice(str(tmp_path / "f.img"), IoPolicy(config))
    trace = Trace(monkeypatch)
    data = os.urandom(4 * S)
    try:
        await d.submit(Bio.write(8, data, flags))
    finally:
        d.close()
    assert trace.calls == ["thread", *expected]
    assert not any(trace.sync_in_trio_thread)
    assert Path(d.path).read_bytes()[8 * S : 12 * S] == data


async def test_fua_falls_back_to_fdatasync_when_rwf_dsync_is_refused(
        dev: FileDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = Trace(monkeypatch, refuse_dsync=True)
    data = os.urandom(2 * S)
    await dev.submit(Bio.write(3, data, ReqFlag.FUA))
    assert trace.calls == ["dsync-refused", "fdatasync"]
    assert Path(dev.path).read_bytes()[3 * S : 5 * S] == data


async def test_empty_flush_is_inline_fdatasync_when_idle(
        dev: FileDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = Trace(monkeypatch)
    await dev.submit(Bio.flush())
    assert trace.calls == ["fdatasync"]
    assert trace.sync_in_trio_thread == [True]


async def test_empty_flush_in_a_thread_when_inline_flush_is_off(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "f.img").write_bytes(bytes(8 * S))
    d = FileDevice(str(tmp_path / "f.img"), IoPolicy(Config(inline_flush=False)))
    trace = Trace(monkeypatch)
    try:
        await d.submit(Bio.flush())
    finally:
        d.close()
    assert trace.calls == ["thread", "fdatasync"]
    assert trace.sync_in_trio_thread == [False]


async def test_concurrent_flushes_overlap_in_threads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two flushes at once (a mirror's legs) must not run one after the other
    inline: each finds the other and goes to a worker thread."""
    policy = IoPolicy()
    devs = []
    for n in ("a", "b"):
        (tmp_path / n).write_bytes(bytes(8 * S))
        devs.append(FileDevice(str(tmp_path / n), policy))
    trace = Trace(monkeypatch)
    try:
        async with trio.open_nursery() as nursery:
            for d in devs:
                nursery.start_soon(d.submit, Bio.flush())
    finally:
        for d in devs:
            d.close()
    assert sorted(trace.calls) == ["fdatasync", "fdatasync", "thread", "thread"]
    assert trace.sync_in_trio_thread == [False, False]


async def test_flush_goes_to_a_thread_while_a_worker_thread_is_busy(
        dev: FileDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = Trace(monkeypatch)
    release = threading.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: trio.to_thread.run_sync(release.wait,
                                                            limiter=dev.policy.limiter))
        await trio.testing.wait_all_tasks_blocked()
        assert dev.policy.limiter.borrowed_tokens == 1
        await dev.submit(Bio.flush())
        release.set()
    assert trace.calls == ["thread", "thread", "fdatasync"]
    assert trace.sync_in_trio_thread == [False]


async def test_cancelled_flush_does_not_sync(
        dev: FileDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = Trace(monkeypatch)
    with trio.CancelScope() as scope:
        scope.cancel()
        await dev.submit(Bio.flush())
    assert scope.cancelled_caught
    assert trace.calls == []
