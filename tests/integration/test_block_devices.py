"""``dmuser serve --block-devices``: a loop device and /dev/mapper/NAME per device.

/dev/mapper is global, so every device name carries this process's pid, and
the ``bd`` fixture removes any link of those names left behind (the daemon
fixture's teardown detaches loop devices on files below the test's directory).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon import Daemon, DaemonFactory
from support.data import make_image
from support.system import fsck_clean, loops_under, mkfs_ext4, wait_until

import dmuser
from dmuser import dmsetup

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


def _settle() -> None:
    """Wait for udev's probes of new block devices (they open them for a moment,
    which counts in the open count, as for a kernel dm device), if udev runs."""
    if shutil.which("udevadm"):
        subprocess.run(["udevadm", "settle", "-t", "30"], capture_output=True, timeout=60)


def ds(d: Daemon, *argv: str) -> tuple[int, str, str]:
    """``dmsetup ARGV`` in process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    rc = dmsetup.main(list(argv), client=dmuser.Client(d.sock, timeout=60), out=out, err=err,
                      stdin=io.StringIO(""))
    return rc, out.getvalue(), err.getvalue()


def ok(d: Daemon, *argv: str) -> str:
    rc, out, err = ds(d, *argv)
    assert (rc, err) == (0, ""), (argv, err)
    return out


@pytest.fixture
def bd(make_daemon: DaemonFactory) -> Iterator[Daemon]:
    """A daemon started with block devices on (the rig turns them off by default)."""
    d = make_daemon(block_devices=True)
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
    _settle()
    assert d.info(name)["open_count"] == 1  # the mount, as the kernel counts it
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


def test_no_block_devices_option_creates_none(daemon: Daemon) -> None:
    d = daemon  # the rig starts it with --no-block-devices
    name = _name("b")
    make_image(d.dir / "a.img", 8 * MiB)
    d.create(name, f"0 {8 * MiB // SECTOR} linear a.img 0")
    assert loops_under(d.dir) == []
    assert not _mapper(name).is_symlink()
    assert "block_device" not in d.json("ls")[0]
    assert d.info(name)["block_device"] == ""


# -- dmsetup's view of the block devices (tests/vectors/dmsetup-blockdev) ---------------


def test_dmsetup_prints_the_block_device_numbers(bd: Daemon) -> None:
    d = bd
    low, up = _name("low"), _name("up")
    make_image(d.dir / "a.img", 8 * MiB)
    ok(d, "create", low, "-u", "U-LOW", "--table", f"0 8192 linear {d.dir / 'a.img'} 0")
    ok(d, "create", up, "--table", f"0 4096 linear /dev/mapper/{low} 0")
    ok(d, "create", _name("b"), "--notable")  # no table, so no block device yet
    _settle()
    devno = {n: d.info(n)["block_devno"] for n in (low, up)}
    loop = {n: os.path.basename(d.info(n)["block_device"]) for n in (low, up)}
    maj, mnr = devno[low].split(":")
    assert ok(d, "ls") == (f"{_name('b')}\t({d.path(_name('b'))})\n"
                           f"{low}\t({devno[low]})\n{up}\t({devno[up]})\n")
    assert ok(d, "info", low) == (
        f"Name:              {low}\nState:             ACTIVE\nRead Ahead:        256\n"
        "Tables present:    LIVE\nOpen count:        0\nEvent number:      0\n"
        f"Major, minor:      {maj}, {mnr}\nNumber of targets: 1\nUUID: U-LOW\n\n")
    assert ok(d, "info", "-c", "--noheadings", "-o", "name,major,minor,devno,blkdevname",
              low, _name("b")) == (f"{low}:{maj}:{mnr}:{devno[low]}:{loop[low]}\n"
                                   f"{_name('b')}:-:-:-:{d.path(_name('b'))}\n")
    assert ok(d, "deps", up) == f"1 dependencies\t: ({maj}, {mnr})\n"
    assert ok(d, "info", "-c", "--noheadings", "-o", "name", "-j", maj, "-m", mnr) == f"{low}\n"
    assert ok(d, "info", "-c", "--noheadings", "-o", "name", "-u", "U-LOW") == f"{low}\n"
    assert ds(d, "info", "-j", maj, "-m", "99999") == (
        1, "", "Device does not exist.\nCommand failed.\n")
    assert ds(d, "info", "-j", maj) == (1, "", "Please specify both major number and minor "
                                           "number.\nCouldn't process command line.\n")


@pytest.mark.mkfs
def test_readonly_table_makes_the_device_read_only(bd: Daemon) -> None:
    d = bd
    name = _name("a")
    make_image(d.dir / "a.img", 16 * MiB)
    table = f"0 {16 * MiB // SECTOR} linear {d.dir / 'a.img'} 0"
    ok(d, "create", name, "--table", table)
    mkfs_ext4(_mapper(name))
    ok(d, "load", name, "-r", "--table", table)
    assert ok(d, "info", "-c", "--noheadings", "-o", "attr,readonly", name) == "LI-w:Writeable\n"
    ok(d, "resume", name)
    assert ok(d, "info", "-c", "--noheadings", "-o", "attr,readonly", name) == "L--r:Read-only\n"
    assert ok(d, "info", name).splitlines()[1] == "State:             ACTIVE (READ-ONLY)"
    assert ok(d, "table", name) == table + "\n"
    before = (d.dir / "a.img").read_bytes()[:4096]
    for path in (_mapper(name), d.path(name)):  # the block device and the file: EPERM
        fd = os.open(path, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"x" * 4096, 0)
            assert exc.value.errno == errno.EPERM, path
        finally:
            os.close(fd)
    assert (d.dir / "a.img").read_bytes()[:4096] == before
    assert subprocess.run(["blockdev", "--getro", str(_mapper(name))], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip() == "1"
    mnt = d.dir / "fsmnt"
    d.mount(str(_mapper(name)), mnt)  # mount(8) falls back to read-only
    assert "ro" in _mount_options(mnt)
    d.umount(mnt)
    ok(d, "load", name, "--table", table)
    ok(d, "resume", name)
    assert ok(d, "info", "-c", "--noheadings", "-o", "attr", name) == "L--w\n"
    d.mount(str(_mapper(name)), mnt)
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
    name = _name("a")
    make_image(d.dir / "a.img", 16 * MiB)
    ok(d, "create", name, "--table", f"0 {16 * MiB // SECTOR} linear {d.dir / 'a.img'} 0")
    mkfs_ext4(_mapper(name))
    mnt = d.dir / "fsmnt"
    d.mount(str(_mapper(name)), mnt)
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
    fsck_clean(_mapper(name))
    d.mount(str(_mapper(name)), mnt)
    assert (mnt / "dirty").read_bytes() == b"d" * 65536
    d.umount(mnt)


@pytest.mark.mkfs
def test_table_swaps_under_a_busy_fs_keep_every_acknowledged_write(bd: Daemon) -> None:
    d = bd
    name = _name("a")
    sectors = 32 * MiB // SECTOR
    make_image(d.dir / "a.img", 32 * MiB)
    img = d.dir / "a.img"
    one = f"0 {sectors} linear {img} 0"
    two = f"0 {sectors // 2} linear {img} 0\n{sectors // 2} {sectors // 2} linear {img} " \
          f"{sectors // 2}\n"  # the same mapping in two targets: a real swap each time
    ok(d, "create", name, "--table", one)
    mkfs_ext4(_mapper(name))
    mnt = d.dir / "fsmnt"
    d.mount(str(_mapper(name)), mnt)
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
    fsck_clean(_mapper(name))
    d.mount(str(_mapper(name)), mnt)
    for fname, data in acked:
        assert (mnt / fname).read_bytes() == data, fname
    d.umount(mnt)


def test_remove_deferred_and_force_as_the_kernel(bd: Daemon) -> None:
    d = bd
    a, b = _name("a"), _name("b")
    make_image(d.dir / "a.img", 8 * MiB)
    for name in (a, b):
        ok(d, "create", name, "--table", f"0 8192 linear {d.dir / 'a.img'} 0")
    _settle()
    fd = os.open(_mapper(a), os.O_RDONLY)
    try:
        assert ok(d, "info", "-c", "--noheadings", "-o", "open", a, b) == "1\n0\n"
        ok(d, "remove", "--deferred", a)
        assert ok(d, "info", a).splitlines()[1] == "State:             ACTIVE (DEFERRED REMOVE)"
        assert ok(d, "info", "-c", "--noheadings", "-o", "attr", a) == "L--w\n"
        ok(d, "message", a, "0", "@cancel_deferred_remove")
        assert ok(d, "info", a).splitlines()[1] == "State:             ACTIVE"
        ok(d, "remove", "--deferred", a)
        assert d.devices() == [a, b]
    finally:
        os.close(fd)
    wait_until(lambda: d.devices() == [b], 10, what="the deferred remove after the close")
    assert not _mapper(a).is_symlink()
    fd = os.open(_mapper(b), os.O_RDONLY)
    try:
        rc, _, err = ds(d, "remove", "--force", b)
        assert rc == 1 and err.endswith(f"device-mapper: remove ioctl on {b}  failed: "
                                        "Device or resource busy\nCommand failed.\n"), err
        assert ok(d, "table", b) == "0 8192 error \n"
        with pytest.raises(OSError) as exc:
            os.pread(fd, 4096, 0)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)
    ok(d, "remove", b)
    assert d.devices() == []


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
