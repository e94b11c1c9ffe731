"""The error tree.

Every error a user can cause or a device can report is a :class:`DmError`
carrying an errno.  Exactly one place turns them into something else: the FUSE
layer (``fuse_ops.py``) into ``pyfuse3.FUSEError`` and the control server into
an error reply, which the CLI prints and turns into a non-zero exit.
"""

from __future__ import annotations

import errno as _errno


class DmError(Exception):
    """Base of all dmuser errors; ``errno`` says what the kernel would return."""

    errno: int = _errno.EINVAL

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno

    @property
    def message(self) -> str:
        return str(self.args[0])


class TargetArgError(DmError):
    """A target constructor rejected its arguments (the kernel's ``ti->error``)."""

    errno = _errno.EINVAL


class TableError(DmError):
    """A table line or the table as a whole is invalid."""

    errno = _errno.EINVAL


class NoSuchDeviceError(DmError):
    """A mapped device, or a backing device named in a table, does not exist."""

    errno = _errno.ENXIO


class DeviceExistsError(DmError):
    errno = _errno.EEXIST


class DeviceBusyError(DmError):
    """The device is open or is used by another mapped device."""

    errno = _errno.EBUSY


class DmIOError(DmError):
    """An I/O request failed (the kernel's BLK_STS_IOERR)."""

    errno = _errno.EIO

    def __init__(self, message: str = "I/O error", errno: int | None = None) -> None:
        super().__init__(message, errno)


class RequeueError(DmIOError):
    """Complete the bio later: resubmit it after resume (the kernel's BLK_STS_DM_REQUEUE).

    A target raises it only while its device is being suspended with
    ``--noflush``; :meth:`MappedDevice.submit` catches it, waits for the
    resume and runs the bio again against the table live then.  It never
    reaches a caller.
    """


class NotSupportedError(DmIOError):
    """The operation is not supported by the device (BLK_STS_NOTSUPP)."""

    errno = _errno.EOPNOTSUPP
