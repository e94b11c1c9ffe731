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
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from dmuser.client import Client
from dmuser.errors import DmuserError, NoSuchDevice
from dmuser.status import DeviceInfo, TableLine, TargetStatus

if TYPE_CHECKING:
    from dmuser.pytest_plugin.helpers import Flakey, Mirror, Snap, Swap

__all__ = ["MiB", "SECTOR", "Device", "Devices"]

SECTOR = 512
MiB = 1 << 20


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
        self._mounts: list[tuple[str, str]] = []  # (mountpoint, loop device)
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

    def remove(self, dev: Device | str, *, force: bool = False) -> None:
        name = dev.name if isinstance(dev, Device) else dev
        self.client.remove(name, force=force)
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

    # -- a file system on a device (root: loop device + mount) ------------------------------

    @contextlib.contextmanager
    def mounted(self, dev: Device, *opts: str) -> Iterator[Path]:
        """Loop-attach ``dev``'s file and mount it (needs root); yields the mount directory.
        Unmounted and detached when the block ends -- or by :meth:`cleanup` if the test
        fails inside it.  (Without root, fuse2fs would be the way: not done yet.)"""
        if os.geteuid() != 0:
            raise PermissionError("mounted() needs root (loop devices and mount)")
        where = Path(tempfile.mkdtemp(prefix="mnt-", dir=self.workdir))
        res = subprocess.run(["losetup", "-f", "--show", str(dev.path)], capture_output=True,
                             text=True, timeout=30)
        if res.returncode != 0:
            raise OSError(f"losetup {dev.path}: {res.stderr.strip()}")
        loop = res.stdout.strip()
        self._mounts.append((str(where), loop))
        res = subprocess.run(["mount", *opts, loop, str(where)], capture_output=True,
                             text=True, timeout=60)
        if res.returncode != 0:
            self._unmount(str(where), loop)
            raise OSError(f"mount {loop} {where}: {res.stderr.strip()}")
        yield where
        self._unmount(str(where), loop)

    def _unmount(self, where: str, loop: str) -> None:
        from dmuser.pytest_plugin.rig import detach_loop, unmount

        if os.path.ismount(where):
            unmount(where)
        detach_loop(loop)
        with contextlib.suppress(ValueError):
            self._mounts.remove((where, loop))

    # -- teardown -----------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Undo everything this factory made; the devices that could not be removed."""
        for where, loop in reversed(list(self._mounts)):
            self._unmount(where, loop)
        for name in self.made:
            with contextlib.suppress(DmuserError, OSError):
                self.client.resume(name)
        left = list(self.made)
        for _ in range(10):
            if not left:
                break
            for name in reversed(list(left)):  # users before what they stack on
                try:
                    self.client.remove(name)
                except NoSuchDevice:
                    pass  # removed by the test already
                except (DmuserError, OSError):
                    continue  # still in use: next round
                left.remove(name)
        self.made = left
        shutil.rmtree(self.workdir, ignore_errors=True)
        return left
