"""FileDevice write-behind: after ``write_behind_bytes`` of plain writes since the
last flush, the file's writeback is started in a worker thread that no request
waits for, one at a time per file, on a duplicate descriptor that is closed
afterwards.  Writes (direct path, inline and threaded) count; a flush resets
the count; 0 turns it off."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio

from dmuser.core import blockdev
from dmuser.core.bio import Bio
from dmuser.core.blockdev import FileDevice
from dmuser.core.config import Config
from dmuser.core.io_policy import IoPolicy

K = 4096
LIMIT = 16 * K


class Kicks:
    """Stands in for the sync_file_range call; can hold it until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold: bool = False) -> None:
        self.fds: list[int] = []
        self.threads: list[int] = []
        self.release = threading.Event()
        self.finished = threading.Event()
        if not hold:
            self.release.set()

        def fake(fd: int) -> None:
            self.fds.append(fd)
            self.threads.append(threading.get_ident())
            self.release.wait(30)
            os.close(fd)
            self.finished.set()

        monkeypatch.setattr(blockdev, "_start_writeback", fake)


def make(tmp_path: Path, limit: int = LIMIT, **config: int) -> FileDevice:
    path = tmp_path / "f.img"
    path.write_bytes(bytes(256 * K))
    return FileDevice(str(path), IoPolicy(Config(write_behind_bytes=limit, **config)))


async def settle(dev: FileDevice) -> None:
    """Wait (bounded) until the device's write-behind thread has returned."""
    with trio.fail_after(30):
        while dev._write_behind_running:
            await trio.sleep(0.005)


async def test_one_writeback_per_limit_off_the_trio_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kicks = Kicks(monkeypatch)
    dev = make(tmp_path)
    try:
        for i in range(LIMIT // K - 1):
            dev.pwrite_inline(i * 8, b"a" * K)
        assert kicks.fds == []
        dev.pwrite_inline(0, b"b" * K)  # reaches the limit
        await settle(dev)
        assert len(kicks.fds) == 1 and kicks.threads[0] != threading.get_ident()
        for i in range(LIMIT // K):  # counted from zero again
            await dev.submit(Bio.write(i * 8, bytearray(K)))
        await settle(dev)
        assert len(kicks.fds) == 2 and kicks.fds[0] != dev.fd
        assert os.pread(dev.fd, K, 0) == bytes(K)  # the writes themselves happened
    finally:
        dev.close()


async def test_threaded_writes_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kicks = Kicks(monkeypatch)
    dev = make(tmp_path, inline_max_bytes=0)  # every write in a worker thread
    try:
        await dev.submit(Bio.write(0, bytearray(LIMIT)))
        await settle(dev)
        assert len(kicks.fds) == 1
    finally:
        dev.close()


async def test_never_two_at_once_and_writes_do_not_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kicks = Kicks(monkeypatch, hold=True)
    dev = make(tmp_path)
    try:
        dev.pwrite_inline(0, b"x" * LIMIT)
        for _ in range(3):  # three more limits' worth while the first is held
            dev.pwrite_inline(0, b"y" * LIMIT)
        with trio.fail_after(30):
            while not kicks.fds:  # the first one has started (in its thread)
                await trio.sleep(0.005)
        assert len(kicks.fds) == 1 and not kicks.finished.is_set()
        kicks.release.set()
        await settle(dev)
        dev.pwrite_inline(0, b"z" * K)  # the count kept growing: next write starts one
        await settle(dev)
        assert len(kicks.fds) == 2
    finally:
        kicks.release.set()
        dev.close()


async def test_a_flush_resets_the_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kicks = Kicks(monkeypatch)
    dev = make(tmp_path)
    try:
        for _ in range(3):
            dev.pwrite_inline(0, b"a" * (LIMIT - K))
            await dev.submit(Bio.flush())
        assert kicks.fds == []
    finally:
        dev.close()


async def test_zero_turns_it_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kicks = Kicks(monkeypatch)
    dev = make(tmp_path, limit=0)
    try:
        for _ in range(8):
            dev.pwrite_inline(0, b"a" * LIMIT)
        assert kicks.fds == [] and not dev._write_behind_running
    finally:
        dev.close()


async def test_the_real_call_leaves_no_descriptor_and_survives_close(tmp_path: Path) -> None:
    dev = make(tmp_path)
    before = set(os.listdir("/proc/self/fd"))
    dev.pwrite_inline(0, os.urandom(LIMIT))
    dev.close()  # while the writeback call may still run: it has its own descriptor
    await settle(dev)
    assert set(os.listdir("/proc/self/fd")) <= before
