"""FileDevice durability flags: PREFLUSH syncs before the write, FUA makes the
write itself durable (RWF_DSYNC, or write + fdatasync where the flag is
refused), and a flagged read/write is one worker-thread call."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from dmuser.core import blockdev
from dmuser.core.bio import Bio, ReqFlag
from dmuser.core.blockdev import FileDevice

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
        real_sync, real_pwritev, real_thread = os.fdatasync, os.pwritev, trio.to_thread.run_sync

        def fdatasync(fd: int) -> None:
            self.calls.append("fdatasync")
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


@pytest.mark.parametrize("flags, expected", [
    (ReqFlag.FUA, ["thread", "pwrite-dsync"]),
    (ReqFlag.PREFLUSH, ["thread", "fdatasync"]),
    (ReqFlag.PREFLUSH | ReqFlag.FUA, ["thread", "fdatasync", "pwrite-dsync"]),
    (ReqFlag.NONE, []),
])
async def test_flagged_write_is_one_thread_call_in_order(
        dev: FileDevice, monkeypatch: pytest.MonkeyPatch, flags: ReqFlag,
        expected: list[str]) -> None:
    trace = Trace(monkeypatch)
    data = os.urandom(4 * S)
    await dev.submit(Bio.write(8, data, flags))
    assert trace.calls == expected
    assert Path(dev.path).read_bytes()[8 * S : 12 * S] == data


async def test_fua_falls_back_to_fdatasync_when_rwf_dsync_is_refused(
        dev: FileDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = Trace(monkeypatch, refuse_dsync=True)
    data = os.urandom(2 * S)
    await dev.submit(Bio.write(3, data, ReqFlag.FUA))
    assert trace.calls == ["thread", "dsync-refused", "fdatasync"]
    assert Path(dev.path).read_bytes()[3 * S : 5 * S] == data


async def test_empty_flush_is_fdatasync(dev: FileDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    trace = Trace(monkeypatch)
    await dev.submit(Bio.flush())
    assert trace.calls == ["thread", "fdatasync"]
