"""Example suite: ext4 on a two-leg mirror survives losing a leg in the middle of writing.

The file system is mounted on the mirror; halfway through the application's
writes one leg turns into an ``error`` device (a dead disk).  The writes go on,
the mirror reports the leg dead (``D``), and afterwards the file system is
clean, every file reads back intact, and the surviving leg alone holds a clean
copy.  Repairing the leg resyncs it.  As root ext4 is the kernel's (loop
mount); without root it is fuse2fs.  Run: ``pytest examples/``.
"""

import hashlib
import os

from dmuser.pytest_plugin import fsck, mkfs


def write_files(root, names):
    """The application: files written and fsync'ed; returns name -> sha256."""
    sums = {}
    for name in names:
        data = os.urandom(256 << 10)
        with open(root / name, "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def read_sums(root):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.iterdir() if p.is_file()}


def test_ext4_on_a_mirror_survives_losing_a_leg(dmuser_devices):
    m = dmuser_devices.mirror(2, log="disk", size=32 << 20)
    m.wait_in_sync(timeout=60)
    mkfs(m.device.path)
    with dmuser_devices.mounted(m.device) as root:
        sums = write_files(root, [f"a{i}" for i in range(8)])
        m.fail_leg(1)  # a disk dies while the file system is in use
        sums |= write_files(root, [f"b{i}" for i in range(8)])
    assert m.status().legs[1].health == "D"  # the mirror noticed
    fsck(m.device.path)
    with dmuser_devices.mounted(m.device) as root:
        assert read_sums(root) == sums
    fsck(m.legs[0].path)  # the surviving leg alone is a clean file system
    m.repair_leg(1)
    assert not m.wait_in_sync(timeout=60).degraded
    fsck(m.legs[1].path)  # and the repaired leg caught up
    with dmuser_devices.mounted(m.legs[1]) as root:
        assert read_sums(root) == sums
