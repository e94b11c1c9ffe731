"""``mounted()``/``mkfs``/``fsck`` on plain image files (``dmuser.pytest_plugin.filesystems``):
the fuse2fs way is taken explicitly, so these run the same as root and as a user."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dmuser.pytest_plugin import fsck, mkfs, mounted
from dmuser.pytest_plugin.filesystems import mount_way, needs_recovery

pytestmark = [pytest.mark.fuse]


def image(tmp_path: Path) -> Path:
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    mkfs(img)
    return img


def test_fuse2fs_mount_is_undone_when_the_body_raises(tmp_path: Path) -> None:
    img = image(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), \
            mounted(img, workdir=tmp_path, way="fuse2fs") as root:
        (root / "f").write_bytes(b"x" * 100_000)
        assert os.path.ismount(root)
        raise RuntimeError("boom")
    assert not os.path.ismount(root) and not root.exists()
    fsck(img)  # fuse2fs had exited, its writes complete, before the block was left
    with mounted(img, workdir=tmp_path, way="fuse2fs", options=("ro",)) as root:
        assert (root / "f").read_bytes() == b"x" * 100_000


def test_a_journal_that_needs_recovery_is_replayed_first(tmp_path: Path) -> None:
    """fuse2fs 1.47.0 dies with SIGSEGV on such a file system: the state a power cut
    leaves ext4 in.  debugfs sets the flag here (a real one: the SQLite example)."""
    img = image(tmp_path)
    with mounted(img, workdir=tmp_path, way="fuse2fs") as root:
        (root / "f").write_text("kept")
    subprocess.run(["debugfs", "-w", "-R", "feature needs_recovery", str(img)],
                   check=True, capture_output=True)
    assert needs_recovery(img)
    with mounted(img, workdir=tmp_path, way="fuse2fs") as root:
        assert (root / "f").read_text() == "kept"
    assert not needs_recovery(img)
    fsck(img)


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot mount xfs without root"):
        mount_way("xfs", "fuse2fs")
    if os.geteuid() != 0:
        with pytest.raises(PermissionError, match="needs root"):
            mount_way("ext4", "kernel")
    (tmp_path / "zeros").write_bytes(bytes(1 << 20))
    with pytest.raises(OSError, match="fuse2fs could not mount .*zeros"), \
            mounted(tmp_path / "zeros", workdir=tmp_path, way="fuse2fs"):
        pass  # no file system there
    img = image(tmp_path)
    with open(img, "r+b") as f:  # wreck the root inode's table block group descriptors
        f.seek(4096)
        f.write(os.urandom(4096))
    with pytest.raises(OSError, match="e2fsck"):
        fsck(img)
