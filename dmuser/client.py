"""The CLI side of the control socket: one JSON request, one JSON reply.

Protocol (``docs/control-protocol.md``): the client connects to the Unix
socket, sends one JSON object terminated by a newline (``{"verb": ..., ...}``),
and reads one JSON object back: ``{"ok": true, "output": str, "data": ...}`` or
``{"ok": false, "errno": int, "error": str}``.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from dmuser.core.errors import DmError


class DaemonNotRunning(DmError):
    pass


#: sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH_BYTES = 107


def check_socket_path(sock_path: str) -> None:
    """Raise DmError if ``sock_path`` cannot be a Unix socket address."""
    n = len(os.fsencode(sock_path))
    if n > MAX_SOCKET_PATH_BYTES:
        raise DmError(f"socket path too long ({n} bytes; a Unix socket path holds at most "
                      f"{MAX_SOCKET_PATH_BYTES}): {sock_path}")


def request(sock_path: str, req: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Send ``req``; return the reply.

    Every failure is a DmError with a one-line message: DaemonNotRunning if
    nobody listens, otherwise what went wrong with the socket or the reply.
    """
    check_socket_path(sock_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(sock_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(f"no dmuser daemon is listening on {sock_path} "
                                   f"({exc.strerror}); start one with 'dmuser serve'") from None
        except PermissionError:
            raise DmError(f"cannot connect to {sock_path}: permission denied "
                          "(the daemon runs as root?)") from None
        except OSError as exc:
            raise DmError(f"cannot connect to {sock_path}: {exc.strerror or exc}") from None
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except TimeoutError:
            raise DmError(f"no reply from the daemon on {sock_path} within {timeout} s") from None
        except OSError as exc:
            raise DmError(f"the daemon on {sock_path} went away: "
                          f"{exc.strerror or exc}") from None
    finally:
        s.close()
    raw = b"".join(chunks)
    if not raw:
        raise DmError("the daemon closed the connection without a reply")
    try:
        reply = json.loads(raw)
    except ValueError:
        raise DmError(f"the daemon sent a reply that is not JSON: {raw[:80]!r}") from None
    if not isinstance(reply, dict):
        raise DmError(f"the daemon sent a reply that is not an object: {raw[:80]!r}")
    return reply


def ping(sock_path: str) -> dict[str, Any] | None:
    """The daemon's ping reply, or None if no daemon answers on ``sock_path``."""
    try:
        reply = request(sock_path, {"verb": "ping"}, timeout=5)
    except (DmError, OSError, ValueError):
        return None
    return reply if reply.get("ok") else None
