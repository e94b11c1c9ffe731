"""The device factory behind the ``dmuser_devices`` fixture: :class:`Devices`, :class:`Device`.

Why: a test should say "a 16 MiB linear device" or "a 2-leg mirror" and
never write image files, table strings or teardown code.  Everything a
:class:`Devices` makes is its own to undo: :meth:`Devices.cleanup` (run by
the fixture after every test, also a failing one) unmounts what
:meth:`Devices.mounted` mounted, resumes every device it made, and removes
them in reverse order of creation with retries, so a device stacked on
another goes first; then it deletes the test's image files.

Names: on the session daemon devices of different tests coexist, so a name
not given is made unique (``d1``, ``d2``...) and a given one is prefixed by
the factory's own tag; :attr:`Device.name` is the name the daemon knows.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from dmuser.client import Client
from dmuser.errors import (
    ConnectionFailed,
    DaemonShuttingDown,
    DeviceBusy,
    DmuserError,
    NoSuchDevice,
)
from dmuser.status import DeviceInfo, TableLine, TargetStatus

if TYPE_CHECKING:
    from dmuser.pytest_plugin.helpers import Flakey, Mirror, Snap, Swap
    from dmuser.pytest_plugin.recording import Recording

__all__ = ["MiB", "SECTOR", "Device", "Devices"]

SECTOR = 512
MiB = 1 << 20
#: seconds :meth:`Devices.remove` retries a busy device (udev's probe holds new ones)
BUSY_RETRY = 5.0


class Device:
    """One mapped device: its name, its file on the mount, and typed queries."""

    def __init__(self, devices: Devices, name: str, path: Path) -> None:
        self.devices = devices
        self.client = devices.client
        self.name = name
        self.path = path

    def __repr__(self) -> str:
        return f"Device({self.name!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def sectors(self) -> int:
        return self.info().nr_sectors

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.sectors * SECTOR

    def info(self) -> DeviceInfo:
        return self.client.info(self.name)

    def status(self) -> list[TargetStatus]:
        return self.client.status(self.name)

    def table(self) -> list[TableLine]:
        return self.client.table(self.name)

    def switch(self, table: str | list[str]) -> None:
        """Replace the live table (reload + resume, as ``dmsetup reload; resume``)."""
        self.client.reload(self.name, table)
        self.client.resume(self.name)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes at byte ``offset``, read through the device file."""
        with open(self.path, "rb", buffering=0) as f:
            f.seek(offset)
            return f.read(length)

    def write(self, offset: int, data: bytes, *, sync: bool = True) -> None:
        """Write ``data`` at byte ``offset`` through the device file (fsync'ed unless told)."""
        with open(self.path, "r+b", buffering=0) as f:
            f.seek(offset)
            f.write(data)
            if sync:
                os.fsync(f.fileno())


class Devices:
    """Makes image files and devices for one test and removes them afterwards."""

    def __init__(self, client: Client, mountpoint: Path, workdir: Path, tag: str) -> None:
        self.client = client
        self.mountpoint = mountpoint
        self.workdir = workdir
        self.tag = tag
        self.made: list[str] = []
        self._n = 0

    def __repr__(self) -> str:
        return f"Devices({str(self.workdir)!r})"

    def _unique(self, stem: str) -> str:
        self._n += 1
        return f"{self.tag}{stem}{self._n}"

    # -- image files and devices ----------------------------------------------------------

    def image(self, size: int = 16 * MiB, name: str | None = None) -> Path:
        """A sparse image file of ``size`` bytes (a multiple of 512), zero-filled."""
        if size <= 0 or size % SECTOR:
            raise ValueError(f"image size must be a positive multiple of {SECTOR}: {size}")
        path = self.workdir / (name or f"{self._unique('img')}.img")
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def create(self, table: str | list[str], name: str | None = None) -> Device:
        """Create a device from a dmsetup table (its cleanup is this factory's job)."""
        full = f"{self.tag}{name}" if name else self._unique("d")
        path = Path(self.client.create(full, table))
        self.made.append(full)
        return Device(self, full, path)

    def linear(self, size: int = 16 * MiB, name: str | None = None) -> Device:
        """A linear device over a new image file of ``size`` bytes."""
        img = self.image(size)
        return self.create(f"0 {size // SECTOR} linear {img} 0", name)

    def zero(self, size: int = 16 * MiB, name: str | None = None) -> Device:
        return self.create(f"0 {size // SECTOR} zero", name)

    def remove(self, dev: Device | str, *, force: bool = False,
               retry: float = BUSY_RETRY) -> None:
        """Remove a device now.  Busy is retried for ``retry`` seconds, as ``dmsetup
        remove --retry``: as root the device's loop device is briefly held open by
        udev's probe of every new block device.  Still busy after that raises."""
        name = dev.name if isinstance(dev, Device) else dev
        deadline = time.monotonic() + retry
        while True:
            try:
                self.client.remove(name, force=force)
                break
            except DeviceBusy:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if name in self.made:
            self.made.remove(name)

    # -- the helpers (dmuser.pytest_plugin.helpers), bound to this factory -------------------

    def snapshot(self, origin: Device, *, chunk: int = 8, store: str = "P",
                 cow_size: int | None = None) -> Snap:
        from dmuser.pytest_plugin.helpers import snapshot

        return snapshot(origin, chunk=chunk, store=store, cow_size=cow_size)

    def mirror(self, n_legs: int = 2, *, log: Literal["core", "disk"] = "core",
               size: int = 8 * MiB, region: int = 1024, handle_errors: bool = False,
               nosync: bool = False) -> Mirror:
        from dmuser.pytest_plugin.helpers import mirror

        return mirror(self, n_legs, log=log, size=size, region=region,
                      handle_errors=handle_errors, nosync=nosync)

    def flakey(self, dev: Device) -> Flakey:
        from dmuser.pytest_plugin.helpers import flakey

        return flakey(dev)

    def swap_in_error(self, dev: Device, start: int, length: int) -> Swap:
        from dmuser.pytest_plugin.helpers import swap_in_error

        return swap_in_error(dev, start, length)

    def recording(self, size: int = 32 * MiB, log_size: int | None = None) -> Recording:
        """A ``log-writes`` device of ``size`` bytes over a zeroed image whose every write
        is logged, for crash-point replay (:class:`~dmuser.pytest_plugin.recording.Recording`)."""
        from dmuser.pytest_plugin.recording import Recording

        return Recording(self, size, log_size)

    # -- a file system on a device: kernel mount as root, fuse2fs without -------------------

    @contextlib.contextmanager
    def mounted(self, dev: Device | os.PathLike[str] | str, fstype: str = "ext4", *,
                options: tuple[str, ...] = (),
                way: Literal["auto", "kernel", "fuse2fs"] = "auto") -> Iterator[Path]:
        """Mount the file system on ``dev`` (a :class:`Device` or an image file) for the
        block and yield its directory: as root a kernel mount on a loop device, without
        root ``fuse2fs`` (:func:`dmuser.pytest_plugin.filesystems.mounted`).  Unmounted
        when the block ends, also when it raises; the directory is below this factory's
        work directory, so even a killed run's mount is swept."""
        from dmuser.pytest_plugin.filesystems import mounted

        with mounted(dev, fstype, workdir=self.workdir, options=options, way=way) as where:
            yield where

    # -- teardown -----------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Undo everything this factory made; the devices that could not be removed."""
        from dmuser.pytest_plugin.rig import undo_mounts_and_loops

        undo_mounts_and_loops(self.workdir)  # a mount whose block was never left
        for name in self.made:
            with contextlib.suppress(DmuserError, OSError):
                self.client.resume(name)
        self.made = self._remove_all(list(self.made))
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.made

    def _remove_all(self, left: list[str]) -> list[str]:
        """Remove ``left``, users before what they stack on, in rounds while there is
        progress or for :data:`BUSY_RETRY` seconds; the names that would not go."""
        deadline = time.monotonic() + BUSY_RETRY
        while left:
            round_start = len(left)
            for name in reversed(list(left)):
                try:
                    self.client.remove(name)
                except NoSuchDevice:
                    pass  # removed by the test already
                except (ConnectionFailed, DaemonShuttingDown, OSError):
                    return left  # no daemon to ask: stopping it is the fixture's job
                except DmuserError:
                    continue  # still in use: next round
                left.remove(name)
            if len(left) == round_start:  # no progress: busy (udev's probe?) or held
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        return left
