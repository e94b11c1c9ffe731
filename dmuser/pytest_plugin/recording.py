"""A recorded device for crash-point replay: :class:`Recording` (``dmuser_devices.recording()``).

Why: crash-consistency tests need three things in a fixed order -- a device
whose writes are logged (``log-writes`` over a zeroed data image, the log on
an image of its own), the workload, then the log *finished* (the target
removed, which writes the ``dm-log-writes-end`` mark and the super block)
before :func:`dmuser.crashpoints.crash_points` can walk it.  A Recording does
the first and the last; the walk itself is the crash-points module's.

Guarantees: :meth:`Recording.crash_points` finishes the recording first (it
fails with a clear error while the device is still mounted or open) and
yields the points in log order; the images are below the factory's work
directory and go with it after the test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from dmuser.crashpoints import CrashPoint, crash_points
from dmuser.errors import DeviceBusy

if TYPE_CHECKING:
    from dmuser.pytest_plugin.devices import Device, Devices

__all__ = ["Recording"]

SECTOR = 512


class Recording:
    """``device``: a ``log-writes`` device of ``size`` bytes over a zeroed image; every
    write to it is logged to the image :attr:`log` until :meth:`finish`."""

    def __init__(self, devices: Devices, size: int, log_size: int | None = None) -> None:
        self.devices = devices
        self.size = size
        self.data = devices.image(size)
        self.log: Path = devices.image(log_size or max(4 * size, 64 << 20))
        self.device: Device = devices.create(
            f"0 {size // SECTOR} log-writes {self.data} {self.log}")
        self.finished = False

    def __repr__(self) -> str:
        return f"Recording({self.device.name!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.device)

    @property
    def path(self) -> Path:
        """The recorded device's file (mkfs, mount, write it like any device)."""
        return self.device.path

    def mark(self, text: str) -> None:
        """Log a mark (``dmsetup message NAME 0 mark TEXT``): a crash point with a name."""
        self.devices.client.message(self.device.name, 0, ["mark", text])

    def finish(self) -> None:
        """Stop recording: remove the log-writes device, which completes the log.
        Idempotent; the device must not be mounted or open any more."""
        if self.finished:
            return
        try:
            self.devices.remove(self.device)
        except DeviceBusy as exc:
            raise DeviceBusy(f"cannot finish the recording: {self.device.name} is still in "
                             f"use (unmount it first): {exc}", exc.errno) from exc
        self.finished = True

    def crash_points(self, replay_to: os.PathLike[str] | str | None = None, *,
                     at: tuple[str, ...] = ("flush", "fua", "mark"),
                     since: str | None = None) -> Iterator[CrashPoint]:
        """Finish, then yield every crash point with the device's state at it in
        ``replay_to`` (default: an image in the test's work directory), from the mark
        ``since`` on if given; see
        :func:`dmuser.crashpoints.crash_points`."""
        self.finish()
        scratch = replay_to or self.devices.workdir / "crash-point.img"
        yield from crash_points(self.log, scratch, size=self.size, at=at, since=since)
