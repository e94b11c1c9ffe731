"""Controls on the host's kernel block devices and mounted file systems.

``loopdev.py`` uses these to make a dmuser device behave like a kernel dm device
on its block device: BLKROSET for read-only tables, FIFREEZE/FITHAW around a
suspend (the dm core's lock_fs), the kernel-style open count from ``/proc`` and
whether udev has a device open (``udev_quiet.py``); ``resolve.py`` finds the
node of a ``MAJ:MIN`` table word here.

They are control calls, not the data path: ``blockdev.py`` stays the one module
that moves a bio's bytes.  Every function here may block; the callers run them in
a worker thread (``trio.to_thread``), because the kernel may send I/O back to this
daemon (a loop device on one of its FUSE files) before the call returns.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

_BLKROSET = 0x125D
_FIFREEZE = 0xC0045877
_FITHAW = 0xC0045878


def set_read_only(dev: str, read_only: bool) -> None:
    """BLKROSET on block device ``dev``: writes to it then fail with EPERM and a
    ``mount`` falls back to read-only."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _BLKROSET, struct.pack("i", int(read_only)))
    finally:
        os.close(fd)


def send_change_uevent(dev: str) -> None:
    """Make the kernel send a ``change`` uevent for block device ``dev``
    (``/dev/NAME``) by writing to ``/sys/block/NAME/uevent``, as dm's resume
    does for a dm device (udev then probes it again).  Raises OSError."""
    with open(f"/sys/block/{os.path.basename(dev)}/uevent", "w") as f:
        f.write("change")


def block_device_node(maj_min: str) -> str | None:
    """The /dev node of block device ``MAJ:MIN`` (udev's link, else sysfs's DEVNAME),
    or None if there is no such block device."""
    link = f"/dev/block/{maj_min}"
    if os.path.exists(link):
        return link
    try:
        with open(f"/sys/dev/block/{maj_min}/uevent") as f:
            for line in f:
                if line.startswith("DEVNAME="):
                    return "/dev/" + line.split("=", 1)[1].strip()
    except OSError:
        pass
    return None


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``: where, which superblock (``st_dev`` of
    its files), of what type, mounted from what."""

    path: str
    st_dev: int
    fstype: str
    source: str


def mounts_of(devno: str, dev: str = "") -> list[Mount]:
    """The file systems on block device ``devno`` (``MAJ:MIN``), or whose mount
    source is ``dev`` (``/dev/loopN``, also through a link such as
    ``/dev/mapper/NAME``: btrfs reports an anonymous ``MAJ:MIN``), from
    ``/proc/self/mountinfo``."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 5 or "-" not in fields[5:]:
                continue
            rest = fields[fields.index("-", 5) + 1:]
            source = _unescape(rest[1]) if len(rest) > 1 else ""
            if fields[2] == devno or (dev and source.startswith("/dev/")
                                      and os.path.realpath(source) == dev):
                major, minor = fields[2].split(":")
                found.append(Mount(_unescape(fields[4]), os.makedev(int(major), int(minor)),
                                   rest[0], source))
    return found


def mountpoints_of(devno: str, dev: str = "") -> list[str]:
    """The mount points of :func:`mounts_of`."""
    return [m.path for m in mounts_of(devno, dev)]


def fuse_mountpoints() -> set[str]:
    """The mount points of every FUSE file system (``/proc/self/mountinfo``)."""
    found = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[5:]:
                rest = fields[fields.index("-", 5) + 1:]
                if rest and rest[0].startswith("fuse"):
                    found.add(_unescape(fields[4]))
    return found


def _open_if_same(m: Mount) -> int | None:
    """A directory fd on ``m.path`` if the file system there is still ``m``'s
    superblock (a ``umount`` may have raced the mountinfo read), else None."""
    try:
        fd = os.open(m.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    if os.fstat(fd).st_dev != m.st_dev:
        os.close(fd)
        return None
    return fd


def _ioctl(fd: int, request: int) -> None:
    fcntl.ioctl(fd, request, struct.pack("i", 0))


def freeze_fs(m: Mount) -> bool:
    """FIFREEZE the file system ``m``: it writes back and then blocks new writes
    until :func:`thaw_fs`.  The ioctl goes through an fd checked to be on ``m``'s
    superblock, so a path whose mount changed is never frozen in its place (the
    parent file system).  False if there is nothing to freeze any more or it was
    frozen already (by someone else, who keeps the thaw); other errors raise."""
    fd = _open_if_same(m)
    if fd is None:
        return False
    try:
        _ioctl(fd, _FIFREEZE)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        raise
    finally:
        os.close(fd)
    return True


def thaw_fs(m: Mount, device: str) -> None:
    """FITHAW: undo :func:`freeze_fs` (a file system not frozen, EINVAL, is fine).

    A frozen file system may be unmounted; its superblock then lives on, frozen,
    and holds ``device``.  The kernel thaws through the block device; from here
    the way to that superblock is a private mount of ``device``, which shares it:
    thaw there, then unmount.  Nothing holds ``device`` (an ``O_EXCL`` open
    succeeds): nothing to thaw, and nothing is mounted."""
    fd = _open_if_same(m)
    if fd is not None:
        try:
            _thaw_fd(fd)
        finally:
            os.close(fd)
        return
    try:
        os.close(os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
        return  # not claimed: no superblock lives on
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            return  # the device is gone: so is anything on it
    with tempfile.TemporaryDirectory(prefix="dmuser-thaw-") as tmp:
        subprocess.run(["mount", "-t", m.fstype, device, tmp], check=True, timeout=60,
                       capture_output=True)
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                _thaw_fd(fd)
            finally:
                os.close(fd)
        finally:
            subprocess.run(["umount", tmp], check=True, timeout=60, capture_output=True)


def _thaw_fd(fd: int) -> None:
    try:
        _ioctl(fd, _FITHAW)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise


def _block_fds(pids: Iterable[str]) -> Iterator[tuple[str, int]]:
    """(pid, ``st_rdev``) for each file descriptor of ``pids`` open on a block device."""
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode):
                yield pid, st.st_rdev


def _devno(devno: str) -> int:
    return os.makedev(*map(int, devno.split(":")))


def udev_has_open(devno: str) -> bool:
    """True if a udev process (``systemd-udevd`` or one of its workers, which hold
    the device open for the whole of an event's rules) has ``MAJ:MIN`` open."""
    def is_udev(pid: str) -> bool:
        try:
            with open(f"/proc/{pid}/comm") as f:
                return "udev" in f.read()
        except OSError:
            return False

    rdev = _devno(devno)
    udev = (pid for pid in os.listdir("/proc") if pid.isdigit() and is_udev(pid))
    return any(r == rdev for _, r in _block_fds(udev))


def openers(devnos: list[str]) -> dict[str, int]:
    """How many times each block device ``MAJ:MIN`` is open, as the kernel's open
    count of a dm device would count it: one per file descriptor of any process
    (``/proc/*/fd``), one if a file system is mounted on it, one per holder
    (another block device stacked on it, ``/sys/dev/block/MAJ:MIN/holders``)."""
    wanted = {_devno(d): d for d in devnos}
    counts = dict.fromkeys(devnos, 0)
    for _, rdev in _block_fds(pid for pid in os.listdir("/proc") if pid.isdigit()):
        if rdev in wanted:
            counts[wanted[rdev]] += 1
    for devno in devnos:
        if mountpoints_of(devno, os.path.realpath(f"/dev/block/{devno}")):
            counts[devno] += 1
        with contextlib.suppress(OSError):
            counts[devno] += len(os.listdir(f"/sys/dev/block/{devno}/holders"))
    return counts
