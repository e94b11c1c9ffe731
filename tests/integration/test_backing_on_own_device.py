"""A backing file inside a file system mounted from one of the daemon's own devices.

An ``fdatasync`` of such a file writes that file system's dirty pages through
the loop device into the daemon's own FUSE file; made in the daemon's trio
thread (an inline flush), it would wait for requests only that thread serves.
``core/reentry.py`` finds such files and ``core/backing.py`` gives them a
threads-only I/O policy; this test fails (times out) without that.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.blockdev import bd_name, block_device_daemon, mapper
from support.daemon import Daemon, DaemonFactory
from support.data import make_image
from support.system import mkfs_ext4

from dmuser.core.reentry import Walk, read_mounts

MiB = 1 << 20
SECTOR = 512

pytestmark = [pytest.mark.root, pytest.mark.loop, pytest.mark.fuse]

WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for i in range(64):
    os.pwrite(fd, bytes([i + 1]) * 65536, i * 65536)
    os.fsync(fd)
os.close(fd)
"""


@pytest.fixture
def bd(make_daemon: DaemonFactory) -> Iterator[Daemon]:
    with block_device_daemon(make_daemon) as d:
        yield d


CONNECTIONS = Path("/sys/fs/fuse/connections")


@contextlib.contextmanager
def fusectl() -> Iterator[None]:
    """fusectl mounted while the test runs: mounted up front, because once the
    daemon hangs, mount(8) may hang on the daemon's mount too."""
    mounted = any(m.mountpoint == str(CONNECTIONS) for m in read_mounts())
    if not mounted:
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(CONNECTIONS)], check=True,
                       timeout=30)
    try:
        yield
    finally:
        if not mounted:
            subprocess.run(["umount", str(CONNECTIONS)], check=False, timeout=30)


def abort_fuse(mountpoint: Path) -> None:
    """Abort the FUSE connection of ``mountpoint``, so that a deadlocked daemon and
    everything waiting on it fail instead of hanging the run.  The connection is
    found in mountinfo: a ``stat`` of the mount would hang too."""
    conn = next((m.devno[1] for m in read_mounts() if m.mountpoint == str(mountpoint)), None)
    if conn is not None:
        (CONNECTIONS / str(conn) / "abort").write_text("1")


def test_fsync_of_a_device_whose_file_lives_on_our_own_device(bd: Daemon) -> None:
    d = bd
    low, up = bd_name("low"), bd_name("up")
    make_image(d.dir / "low.img", 64 * MiB)
    d.create(low, f"0 {64 * MiB // SECTOR} linear low.img 0")
    mkfs_ext4(mapper(low))
    mnt = d.dir / "fsmnt"
    d.mount(str(mapper(low)), mnt)
    image = mnt / "up.img"
    make_image(image, 4 * MiB)
    assert Walk().file(str(image))          # found: a loop device over our FUSE file
    assert not Walk().file(str(d.dir / "low.img"))
    failure: list[BaseException] = []

    def work() -> None:
        try:
            d.create(up, f"0 {4 * MiB // SECTOR} linear {image} 0")
            # every fsync is a flush of `up`: an fdatasync of up.img, written back via `low`
            subprocess.run([sys.executable, "-c", WRITER, d.path(up)], check=True, timeout=60)
            d.cli("remove", up)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            failure.append(exc)

    with fusectl():
        worker = threading.Thread(target=work, daemon=True)
        worker.start()
        worker.join(60)
        deadlocked = worker.is_alive()
        if deadlocked:  # free the daemon, then fail
            abort_fuse(d.mnt)
            worker.join(60)
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        d.umount(mnt)
    assert not deadlocked, "the daemon waited for itself: an I/O of up.img ran in its trio thread"
    assert not failure, failure
    d.mount(str(mapper(low)), mnt)
    try:
        with open(image, "rb") as f:
            for i in range(64):
                assert f.read(65536) == bytes([i + 1]) * 65536, i
    finally:
        d.umount(mnt)
