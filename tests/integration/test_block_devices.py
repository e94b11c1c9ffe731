"""``dmuser serve --block-devices``: a loop device and /dev/mapper/NAME per device.

/dev/mapper is global, so every device name carries this process's pid, and
the ``bd`` fixture removes any link of those names left behind (the daemon
fixture's teardown detaches loop devices on files below the test's directory).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon import Daemon, DaemonFactory
from support.data import make_image
from support.system import fsck_clean, loops_under, mkfs_ext4, wait_until

MiB = 1 << 20
SECTOR = 512

pytestmark = [pytest.mark.root, pytest.mark.loop, pytest.mark.fuse]


def _name(tag: str) -> str:
    return f"dmubd{os.getpid()}{tag}"


def _getsz(dev: str | Path) -> int:
    out = subprocess.run(["blockdev", "--getsz", str(dev)], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return int(out)


def _mapper(name: str) -> Path:
    return Path("/dev/mapper") / name


@pytest.fixture
def bd(make_daemon: DaemonFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """A daemon started with block devices on (by its environment variable)."""
    monkeypatch.setenv("DMUSER_BLOCK_DEVICES", "1")
    d = make_daemon()
    try:
        yield d
    finally:
        d.unstack()
        for tag in ("a", "b", "up", "low"):
            link = _mapper(_name(tag))
            if link.is_symlink():
                link.unlink()


def test_getsz_mkfs_mount_write_fsck(bd: Daemon) -> None:
    d = bd
    name = _name("a")
    make_image(d.dir / "a.img", 40 * MiB)
    sectors = 32 * MiB // SECTOR
    d.create(name, f"0 {sectors} linear a.img 2048")
    link = _mapper(name)
    assert link.is_symlink() and os.readlink(link).startswith("../loop")
    assert _getsz(link) == sectors
    info = d.info(name)
    assert info["block_device"] == os.path.realpath(link)
    rdev = os.stat(link).st_rdev
    assert info["block_devno"] == f"{os.major(rdev)}:{os.minor(rdev)}"
    assert d.json("ls")[0]["block_device"] == info["block_device"]
    assert "Block device:" in d.cli("info", name).stdout

    mkfs_ext4(link)
    mnt = d.dir / "fsmnt"
    d.mount(str(link), mnt)
    (mnt / "hello").write_bytes(os.urandom(3 * MiB))
    os.sync()
    d.umount(mnt)
    fsck_clean(link)


def test_reload_to_a_larger_size_updates_the_capacity(bd: Daemon) -> None:
    d = bd
    name = _name("a")
    make_image(d.dir / "a.img", 16 * MiB)
    d.create(name, f"0 {8 * MiB // SECTOR} linear a.img 0")
    assert _getsz(_mapper(name)) == 8 * MiB // SECTOR
    d.reload(name, f"0 {16 * MiB // SECTOR} linear a.img 0")
    d.cli("resume", name)
    assert _getsz(_mapper(name)) == 16 * MiB // SECTOR


def test_remove_refused_while_mounted_force_after_umount(bd: Daemon) -> None:
    d = bd
    name = _name("a")
    make_image(d.dir / "a.img", 16 * MiB)
    d.create(name, f"0 {16 * MiB // SECTOR} linear a.img 0")
    loop = d.info(name)["block_device"]
    mkfs_ext4(_mapper(name))
    mnt = d.dir / "fsmnt"
    d.mount(str(_mapper(name)), mnt)
    res = d.cli("remove", name, check=False)
    assert res.returncode == 1
    assert "busy" in res.stderr and loop in res.stderr, res.stderr
    assert d.devices() == [name]
    d.umount(mnt)
    d.cli("remove", name, "--force")
    assert d.devices() == []
    assert not _mapper(name).is_symlink()
    wait_until(lambda: not loops_under(d.dir), 10, what="the loop device to be detached")


def test_dev_mapper_words_resolve_in_process(bd: Daemon) -> None:
    d = bd
    low, up = _name("low"), _name("up")
    make_image(d.dir / "a.img", 16 * MiB)
    d.create(low, f"0 {16 * MiB // SECTOR} linear a.img 0")
    loop = d.info(low)["block_device"]
    devno = d.info(low)["block_devno"]
    for word in (str(_mapper(low)), loop, devno):
        d.create(up, f"0 {8 * MiB // SECTOR} linear {word} 2048")
        # stacked on the mapped device itself, never on its loop device
        assert d.table_lines(up)[0].split()[3] == str(d.path(low))
        res = d.cli("remove", low, check=False)
        assert res.returncode == 1 and "in use" in res.stderr
        d.cli("remove", up)
    assert d.devices() == [low]


def test_kill9_then_restart_cleans_loop_and_link(bd: Daemon) -> None:
    d = bd
    name = _name("a")
    make_image(d.dir / "a.img", 8 * MiB)
    d.create(name, f"0 {8 * MiB // SECTOR} linear a.img 0")
    loop = d.info(name)["block_device"]
    assert loops_under(d.dir) == [loop]
    d.signal(signal.SIGKILL)
    d.wait()
    assert _mapper(name).is_symlink()
    d.start()
    assert loops_under(d.dir) == []
    assert not _mapper(name).is_symlink()
    assert "detached " + loop in d.log_text()


def test_default_creates_no_block_device(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    d = daemon
    name = _name("b")
    make_image(d.dir / "a.img", 8 * MiB)
    d.create(name, f"0 {8 * MiB // SECTOR} linear a.img 0")
    assert loops_under(d.dir) == []
    assert not _mapper(name).is_symlink()
    assert "block_device" not in d.json("ls")[0]
    assert d.info(name)["block_device"] == ""
