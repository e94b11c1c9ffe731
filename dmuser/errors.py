"""The exceptions of the Python API (:class:`dmuser.Client`, :class:`dmuser.AsyncClient`).

Every failure a client call can meet is a :class:`DmuserError`: the daemon's
error replies (the kernel's text in ``message``, the kernel's errno in
``errno``) and the client's own one-line failures (no daemon, permission
denied, socket path too long, a broken or garbled reply).  A caller never
sees a socket traceback.  The class is picked from the reply's errno, so
``except NoSuchDevice`` works whatever the daemon's wording::

    >>> err = error_from_reply({"ok": False, "errno": 6, "error": "Device x does not exist."})
    >>> type(err).__name__, err.errno, str(err)
    ('NoSuchDevice', 6, 'Device x does not exist.')

:class:`DmuserError` derives from :class:`dmuser.core.errors.DmError`, so code
that catches ``DmError`` keeps catching everything.
"""

from __future__ import annotations

import errno as _errno
from typing import Any

from dmuser.core.errors import DmError


class DmuserError(DmError):
    """Base of the API's errors: ``str(exc)`` is the message, ``exc.errno`` the errno."""

    errno: int = _errno.EIO


class InvalidTable(DmuserError):
    """EINVAL: a table, a target argument, a message or a request was refused."""

    errno = _errno.EINVAL


class NoSuchDevice(DmuserError):
    """ENXIO: the device (or a device a table names) does not exist, or has no such table."""

    errno = _errno.ENXIO


class DeviceExists(DmuserError):
    """EEXIST: a device of that name exists already."""

    errno = _errno.EEXIST


class DeviceBusy(DmuserError):
    """EBUSY: the device is open or used by another device (``remove`` without force)."""

    errno = _errno.EBUSY


class DeviceIOError(DmuserError):
    """EIO: I/O failed, or the daemon hit an internal error (its log has the traceback)."""

    errno = _errno.EIO


class NotSupported(DmuserError):
    """EOPNOTSUPP: the target does not support the operation."""

    errno = _errno.EOPNOTSUPP


class WaitTimeout(DmuserError):
    """ETIMEDOUT: ``wait`` saw no event before its timeout."""

    errno = _errno.ETIMEDOUT


class DaemonShuttingDown(DmuserError):
    """ESHUTDOWN: the daemon is stopping and accepts no more work."""

    errno = _errno.ESHUTDOWN


class ConnectionFailed(DmuserError):
    """The client could not talk to the daemon (permission, path, broken connection)."""

    errno = _errno.ECONNREFUSED


class DaemonNotRunning(ConnectionFailed):
    """Nobody listens on the control socket (ENOENT or ECONNREFUSED on connect)."""

    errno = _errno.ENOENT


class ProtocolError(ConnectionFailed):
    """The daemon closed without a reply, or replied with something that is not a reply."""

    errno = _errno.EPROTO


#: errno -> class, for replies; anything else is a plain DmuserError with that errno
BY_ERRNO: dict[int, type[DmuserError]] = {
    _errno.EINVAL: InvalidTable,
    _errno.ENXIO: NoSuchDevice,
    _errno.ENODEV: NoSuchDevice,
    _errno.ENOENT: NoSuchDevice,
    _errno.EEXIST: DeviceExists,
    _errno.EBUSY: DeviceBusy,
    _errno.EIO: DeviceIOError,
    _errno.EOPNOTSUPP: NotSupported,
    _errno.ETIMEDOUT: WaitTimeout,
    _errno.ESHUTDOWN: DaemonShuttingDown,
}


def error_from_reply(reply: dict[str, Any]) -> DmuserError:
    """The exception for an error reply ``{"ok": false, "errno": N, "error": TEXT}``.

    An errno without a class of its own gives a plain :class:`DmuserError`; a
    reply without a usable errno gives :class:`DeviceIOError` (EIO).  The
    message is always the daemon's text, unchanged.
    """
    raw = reply.get("errno")
    code = raw if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0 else _errno.EIO
    message = str(reply.get("error") or f"request failed ({_errno.errorcode.get(code, code)})")
    return BY_ERRNO.get(code, DmuserError)(message, code)
