"""core/reentry.py on a fake sysfs and mountinfo: which storage leads into FUSE."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dmuser.core.reentry import Walk, read_mounts

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:40 / /mnt/dm\\040user rw,nosuid - fuse.dmuser dmuser rw
41 22 7:3 / /mnt/ext rw - ext4 /dev/loop3 rw
42 22 0:51 / /mnt/btr rw - btrfs {btrfs_source} rw
43 22 0:52 / /mnt/tmp rw - tmpfs tmpfs rw
44 22 7:5 / /mnt/plain rw - ext4 /dev/loop5 rw
"""


def block(sys_root: Path, devno: str, name: str, backing: str | None = None,
          slaves: tuple[str, ...] = (), parent: str | None = None) -> Path:
    base = sys_root / "devices" / "virtual" / "block"
    real = base / parent / name if parent else base / name
    real.mkdir(parents=True, exist_ok=True)
    (real / "dev").write_text(devno + "\n")
    if parent:
        (real / "partition").write_text("1\n")
    if backing is not None:
        (real / "loop").mkdir()
        (real / "loop" / "backing_file").write_text(backing + "\n")
    if slaves:
        (real / "slaves").mkdir()
        for slave in slaves:
            (real / "slaves" / slave).symlink_to(base / slave)
    link = sys_root / "dev" / "block" / devno
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(real)
    return real


@pytest.fixture
def walk(tmp_path: Path) -> Walk:
    sys_root = tmp_path / "sys"
    block(sys_root, "254:0", "vda")
    block(sys_root, "7:3", "loop3", backing="/mnt/dm user/lowdev")      # on our FUSE mount
    block(sys_root, "7:5", "loop5", backing="/var/tmp/plain.img")        # on / (vda)
    block(sys_root, "259:1", "loop3p1", parent="loop3")
    block(sys_root, "253:0", "dm-0", slaves=("loop5", "loop3"))
    block(sys_root, "253:1", "dm-1", slaves=("loop5",))
    node = tmp_path / "loop3-node"
    if os.geteuid() == 0:
        os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(7, 3))
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO.format(btrfs_source=node if node.exists() else "/dev/none"))
    return Walk(str(sys_root), str(mountinfo), dev_dir=f"{tmp_path}/")


def test_mountinfo_fields_are_unescaped(walk: Walk) -> None:
    assert [m.mountpoint for m in walk.mounts][:2] == ["/", "/mnt/dm user"]
    assert walk.mounts[1].fstype == "fuse.dmuser" and walk.mounts[1].devno == (0, 40)
    assert read_mounts("/nonexistent") == []


def test_a_fuse_file_system_itself(walk: Walk) -> None:
    assert walk.fs((0, 40), 0)


def test_a_loop_device_over_a_file_on_fuse_and_a_fs_on_it(walk: Walk) -> None:
    assert walk.block((7, 3), 0)
    assert walk.fs((7, 3), 0)            # ext4 mounted from that loop device


def test_a_partition_of_it_and_a_dm_device_over_it(walk: Walk) -> None:
    assert walk.block((259, 1), 0)
    assert walk.block((253, 0), 0)       # one of two slaves leads to FUSE


def test_storage_that_never_meets_fuse(walk: Walk) -> None:
    assert not walk.fs((254, 0), 0)      # the root file system on a disk
    assert not walk.block((7, 5), 0)     # a loop device over a file on that disk
    assert not walk.fs((7, 5), 0)
    assert not walk.block((253, 1), 0)
    assert not walk.fs((0, 52), 0)       # tmpfs
    assert not walk.block((8, 99), 0)    # unknown to sysfs


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a block device node needs root")
def test_an_anonymous_device_fs_is_followed_through_its_source(walk: Walk) -> None:
    assert walk.fs((0, 51), 0)           # btrfs: anonymous st_dev, source is the loop device
