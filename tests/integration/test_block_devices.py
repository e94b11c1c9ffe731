"""``dmuser serve --block-devices``: a loop device and /dev/mapper/NAME per device.

dmsetup's view of them (numbers, tables, mknodes, remove) is in
``test_block_devices_dmsetup.py``; the helpers in ``support/blockdev.py``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.blockdev import (
    bd_name,
    block_device_daemon,
    getsz,
    mapper,
    mounted_ext4,
    ok,
    settle,
    udev_rules_of,
)
from support.daemon import Daemon, DaemonFactory
from support.data import make_image
from support.system import fsck_clean, loops_under, mkfs_ext4, wait_until

MiB = 1 << 20
SECTOR = 512

pytestmark = [pytest.mark.root, pytest.mark.loop, pytest.mark.fuse]


@pytest.fixture
def bd(make_daemon: DaemonFactory) -> Iterator[Daemon]:
    with block_device_daemon(make_daemon) as d:
        yield d


def test_getsz_mkfs_mount_write_fsck(bd: Daemon) -> None:
    d = bd
    name = bd_name("a")
    make_image(d.dir / "a.img", 40 * MiB)
    sectors = 32 * MiB // SECTOR
    d.create(name, f"0 {sectors} linear a.img 2048")
    link = mapper(name)
    assert link.is_symlink() and os.readlink(link).startswith("../loop")
    assert getsz(link) == sectors
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
    name = bd_name("a")
    make_image(d.dir / "a.img", 16 * MiB)
    d.create(name, f"0 {8 * MiB // SECTOR} linear a.img 0")
    assert getsz(mapper(name)) == 8 * MiB // SECTOR
    d.reload(name, f"0 {16 * MiB // SECTOR} linear a.img 0")
    d.cli("resume", name)
    assert getsz(mapper(name)) == 16 * MiB // SECTOR


def test_remove_refused_while_mounted_force_after_umount(bd: Daemon) -> None:
    d = bd
    name = bd_name("a")
    make_image(d.dir / "a.img", 16 * MiB)
    d.create(name, f"0 {16 * MiB // SECTOR} linear a.img 0")
    loop = d.info(name)["block_device"]
    mkfs_ext4(mapper(name))
    mnt = d.dir / "fsmnt"
    d.mount(str(mapper(name)), mnt)
    settle()
    assert d.info(name)["open_count"] == 1  # the mount, as the kernel counts it
    res = d.cli("remove", name, check=False)
    assert res.returncode == 1
    assert "busy" in res.stderr and loop in res.stderr, res.stderr
    assert d.devices() == [name]
    d.umount(mnt)
    d.cli("remove", name, "--force")
    assert d.devices() == []
    assert not mapper(name).is_symlink()
    wait_until(lambda: not loops_under(d.dir), 10, what="the loop device to be detached")


def test_dev_mapper_words_resolve_in_process(bd: Daemon) -> None:
    d = bd
    low, up = bd_name("low"), bd_name("up")
    make_image(d.dir / "a.img", 16 * MiB)
    d.create(low, f"0 {16 * MiB // SECTOR} linear a.img 0")
    loop = d.info(low)["block_device"]
    devno = d.info(low)["block_devno"]
    for word in (str(mapper(low)), loop, devno):
        d.create(up, f"0 {8 * MiB // SECTOR} linear {word} 2048")
        # stacked on the mapped device itself, never on its loop device; printed as
        # the kernel prints every device of a table: MAJ:MIN (tests/vectors/dm-table-devno)
        assert d.table_lines(up) == [f"0 {8 * MiB // SECTOR} linear {devno} 2048"]
        res = d.cli("remove", low, check=False)
        assert res.returncode == 1 and "in use" in res.stderr
        d.cli("remove", up)
    assert d.devices() == [low]
    # what `table` prints loads back; a mirror's status names its legs the same way
    make_image(d.dir / "b.img", 8 * MiB)
    b_img = d.dir / "b.img"
    ok(d, "create", up, "--table", f"0 2048 mirror core 1 512 2 {mapper(low)} 4096 {b_img} 0")
    table = ok(d, "table", up)
    assert table == f"0 2048 mirror core 1 512 2 {devno} 4096 {b_img} 0\n"
    assert ok(d, "status", up).startswith(f"0 2048 mirror 2 {devno} {b_img} ")
    ok(d, "reload", up, "--table", f"0 2048 linear {devno} 0")
    ok(d, "resume", up)
    ok(d, "reload", up, "--table", table)
    ok(d, "resume", up)
    assert ok(d, "table", up) == table
    assert ok(d, "deps", up) == f"2 dependencies\t: ({b_img}) ({devno.replace(':', ', ')})\n"


def test_kill9_then_restart_cleans_loop_and_link(bd: Daemon) -> None:
    d = bd
    name = bd_name("a")
    make_image(d.dir / "a.img", 8 * MiB)
    d.create(name, f"0 {8 * MiB // SECTOR} linear a.img 0")
    loop = d.info(name)["block_device"]
    assert loops_under(d.dir) == [loop]
    d.signal(signal.SIGKILL)
    d.wait()
    assert mapper(name).is_symlink()
    left = udev_rules_of(d)  # with udev: the daemon's rule (udev_quiet.py)
    assert len(left) == (os.path.isdir("/run/udev") and shutil.which("udevadm") is not None)
    # and one of a daemon killed on a mountpoint no daemon will use again
    other = Path("/run/udev/rules.d") / f"59-dmuser-test{os.getpid()}.rules"
    if left:
        other.write_text(f"# mountpoint: {d.dir / 'gone'}\n")
    d.start()
    assert loops_under(d.dir) == []
    assert not mapper(name).is_symlink()
    assert "detached " + loop in d.log_text()
    assert udev_rules_of(d) == [] and not other.exists()


def test_no_block_devices_option_creates_none(daemon: Daemon) -> None:
    d = daemon  # the rig starts it with --no-block-devices
    name = bd_name("b")
    make_image(d.dir / "a.img", 8 * MiB)
    d.create(name, f"0 {8 * MiB // SECTOR} linear a.img 0")
    assert loops_under(d.dir) == []
    assert not mapper(name).is_symlink()
    assert "block_device" not in d.json("ls")[0]
    assert d.info(name)["block_device"] == ""


@pytest.mark.mkfs
def test_readonly_table_makes_the_device_read_only(bd: Daemon) -> None:
    d = bd
    name = bd_name("a")
    make_image(d.dir / "a.img", 16 * MiB)
    table = f"0 {16 * MiB // SECTOR} linear {d.dir / 'a.img'} 0"
    ok(d, "create", name, "--table", table)
    mkfs_ext4(mapper(name))
    ok(d, "load", name, "-r", "--table", table)
    assert ok(d, "info", "-c", "--noheadings", "-o", "attr,readonly", name) == "LI-w:Writeable\n"
    ok(d, "resume", name)
    assert ok(d, "info", "-c", "--noheadings", "-o", "attr,readonly", name) == "L--r:Read-only\n"
    assert ok(d, "info", name).splitlines()[1] == "State:             ACTIVE (READ-ONLY)"
    assert ok(d, "table", name) == table + "\n"
    before = (d.dir / "a.img").read_bytes()[:4096]
    for path in (mapper(name), d.path(name)):  # the block device and the file: EPERM
        fd = os.open(path, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"x" * 4096, 0)
            assert exc.value.errno == errno.EPERM, path
        finally:
            os.close(fd)
    assert (d.dir / "a.img").read_bytes()[:4096] == before
    assert subprocess.run(["blockdev", "--getro", str(mapper(name))], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip() == "1"
    mnt = d.dir / "fsmnt"
    d.mount(str(mapper(name)), mnt)  # mount(8) falls back to read-only
    assert "ro" in _mount_options(mnt)
    d.umount(mnt)
    ok(d, "load", name, "--table", table)
    ok(d, "resume", name)
    assert ok(d, "info", "-c", "--noheadings", "-o", "attr", name) == "L--w\n"
    d.mount(str(mapper(name)), mnt)
    assert "rw" in _mount_options(mnt)
    (mnt / "f").write_bytes(b"written")
    d.umount(mnt)


def _mount_options(mnt: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mnt):
                return fields[5].split(",")
    raise AssertionError(f"{mnt} is not mounted")


def _grew(items: list[tuple[str, bytes]], seen: int) -> bool:
    return len(items) > seen


def _thaw(mnt: Path) -> bool:
    """``fsfreeze -u``: True if the file system was frozen (and is thawed now), False
    if it was not (EINVAL).  Only on a running device: ext4's thaw writes."""
    return subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True,
                          timeout=30).returncode == 0


def _frozen_while_suspended(d: Daemon, name: str, mnt: Path) -> bool:
    """Whether the file system on suspended ``name`` is frozen: ``fsfreeze -f`` of a
    frozen one fails at once (EBUSY); of one not frozen it would write back through
    the suspended device and wait, so that case is told by the resume letting it
    finish (and the freeze it made is undone)."""
    proc = subprocess.Popen(["fsfreeze", "-f", str(mnt)], stderr=subprocess.DEVNULL)
    with contextlib.suppress(AssertionError):
        wait_until(lambda: proc.poll() is not None, 10, what="fsfreeze -f to return")
    if proc.returncode is not None and proc.returncode != 0:
        return True
    ok(d, "resume", name)  # not frozen by the suspend: undo what fsfreeze did
    proc.wait(30)
    _thaw(mnt)
    return False


@pytest.mark.mkfs
def test_suspend_freezes_the_mounted_fs_unless_nolockfs(bd: Daemon) -> None:
    d = bd
    name = bd_name("a")
    mnt = mounted_ext4(d, name)
    (mnt / "dirty").write_bytes(b"d" * 65536)  # written back by the freeze, not lost
    ok(d, "suspend", name)
    assert _frozen_while_suspended(d, name, mnt)
    ok(d, "resume", name)
    assert not _thaw(mnt)  # the resume thawed it
    assert f"froze {mnt}" in d.log_text()
    os.sync()
    ok(d, "suspend", "--nolockfs", name)
    ok(d, "resume", name)
    assert not _thaw(mnt)  # never frozen
    assert d.log_text().count(f"froze {mnt}") == 1
    d.umount(mnt)
    fsck_clean(mapper(name))
    d.mount(str(mapper(name)), mnt)
    assert (mnt / "dirty").read_bytes() == b"d" * 65536
    d.umount(mnt)


@pytest.mark.mkfs
def test_a_fs_unmounted_while_frozen_is_thawed_at_resume(bd: Daemon) -> None:
    """generic/085's race: ``umount`` between the suspend's freeze and the resume.
    The frozen superblock lives on and holds the block device; the resume must
    still thaw it (the kernel thaws through the block device), else the device
    stays claimed for good and nothing can mount or remove it."""
    d = bd
    name = bd_name("a")
    mnt = mounted_ext4(d, name)
    (mnt / "f").write_bytes(b"f" * 8192)
    ok(d, "suspend", name)
    d.umount(mnt)  # allowed on a frozen fs; its superblock stays, frozen
    ok(d, "resume", name)
    assert "cannot thaw" not in d.log_text()
    d.mount(str(mapper(name)), mnt)  # the same superblock
    assert not _thaw(mnt)  # ... not frozen any more (a frozen one is thawed here: no hang)
    (mnt / "g").write_bytes(b"g" * 8192)
    d.umount(mnt)
    ok(d, "remove", name)  # nothing holds the device
    fsck_clean(d.dir / "a.img")


@pytest.mark.mkfs
def test_table_swaps_under_a_busy_fs_keep_every_acknowledged_write(bd: Daemon) -> None:
    d = bd
    name = bd_name("a")
    sectors = 32 * MiB // SECTOR
    make_image(d.dir / "a.img", 32 * MiB)
    img = d.dir / "a.img"
    one = f"0 {sectors} linear {img} 0"
    two = f"0 {sectors // 2} linear {img} 0\n{sectors // 2} {sectors // 2} linear {img} " \
          f"{sectors // 2}\n"  # the same mapping in two targets: a real swap each time
    ok(d, "create", name, "--table", one)
    mkfs_ext4(mapper(name))
    mnt = d.dir / "fsmnt"
    d.mount(str(mapper(name)), mnt)
    acked: list[tuple[str, bytes]] = []
    stop = threading.Event()
    failure: list[BaseException] = []

    def writer() -> None:
        try:
            n = 0
            while not stop.is_set():
                data = os.urandom(4096 + 512 * (n % 64))
                fd = os.open(mnt / f"f{n}", os.O_WRONLY | os.O_CREAT)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                acked.append((f"f{n}", data))
                n += 1
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for i in range(6):
            wait_until(functools.partial(_grew, acked, len(acked)), 30,
                       what="the writer to progress")
            ok(d, "suspend", name)
            ok(d, "load", name, "--table", two if i % 2 == 0 else one)
            ok(d, "resume", name)
    finally:
        stop.set()
        thread.join(60)
    assert not failure, failure
    assert len(acked) > 6
    d.umount(mnt)
    fsck_clean(mapper(name))
    d.mount(str(mapper(name)), mnt)
    for fname, data in acked:
        assert (mnt / fname).read_bytes() == data, fname
    d.umount(mnt)


@pytest.mark.mkfs
def test_a_table_claims_its_block_devices(make_daemon: DaemonFactory) -> None:
    """generic/741: a block device a live table uses cannot be mounted (EBUSY); the
    claim is shared by every table on it, kept across a reload and dropped with
    the last table."""
    d = make_daemon()  # no block devices of its own needed
    make_image(d.dir / "a.img", 16 * MiB)
    loop = d.losetup(d.dir / "a.img")
    mkfs_ext4(loop)
    rdev = os.stat(loop).st_rdev
    devno = f"{os.major(rdev)}:{os.minor(rdev)}"
    mnt = d.dir / "fsmnt"
    mnt.mkdir()

    def mount() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["mount", loop, str(mnt)], capture_output=True, text=True,
                              timeout=30)

    d.request("create", name="x", table=f"0 8192 linear {loop} 0")
    d.request("create", name="y", table=f"0 8192 linear {devno} 8192")  # dm allows a second
    assert d.table_lines("x") == [f"0 8192 linear {devno} 0"]  # as the kernel: MAJ:MIN
    d.request("reload", name="x", table=f"0 4096 linear {loop} 0")  # the claim is kept
    d.request("resume", name="x")
    res = mount()
    assert res.returncode != 0 and "busy" in res.stderr, res.stderr
    d.request("remove", name="x")
    assert mount().returncode != 0
    d.request("remove", name="y")
    res = mount()
    assert res.returncode == 0, res.stderr
    d.fs_mounts.append(str(mnt))
    d.umount(mnt)
