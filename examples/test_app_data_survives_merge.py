"""Example suite: an application's data survives snapshot -> change -> merge.

Copy it into your own tests: with dmuser installed, its pytest plugin gives you
the ``dmuser_devices`` fixture (and cleans up after every test).  The
application keeps files on ext4 on the device: as root the kernel's (a loop
mount), without root fuse2fs.  Run: ``pytest examples/``.
"""

import hashlib
from pathlib import Path

from dmuser.pytest_plugin import mkfs


def save(root: Path, version: str) -> None:
    """The 'application': it writes its records."""
    for i in range(20):
        (root / f"record-{i}.txt").write_text(f"{version} record {i}\n" * 1000)


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.glob("record-*.txt")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_files_come_back_after_merge(dmuser_devices):
    origin = dmuser_devices.linear(32 << 20)
    mkfs(origin.path)
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
