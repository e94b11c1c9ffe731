"""Helpers of the block-device tests (``dmuser serve --block-devices``, root).

/dev/mapper is global, so every device name carries this process's pid
(:func:`bd_name`), and :func:`block_device_daemon` removes any link of those
names left behind (the daemon fixture's teardown detaches loop devices on
files below the test's directory).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dmuser
from dmuser import dmsetup
from support.daemon import Daemon, DaemonFactory
from support.data import make_image
from support.system import mkfs_ext4

#: the tags tests pass to :func:`bd_name`; their links are removed after each test
TAGS = ("a", "b", "up", "low", "dead", "up1", "up2", "up3")


def bd_name(tag: str) -> str:
    return f"dmubd{os.getpid()}{tag}"


def getsz(dev: str | Path) -> int:
    out = subprocess.run(["blockdev", "--getsz", str(dev)], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return int(out)


def mapper(name: str) -> Path:
    return Path("/dev/mapper") / name


def mounted_ext4(d: Daemon, name: str) -> Path:
    """Create ``name`` (linear over a new 16 MiB image ``a.img`` in the daemon's
    directory) with ``dmsetup create``, make ext4 on its block device and mount it
    at ``d.dir / "fsmnt"``; returns the mount point."""
    make_image(d.dir / "a.img", 16 << 20)
    ok(d, "create", name, "--table", f"0 {(16 << 20) // 512} linear {d.dir / 'a.img'} 0")
    mkfs_ext4(mapper(name))
    mnt = d.dir / "fsmnt"
    d.mount(str(mapper(name)), mnt)
    return mnt


def settle() -> None:
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


def udev_rules_of(d: Daemon) -> list[Path]:
    """The udev rules (``dmuser/core/udev_quiet.py``) of daemon ``d``'s mountpoint."""
    return [p for p in Path("/run/udev/rules.d").glob("59-dmuser-*.rules")
            if f"# mountpoint: {d.mnt}\n" in p.read_text()]


@contextlib.contextmanager
def block_device_daemon(make_daemon: DaemonFactory) -> Iterator[Daemon]:
    """A daemon started with block devices on (the rig turns them off by default)."""
    d = make_daemon(block_devices=True)
    try:
        yield d
    finally:
        d.unstack()
        for tag in TAGS:
            link = mapper(bd_name(tag))
            if link.is_symlink():
                link.unlink()
