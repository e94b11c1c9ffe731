"""A real file system on dmuser devices: mkfs.ext4, e2fsck, loop mounts, stacking.

The device file is a regular file to the kernel, so ``mkfs.ext4``/``e2fsck``
work on it directly; mounting goes through a loop device over the device file
(root + loop).  Loop devices and mounts are set up with the daemon helper's
``loop_mounted``, whose teardown undoes them even when a test fails.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from support.data import make_image, pattern, read_at
from support.system import fsck_clean, mkfs_ext4

MiB = 1 << 20
SECTOR = 512
EXT4_MAGIC_OFFSET = 1024 + 0x38  # s_magic in the superblock at byte 1024

pytestmark = [pytest.mark.fuse, pytest.mark.mkfs]


def mkfs(dev: Path) -> None:
    mkfs_ext4(dev, "-L", "dmtest")


def write_tree(root: Path) -> dict[str, str]:
    """Files of assorted sizes, some in subdirectories; name -> sha256."""
    sums = {}
    sizes = [0, 1, 511, 4096, 65537, 1 * MiB + 123, 3 * MiB]
    for i, size in enumerate(sizes):
        rel = f"dir{i % 3}/sub/file{i}" if i % 2 else f"file{i}"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = pattern(f"file{i}", size)
        path.write_bytes(data)
        sums[rel] = hashlib.sha256(data).hexdigest()
    return sums


def check_tree(root: Path, sums: dict[str, str]) -> None:
    for rel, digest in sums.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, rel


def test_mkfs_and_fsck_on_the_device_file(daemon) -> None:
    d = daemon
    make_image(d.dir / "a.img", 64 * MiB)
    dev = d.create("fs", f"0 {64 * MiB // SECTOR} linear a.img 0")
    mkfs(dev)
    out = fsck_clean(dev)
    assert "dmtest" in out or "clean" in out or "files" in out
    # the superblock reached the backing file
    assert read_at(d.dir / "a.img", EXT4_MAGIC_OFFSET, 2) == b"\x53\xef"


@pytest.mark.root
@pytest.mark.loop
@pytest.mark.slow
def test_loop_mount_write_fsck_remount(daemon, tmp_path) -> None:
    d = daemon
    make_image(d.dir / "a.img", 24 * MiB)
    make_image(d.dir / "b.img", 24 * MiB)
    # two segments in two files, so the file system spans a target boundary
    half = 20 * MiB // SECTOR
    table = f"0 {half} linear a.img {4 * MiB // SECTOR};{half} {half} linear b.img 0"
    dev = d.create("fs", table)
    mkfs(dev)
    mnt = d.dir / "fsmnt"

    with d.loop_mounted(dev, mnt):
        sums = write_tree(mnt)
        os.sync()
    fsck_clean(dev)

    # a new daemon over the same image files finds the same file system
    d.request("shutdown")
    assert d.wait() == 0
    d.start()
    d.create("fs", table)
    with d.loop_mounted(dev, mnt, "-o", "ro"):
        check_tree(mnt, sums)
    fsck_clean(dev)


@pytest.mark.root
@pytest.mark.loop
@pytest.mark.slow
def test_stacked_linear_over_linear(daemon) -> None:
    d = daemon
    make_image(d.dir / "a.img", 48 * MiB)
    lower_sectors = 40 * MiB // SECTOR
    d.create("lower", f"0 {lower_sectors} linear a.img {8 * MiB // SECTOR}")
    # upper: 32 MiB of lower starting 4 MiB in, split in two targets that both
    # name lower (by name and by its path on the mount)
    up_off = 4 * MiB // SECTOR
    seg = 16 * MiB // SECTOR
    upper = d.create("upper", f"0 {seg} linear lower {up_off};"
                              f"{seg} {seg} linear {d.path('lower')} {up_off + seg}")
    assert d.table_lines("upper")[0].split()[3] == str(d.path("lower"))
    mkfs(upper)
    fsck_clean(upper)
    # upper sector 0 is a.img sector 8 MiB + 4 MiB
    assert read_at(d.dir / "a.img", 12 * MiB + EXT4_MAGIC_OFFSET, 2) == b"\x53\xef"

    mnt = d.dir / "fsmnt"
    with d.loop_mounted(upper, mnt):
        sums = write_tree(mnt)
        os.sync()
    fsck_clean(upper)

    with d.loop_mounted(upper, mnt):
        check_tree(mnt, sums)

    res = d.cli("remove", "lower", check=False)
    assert res.returncode == 1 and "in use" in res.stderr
    d.cli("remove", "upper")
    d.cli("remove", "lower")
    assert d.devices() == []
