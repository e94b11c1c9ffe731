"""The backing files and block devices one daemon's tables use, each opened once.

A table word naming an image file or a real block device resolves to one shared
:class:`~dmuser.core.blockdev.FileDevice` per identity (``st_rdev`` of a block
device, ``st_dev``/``st_ino`` of a file), reference counted by the tables'
``get_device``/``release``.  Guarantees:

* a real block device is opened with ``O_EXCL``: the kernel's claim of every
  device a live table uses, so a ``mount`` of it (or anyone's ``O_EXCL`` open)
  fails with EBUSY while it is claimed;
* the claim is taken by the first table that uses the device and dropped when
  the last one releases it.  A reload that keeps the device builds its new
  table while the old one still holds it, so the claim is never dropped and
  re-taken; a second mapped device on the same device shares it, as the
  kernel's dm shares its one holder;
* a device already open here is found by ``stat`` before any open, because a
  second ``O_EXCL`` open of it would fail;
* a file or device whose storage leads into a FUSE file system (``reentry.py``)
  gets a threads-only I/O policy: no syscall of it runs in the trio thread, where
  it could wait for a FUSE request only that thread would serve.
"""

from __future__ import annotations

import os
import stat

from dmuser.core.blockdev import FileDevice
from dmuser.core.io_policy import IoPolicy
from dmuser.core.reentry import reaches_fuse


class BackingFiles(dict[tuple[int, ...], tuple[FileDevice, int]]):
    """identity -> (the open device, how many table references it has)."""

    def acquire(self, path: str, policy: IoPolicy) -> FileDevice:
        """The shared device of ``path``, opened (and claimed) if not open yet."""
        try:
            st = os.stat(path)
        except OSError:
            st = None  # FileDevice reports it
        if st is not None:
            key = (st.st_rdev,) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)
            entry = self.get(key)
            if entry is not None:
                self[key] = (entry[0], entry[1] + 1)
                return entry[0]
        if st is not None and reaches_fuse(st):
            policy = policy.threads_only()  # an inline fdatasync could wait for ourselves
        dev = FileDevice(path, policy, exclusive=st is not None and stat.S_ISBLK(st.st_mode))
        self[dev.key] = (dev, 1)
        return dev

    def release(self, dev: FileDevice) -> None:
        """Drop one reference; the last one closes the device (and ends its claim)."""
        _, count = self[dev.key]
        if count == 1:
            del self[dev.key]
            dev.close()
        else:
            self[dev.key] = (dev, count - 1)

    def paths(self) -> list[str]:
        return sorted(dev.path for dev, _ in self.values())
