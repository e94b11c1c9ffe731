"""Getting at a file system on a dmuser device: mount it, freeze it, list its files.

With loop devices (root), a device file is attached to a fresh loop device and
that is mounted: the kernel's block layer then sees a disk, as it would see
``/dev/mapper/NAME``.  A fresh loop device is used after every table swap, so
that no page cache of an earlier block device shows stale data.  Without loop
devices, the file system is reached through ``debugfs`` on the device file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from dmuser.demo.files import DebugfsTree, FileInfo, MountedTree, Tree
from dmuser.demo.session import MOUNTPOINT, Session, tool


def _once(s: Session, key: str, text: str) -> None:
    if key not in s.explained:
        s.explained.add(key)
        s.note(text)


def open_tree(s: Session, name: str, mnt: str, ro: bool = False) -> Tree:
    """The ext4 on device ``name``: mounted on ``mnt`` (a fresh loop device), or via debugfs."""
    dev = f"{MOUNTPOINT}/{name}"
    if not s.loop:
        _once(s, "debugfs", f"no loop devices ({s.no_loop_reason}): the file systems are not "
                            f"mounted; their files are written and read with debugfs on the "
                            f"device files instead")
        os.makedirs(s.path("scratch"), exist_ok=True)
        return DebugfsTree(s.path(dev), s.path("scratch"), dev)
    kernel = ("kernel dm: not needed, /dev/mapper/NAME is a block device already; a dmuser "
              "device is a file, and a loop device makes it one" if "losetup" not in s.explained
              else "")
    s.explained.add("losetup")
    loop = s.sh("losetup", "--find", "--show", *(["--read-only"] if ro else []), dev,
                kernel=kernel).strip()
    s.loops.append(loop)
    os.makedirs(s.path(mnt), exist_ok=True)
    opts = ["-o", "ro"] if ro else []
    s.sh("mount", *opts, loop, mnt,
         kernel=f"kernel dm: mount {' '.join(opts + [''])}/dev/mapper/{name} {mnt}")
    s.mounts.append(mnt)
    return MountedTree(s.path(mnt), mnt, loop)


def close_tree(s: Session, tree: Tree) -> None:
    """Unmount and detach the loop device (nothing to do for debugfs)."""
    if isinstance(tree, MountedTree):
        s.sh("umount", tree.where)
        s.mounts.remove(tree.where)
        s.sh("losetup", "--detach", tree.loop)
        s.loops.remove(tree.loop)


@contextmanager
def frozen(s: Session, tree: Tree) -> Iterator[None]:
    """fsfreeze a mounted file system for the body, so that it is consistent on the
    device (LVM does this for a snapshot of a mounted origin).  On an exception the
    file system stays frozen: the teardown resumes the devices first, then thaws."""
    if not isinstance(tree, MountedTree):
        s.note("nothing is mounted, so there is nothing to freeze")
        yield
        return
    s.frozen = tree.root
    s.sh("fsfreeze", "--freeze", tree.where,
         kernel="the same with kernel dm (lvcreate --snapshot does it for you)")
    yield
    s.sh("fsfreeze", "--unfreeze", tree.where)
    s.frozen = None


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n} B"


def show_files(s: Session, label: str, infos: dict[str, FileInfo]) -> None:
    s.say(f"   {label}:")
    for name, i in sorted(infos.items()):
        what = f'"{i.head}"' if i.head else f"sha256 {i.sha[:16]}"
        s.say(f"     {name:<28} {_size(i.size):>10}  {what}")


def fsck(s: Session, name: str) -> None:
    """``e2fsck -fn`` on the device file; it must find nothing to fix (exit status 0)."""
    s.say(f"$ e2fsck -fn {MOUNTPOINT}/{name}")
    s.say(f"# kernel dm: e2fsck -fn /dev/mapper/{name}")
    res = s.call([tool("e2fsck"), "-fn", f"{MOUNTPOINT}/{name}"], "e2fsck")
    lines = res.stdout.strip().splitlines()
    s.say(lines[-1] if lines else "")
    s.check(res.returncode == 0, f"e2fsck -fn finds the file system on {name} clean",
            f"exit status {res.returncode}\n{res.stdout}{res.stderr}")
