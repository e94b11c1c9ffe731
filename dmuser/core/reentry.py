"""Does a backing file's storage lead back into a FUSE file system, maybe this daemon's?

A backing file may live on a file system whose block device is a loop device
over a FUSE file: a file inside an ext4 mounted from ``/dev/mapper/NAME`` of this
very daemon, or inside a ``fuse2fs`` mount.  A blocking syscall on such a file
may wait for FUSE requests, and if the daemon made it in its trio thread, the
requests it waits for could never be served: an ``fdatasync`` of it writes the
file system's dirty pages through the loop device into our own FUSE file, and
deadlocks.  Such files get a threads-only :class:`~dmuser.core.io_policy.IoPolicy`
(``BackingFiles.acquire``): every syscall in a worker thread, so the trio thread
keeps serving FUSE while the call waits.

:func:`reaches_fuse` follows, from the file's device: a file system's mount
(``/proc/self/mountinfo``: its type, and its source device when the device
number is anonymous, as for btrfs), partitions to their disk, a loop device to
its backing file (``/sys/block/loopN/loop/backing_file``, matched to a mount by
path, never by ``stat``: a ``stat`` of a file on our own mount would be a FUSE
request to ourselves), and device-mapper/md devices to their ``slaves``.  It
reads only sysfs and procfs, so it never blocks on FUSE itself.  Anything it
cannot follow counts as not reaching FUSE (the policy stays the daemon's).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

#: how many devices deep the walk follows (loop on dm on loop on ...)
MAX_DEPTH = 16


@dataclass(frozen=True)
class Mount:
    devno: tuple[int, int]
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    mounts = []
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        try:
            sep = fields.index("-")
            major, minor = fields[2].split(":")
            mounts.append(Mount((int(major), int(minor)), _unescape(fields[4]),
                                fields[sep + 1], _unescape(fields[sep + 2])))
        except (ValueError, IndexError):
            continue
    return mounts


class Walk:
    """One question, with the mount table read once."""

    def __init__(self, sys_root: str = "/sys", mountinfo: str = "/proc/self/mountinfo",
                 dev_dir: str = "/dev/") -> None:
        self.sys_root, self.dev_dir = sys_root, dev_dir
        self.mounts = read_mounts(mountinfo)

    def file(self, path: str) -> bool:
        """Is ``path`` (a regular file or block device node) stored through FUSE?"""
        try:
            return self.stat_result(os.stat(path))
        except OSError:
            return False

    def stat_result(self, st: os.stat_result) -> bool:
        """:meth:`file` for a file already stat'ed."""
        if stat.S_ISBLK(st.st_mode):
            return self.block((os.major(st.st_rdev), os.minor(st.st_rdev)), 0)
        return self.fs((os.major(st.st_dev), os.minor(st.st_dev)), 0)

    def fs(self, devno: tuple[int, int], depth: int) -> bool:
        """Is the file system with device number ``devno`` FUSE, or on a device that is?"""
        mount = next((m for m in self.mounts if m.devno == devno), None)
        if mount is not None and mount.fstype.split(".")[0] in ("fuse", "fuseblk"):
            return True
        if devno[0] != 0:
            return self.block(devno, depth)
        if mount is not None and mount.source.startswith(self.dev_dir):
            try:
                rdev = os.stat(mount.source).st_rdev
            except OSError:
                return False
            return self.block((os.major(rdev), os.minor(rdev)), depth)
        return False

    def path_fs(self, path: str, depth: int) -> bool:
        """Is the file at ``path`` (not stat'ed) on FUSE: its longest-prefix mount's answer."""
        best: Mount | None = None
        for m in self.mounts:
            prefix = m.mountpoint.rstrip("/") + "/"
            if (path == m.mountpoint or path.startswith(prefix)) \
                    and (best is None or len(m.mountpoint) >= len(best.mountpoint)):
                best = m
        return best is not None and self.fs(best.devno, depth + 1)

    def block(self, devno: tuple[int, int], depth: int) -> bool:
        """Is the block device ``devno`` a loop device over FUSE, or built on one?"""
        if depth > MAX_DEPTH:
            return False
        node = os.path.join(self.sys_root, "dev", "block", f"{devno[0]}:{devno[1]}")
        try:
            real = os.path.realpath(node)
        except OSError:
            return False
        if not os.path.isdir(real):
            return False
        if os.path.exists(os.path.join(real, "partition")):
            real = os.path.dirname(real)  # a partition: its disk's loop and slaves
        try:
            with open(os.path.join(real, "loop", "backing_file")) as f:
                backing = f.read().rstrip("\n").removesuffix(" (deleted)")
        except OSError:
            backing = ""
        if backing and self.path_fs(backing, depth):
            return True
        slaves = os.path.join(real, "slaves")
        for name in sorted(os.listdir(slaves)) if os.path.isdir(slaves) else ():
            try:
                with open(os.path.join(slaves, name, "dev")) as f:
                    major, minor = f.read().strip().split(":")
            except (OSError, ValueError):
                continue
            if self.block((int(major), int(minor)), depth + 1):
                return True
        return False


def reaches_fuse(st: os.stat_result) -> bool:
    """True if I/O on the file ``st`` describes may wait for a FUSE daemon (see the
    module docstring)."""
    return Walk().stat_result(st)
