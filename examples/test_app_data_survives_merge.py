"""Example suite: an application's data survives snapshot -> change -> merge.

Copy it into your own tests: with dmuser installed, its pytest plugin gives you
the ``dmuser_devices`` fixture (and cleans up after every test).  As root the
application keeps files on ext4 (a loop mount of the device file); without
root it writes plain bytes to the device file.  Run: ``pytest examples/``.
"""

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

CAN_MOUNT = os.geteuid() == 0 and bool(shutil.which("mkfs.ext4") and shutil.which("losetup"))


def save(root: Path, version: str) -> None:
    """The 'application': it writes its records."""
    for i in range(20):
        (root / f"record-{i}.txt").write_text(f"{version} record {i}\n" * 1000)


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.glob("record-*.txt")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@pytest.mark.skipif(not CAN_MOUNT, reason="needs root, mkfs.ext4 and losetup")
def test_files_come_back_after_merge(dmuser_devices):
    origin = dmuser_devices.linear(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", origin.path], check=True)
    with dmuser_devices.mounted(origin) as root:
        save(root, "v1")
        before = digest(root)
    snap = dmuser_devices.snapshot(origin)  # unmounted: nothing to freeze
    with dmuser_devices.mounted(origin) as root:
        save(root, "v2")  # the application changes its data...
        assert digest(root) != before
    snap.merge(wait=True)  # ...and is rolled back to the snapshot
    with dmuser_devices.mounted(origin) as root:
        assert digest(root) == before


def test_bytes_come_back_after_merge(dmuser_devices):
    origin = dmuser_devices.linear(8 << 20)
    origin.write(0, b"v1" * 4096)
    snap = dmuser_devices.snapshot(origin)
    origin.write(0, b"v2" * 4096)
    assert snap.device.read(0, 8192) == b"v1" * 4096  # the snapshot kept v1
    snap.merge(wait=True)
    assert origin.read(0, 8192) == b"v1" * 4096
    assert snap.merged
