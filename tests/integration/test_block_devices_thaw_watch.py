"""A file system frozen by a suspend is thawed even if the daemon is killed
(``dmuser/core/thaw_watch.py``; ``dmuser serve --block-devices``, root)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.blockdev import bd_name, block_device_daemon, mapper, mounted_ext4, ok
from support.daemon import Daemon, DaemonFactory
from support.system import wait_until

pytestmark = [pytest.mark.root, pytest.mark.loop, pytest.mark.fuse, pytest.mark.mkfs,
              pytest.mark.timeout(90)]


@pytest.fixture
def bd(make_daemon: DaemonFactory) -> Iterator[Daemon]:
    with block_device_daemon(make_daemon) as d:
        yield d


def _watchers(daemon_pid: int) -> list[int]:
    """The pids of the thaw watchers the daemon ``daemon_pid`` started."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"dmuser.core.thaw_watch" in argv and ppid == daemon_pid:
            found.append(int(proc.name))
    return found


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def test_a_fs_frozen_by_a_killed_daemon_is_thawed(bd: Daemon) -> None:
    d = bd
    name = bd_name("a")
    mnt = mounted_ext4(d, name)

    # the first freeze starts the daemon's watcher; it stays for later ones
    assert d.pid is not None
    assert _watchers(d.pid) == []
    ok(d, "suspend", name)
    watchers = _watchers(d.pid)
    assert len(watchers) == 1
    ok(d, "resume", name)
    ok(d, "suspend", name)
    assert _watchers(d.pid) == watchers
    assert d.log_text().count(f"froze {mnt}") == 2
    returned = threading.Event()

    def writer() -> None:
        with contextlib.suppress(OSError):  # EIO once the daemon is gone: still returns
            (mnt / "after").write_bytes(b"w")  # waits while the fs is frozen
        returned.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        d.signal(signal.SIGKILL)
        d.wait()
        wait_until(returned.is_set, 30, what="the writer on the frozen fs to return")
        wait_until(lambda: not _alive(watchers[0]), 30, what="the thaw watcher to exit")
        assert f"its daemon is gone and {mnt} was frozen: thawed it" in d.log_text()
    finally:
        if not returned.is_set():  # never leave a writer stuck on a frozen fs
            subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True, timeout=30)
        thread.join(30)
        with contextlib.suppress(subprocess.CalledProcessError):
            d.umount(mnt)
        d.start()  # detaches the dead daemon's loop device, removes its link and udev rule
    assert not mapper(name).is_symlink()
