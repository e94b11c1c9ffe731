"""A file system on a device or an image file, with or without root: mkfs, mount, fsck.

Why: a test that checks "ext4 on this device survives X" should read the same
whether it runs as root (CI) or as a user without any privilege (a laptop).
:func:`mounted` picks the way:

* **root** -- the kernel's file system on a loop device.  A dmuser device
  that already has a block device (``/dev/mapper/NAME`` to a loop device on
  the device's own file: ``dmuser serve --block-devices``) is mounted through
  that one; otherwise a loop device is attached for the mount and detached
  after it.
* **no root** -- ``fuse2fs`` (ext2/3/4 only), run in the foreground as a child
  process of this one.  Its own writes bypass the journal, and Debian 12's
  fuse2fs (1.47.0) crashes (SIGSEGV) on an ext4 whose journal needs recovery
  -- the state a power cut leaves -- so such a journal is first replayed by
  ``e2fsck -E journal_only`` (what a kernel mount would do), unless the
  options say ``norecovery``.  See ``docs/testing-with-dmuser.md``.

Guarantees: :func:`mounted` always unmounts when its block ends, also when the
body raises or is interrupted (``KeyboardInterrupt``); a fuse2fs mount is
undone with ``fusermount3 -u`` and then the fuse2fs process is *waited for*,
so every write it cached is on the device when the block ends.  If the mount
is busy it is detached lazily and the process killed after a grace period.
The mount directory is made below ``workdir`` when given, so the plugin's
sweep (``rig.py``) finds it even after the test process was killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

__all__ = ["FUSE2FS_TYPES", "fsck", "mkfs", "mount_way", "mounted", "needs_recovery"]

#: the file system types fuse2fs serves (the only ones :func:`mounted` can mount without root)
FUSE2FS_TYPES = ("ext2", "ext3", "ext4")
MOUNT_TIMEOUT = 30.0
Way = Literal["auto", "kernel", "fuse2fs"]


def _run(cmd: list[str], what: str, timeout: float = 120) -> str:
    if not shutil.which(cmd[0]):
        raise FileNotFoundError(f"{what}: {cmd[0]} not found in PATH")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise OSError(f"{what}: {' '.join(cmd)} failed ({res.returncode}): "
                      f"{(res.stderr or res.stdout).strip()}")
    return res.stdout


def mkfs(target: os.PathLike[str] | str, fstype: str = "ext4", *options: str) -> None:
    """``mkfs.<fstype> -F -q`` on a device file or an image (no root needed).  ext2/3/4
    get ``-E nodiscard``: a discard of a device file is not a zeroing the fs may rely on."""
    extra = ["-E", "nodiscard"] if fstype in FUSE2FS_TYPES else []
    _run([f"mkfs.{fstype}", "-F", "-q", *extra, *options, os.fspath(target)], "mkfs")


def fsck(target: os.PathLike[str] | str, *, repair: bool = False) -> str:
    """``e2fsck -f`` read-only (``-n``) or, with ``repair``, fixing (``-p``, preen: what
    a boot would do after a crash).  Returns its report; raises :class:`OSError` with it
    when the file system has (or had, with ``repair``) errors it could not fix."""
    res = subprocess.run(["e2fsck", "-f", "-p" if repair else "-n", os.fspath(target)],
                         capture_output=True, text=True, timeout=300)
    bad = res.returncode >= 2 if repair else res.returncode != 0  # -p: 1 = errors fixed
    if bad:
        raise OSError(f"e2fsck {target}: exit {res.returncode}:\n{res.stdout}{res.stderr}")
    return res.stdout


def mount_way(fstype: str = "ext4", way: Way = "auto") -> Literal["kernel", "fuse2fs"]:
    """The way :func:`mounted` would take; a clear error if there is none."""
    if way == "auto":
        way = "kernel" if os.geteuid() == 0 else "fuse2fs"
    if way == "kernel":
        if os.geteuid() != 0:
            raise PermissionError("a kernel mount needs root (without root: fuse2fs)")
        return "kernel"
    if fstype not in FUSE2FS_TYPES:
        raise ValueError(f"cannot mount {fstype} without root: fuse2fs serves only "
                         f"{'/'.join(FUSE2FS_TYPES)}")
    if not shutil.which("fuse2fs"):
        raise FileNotFoundError("mounting without root needs fuse2fs (Debian package fuse2fs)")
    return "fuse2fs"


def _mapper_loop(path: Path) -> str | None:
    """The loop device ``/dev/mapper/<name>`` links to, if it is backed by ``path``."""
    link = Path("/dev/mapper") / path.name
    try:
        loop = os.path.realpath(link) if link.is_symlink() else ""
        back = Path(f"/sys/block/{Path(loop).name}/loop/backing_file").read_text().strip()
    except OSError:
        return None
    return loop if loop and back == os.path.realpath(path) else None


@contextlib.contextmanager
def _kernel(path: Path, where: Path, fstype: str, options: tuple[str, ...]) -> Iterator[None]:
    from dmuser.pytest_plugin.rig import detach_loop, unmount

    loop = _mapper_loop(path)
    own = loop is None
    if loop is None:
        loop = _run(["losetup", "-f", "--show", str(path)], "losetup", 30).strip()
    try:
        opts = ["-o", ",".join(options)] if options else []
        _run(["mount", "-t", fstype, *opts, loop, str(where)], "mount", 60)
        try:
            yield
        finally:
            unmount(str(where))
    finally:
        if own:
            detach_loop(loop)


def needs_recovery(target: os.PathLike[str] | str) -> bool:
    """The ext3/4 super block says the journal must be replayed (INCOMPAT_RECOVER)."""
    with open(target, "rb") as f:
        f.seek(1024)
        sb = f.read(0x64)
    magic = int.from_bytes(sb[0x38:0x3A], "little") if len(sb) == 0x64 else 0
    return magic == 0xEF53 and bool(int.from_bytes(sb[0x60:0x64], "little") & 0x4)


@contextlib.contextmanager
def _fuse2fs(path: Path, where: Path, options: tuple[str, ...]) -> Iterator[None]:
    if "norecovery" not in options and needs_recovery(path):
        res = subprocess.run(["e2fsck", "-E", "journal_only", "-p", str(path)],
                             capture_output=True, text=True, timeout=300)
        if res.returncode >= 4:
            raise OSError(f"e2fsck could not replay the journal of {path}: "
                          f"{(res.stdout + res.stderr).strip()}")
    # fakeroot: the user may write where mkfs made root the owner; -f: our child, so the
    # unmount can wait for it.  A session of its own: a Ctrl-C must not kill it mid-flush.
    cmd = ["fuse2fs", "-f", str(path), str(where), "-o", ",".join(("fakeroot", *options))]
    with tempfile.TemporaryFile() as out:  # a file, not a pipe: fuse2fs never blocks on it
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + MOUNT_TIMEOUT
            while not os.path.ismount(where):
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    why = ("timed out" if proc.wait() == -9 else
                           f"exit status {proc.returncode}")
                    out.seek(0)
                    text = out.read().decode(errors="replace").strip()
                    raise OSError(f"fuse2fs could not mount {path} ({why}): {text}")
                time.sleep(0.01)
            yield
        finally:
            _stop_fuse2fs(proc, where)


def _stop_fuse2fs(proc: subprocess.Popen[bytes], where: Path) -> None:
    """Unmount, then wait for fuse2fs to write what it cached and exit; a busy mount
    is detached lazily and fuse2fs killed after :data:`MOUNT_TIMEOUT`."""
    from dmuser.pytest_plugin.rig import unmount

    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(["fusermount3", "-u", str(where)], capture_output=True, timeout=30)
    try:
        proc.wait(MOUNT_TIMEOUT)
    except subprocess.TimeoutExpired:
        unmount(str(where), fuse=True)
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def mounted(target: os.PathLike[str] | str, fstype: str = "ext4", *,
            workdir: os.PathLike[str] | str | None = None, options: tuple[str, ...] = (),
            way: Way = "auto") -> Iterator[Path]:
    """Mount the file system on ``target`` (a device file or an image) for the block;
    yields the mount directory (see the module docstring for how and what is guaranteed).
    ``options`` are mount options (``("ro",)``); ``way`` forces ``kernel`` or ``fuse2fs``."""
    path = Path(os.fspath(target))
    chosen = mount_way(fstype, way)
    where = Path(tempfile.mkdtemp(prefix="mnt-", dir=workdir))
    try:
        with (_kernel(path, where, fstype, options) if chosen == "kernel"
              else _fuse2fs(path, where, options)):
            yield where
    finally:
        with contextlib.suppress(OSError):
            where.rmdir()
