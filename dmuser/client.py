"""The synchronous client of the control socket: :class:`Client`, and the wire.

Protocol (``docs/control-protocol.md``): the client connects to the Unix
socket, sends one JSON object terminated by a newline (``{"verb": ..., ...}``),
and reads one JSON object back: ``{"ok": true, "output": str, "data": ...}`` or
``{"ok": false, "errno": int, "error": str}``.

:func:`request` moves one request and one reply; every failure on the way
is a one-line :class:`~dmuser.errors.DmuserError` (no daemon, permission
denied, socket path too long, the daemon went away, a reply that is not
one).  :class:`Client` puts the verbs on top: typed results, and error
replies raised as the exception their errno names (``dmuser.errors``).
"""

from __future__ import annotations

import errno
import json
import os
import socket
from collections.abc import Sequence
from typing import Any, TypeVar

from dmuser import calls, paths
from dmuser.calls import DaemonInfo, Reply, Table
from dmuser.errors import ConnectionFailed, DaemonNotRunning, ProtocolError
from dmuser.status import DeviceInfo, TableLine, TargetStatus

__all__ = ["Client", "DaemonNotRunning", "check_socket_path", "ping", "request"]

R = TypeVar("R")

#: sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH_BYTES = 107


def check_socket_path(sock_path: str) -> None:
    """Raise ConnectionFailed (a DmError) if ``sock_path`` cannot be a Unix socket address."""
    n = len(os.fsencode(sock_path))
    if n > MAX_SOCKET_PATH_BYTES:
        raise ConnectionFailed(f"socket path too long ({n} bytes; a Unix socket path holds at "
                               f"most {MAX_SOCKET_PATH_BYTES}): {sock_path}", errno.ENAMETOOLONG)


def connect_error(exc: OSError, sock_path: str) -> ConnectionFailed:
    """The one-line error for a failed connect."""
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)):
        return DaemonNotRunning(f"no dmuser daemon is listening on {sock_path} "
                                f"({exc.strerror}); start one with 'dmuser serve'")
    if isinstance(exc, PermissionError):
        return ConnectionFailed(f"cannot connect to {sock_path}: permission denied "
                                "(the daemon runs as root?)", errno.EACCES)
    return ConnectionFailed(f"cannot connect to {sock_path}: {exc.strerror or exc}")


def gone_error(exc: OSError, sock_path: str) -> ConnectionFailed:
    return ConnectionFailed(f"the daemon on {sock_path} went away: {exc.strerror or exc}",
                            errno.ECONNRESET)


def timeout_error(sock_path: str, timeout: float | None) -> ConnectionFailed:
    return ConnectionFailed(f"no reply from the daemon on {sock_path} within {timeout} s",
                            errno.ETIMEDOUT)


def decode_reply(raw: bytes) -> dict[str, Any]:
    """The reply object in ``raw`` (everything the daemon sent), or a ProtocolError."""
    if not raw:
        raise ProtocolError("the daemon closed the connection without a reply")
    try:
        reply = json.loads(raw)
    except ValueError:
        raise ProtocolError(f"the daemon sent a reply that is not JSON: {raw[:80]!r}") from None
    if not isinstance(reply, dict):
        raise ProtocolError(f"the daemon sent a reply that is not an object: {raw[:80]!r}")
    return reply


def request(sock_path: str, req: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Send ``req``; return the reply (error replies too: the caller looks at ``ok``).

    Every failure is a DmuserError with a one-line message: DaemonNotRunning if
    nobody listens, otherwise what went wrong with the socket or the reply.
    """
    check_socket_path(sock_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(sock_path)
        except TimeoutError:
            raise timeout_error(sock_path, timeout) from None
        except OSError as exc:
            raise connect_error(exc, sock_path) from None
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except TimeoutError:
            raise timeout_error(sock_path, timeout) from None
        except OSError as exc:
            raise gone_error(exc, sock_path) from None
    finally:
        s.close()
    return decode_reply(b"".join(chunks))


def ping(sock_path: str) -> dict[str, Any] | None:
    """The daemon's ping reply, or None if no daemon answers on ``sock_path``."""
    try:
        reply = request(sock_path, {"verb": "ping"}, timeout=5)
    except (ConnectionFailed, OSError, ValueError):
        return None
    return reply if reply.get("ok") else None


class Client:
    """A connection-per-call client of one daemon, for scripts and test suites.

    ``socket`` defaults as the CLI's (``$DMUSER_SOCKET``, else ``paths.py``);
    ``timeout`` (seconds, default none) bounds each reply, except ``wait``,
    which gets its own timeout plus that much.  Relative paths in tables are
    taken from the caller's working directory at the time of the call, as on
    the command line.  Every method raises a
    :class:`~dmuser.errors.DmuserError` subclass on failure, e.g.
    :class:`~dmuser.errors.NoSuchDevice` for an unknown name.

    >>> c = Client("/run/dmuser.sock")                 # doctest: +SKIP
    >>> path = c.create("lin", "0 2048 linear /srv/disk.img 0")  # doctest: +SKIP
    >>> c.info("lin").nr_sectors                       # doctest: +SKIP
    2048
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, *,
                 timeout: float | None = None) -> None:
        self.socket = os.fspath(socket) if socket is not None else paths.default_socket()
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Client({self.socket!r})"

    def _run(self, call: calls.Call[R]) -> R:
        timeout = call.timeout if call.timeout is not None or call.unbounded else self.timeout
        return calls.finish(call, request(self.socket, call.request, timeout))

    def call(self, verb: str, **fields: Any) -> Reply:
        """Any verb with the given request fields; the reply's text and data, as the
        CLI prints them.  Error replies raise, as for the typed methods."""
        return self._run(calls.raw(verb, **fields))

    def create(self, name: str, table: Table | None = None, *, uuid: str = "",
               read_only: bool = False) -> str:
        """Create ``name``, load ``table`` (a string of lines, or a sequence of lines)
        and activate it; without a table the device is created empty (``--notable``).
        ``read_only``: writes fail with EPERM.  Returns the device's file on the mount."""
        return self._run(calls.create(name, table, uuid, read_only))

    def reload(self, name: str, table: Table, *, read_only: bool = False) -> None:
        """Load ``table`` as the inactive table; :meth:`resume` makes it live."""
        self._run(calls.reload(name, table, read_only))

    def suspend(self, name: str, *, noflush: bool = False, nolockfs: bool = False) -> None:
        """Hold new I/O and drain I/O in flight; ``noflush`` lets targets requeue.
        Unless ``nolockfs``, a file system mounted on the device's block device is
        frozen first (and thawed by :meth:`resume`)."""
        self._run(calls.simple("suspend", name, noflush=noflush, nolockfs=nolockfs))

    def resume(self, name: str, *, nolockfs: bool = False) -> None:
        """Swap in the inactive table, if any, and release held I/O (a running device
        is suspended for the swap, frozen unless ``nolockfs``)."""
        self._run(calls.simple("resume", name, nolockfs=nolockfs))

    def clear(self, name: str) -> None:
        """Drop the inactive table."""
        self._run(calls.simple("clear", name))

    def remove(self, name: str, *, force: bool = False, deferred: bool = False) -> None:
        """Remove the device; ``force`` removes it while open (its I/O then fails);
        ``deferred`` marks a busy device, which goes when its last opener closes."""
        self._run(calls.simple("remove", name, force=force, deferred=deferred))

    def message(self, name: str, sector: int | str, message: str | Sequence[str]) -> str:
        """Send a target message (a string is split into words); the target's answer."""
        words = message.split() if isinstance(message, str) else message
        return self._run(calls.message(name, sector, words))

    def status(self, name: str, *, inactive: bool = False) -> list[TargetStatus]:
        """The typed status of each target of the device (``dmuser.status``)."""
        return self._run(calls.status(name, inactive))

    def status_all(self, *, inactive: bool = False) -> dict[str, list[TargetStatus]]:
        """:meth:`status` of every device, by name."""
        return self._run(calls.status_all(inactive))

    def table(self, name: str, *, inactive: bool = False) -> list[TableLine]:
        """The typed table lines of the live (or inactive) table; ``[]`` if absent."""
        return self._run(calls.table(name, inactive))

    def info(self, name: str) -> DeviceInfo:
        """The device's state (``dmsetup info``)."""
        return self._run(calls.info(name))

    def info_all(self) -> list[DeviceInfo]:
        """:meth:`info` of every device, sorted by name."""
        return self._run(calls.info_all())

    def ls(self) -> dict[str, str]:
        """Every device: name -> its file on the mount."""
        return self._run(calls.ls())

    def targets(self) -> dict[str, tuple[int, ...]]:
        """The target types the daemon serves and their versions."""
        return self._run(calls.targets())

    def wait(self, name: str, event_nr: int = 0, *, timeout: float | None = None) -> int:
        """Block until the device's event number exceeds ``event_nr`` (``dmsetup wait``);
        return the new number.  Pass ``info(name).event_nr`` to wait for the next
        event.  Raises WaitTimeout after ``timeout`` seconds, NoSuchDevice if the
        device is removed meanwhile.  Holds no lock in the daemon."""
        return self._run(calls.wait(name, event_nr, timeout, self.timeout))

    def shutdown(self) -> None:
        """Ask the daemon to drain, flush, remove every device and exit; returns at once."""
        self._run(calls.shutdown())

    def ping(self) -> DaemonInfo:
        """The daemon's pid and mountpoint; raises DaemonNotRunning if none answers."""
        return self._run(calls.ping())
