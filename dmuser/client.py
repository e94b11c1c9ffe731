"""The CLI side of the control socket: one JSON request, one JSON reply.

Protocol (``docs/control-protocol.md``): the client connects to the Unix
socket, sends one JSON object terminated by a newline (``{"verb": ..., ...}``),
and reads one JSON object back: ``{"ok": true, "output": str, "data": ...}`` or
``{"ok": false, "errno": int, "error": str}``.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from dmuser.core.errors import DmError


class DaemonNotRunning(DmError):
    pass


def request(sock_path: str, req: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Send ``req``; return the reply.  Raises DaemonNotRunning if nobody listens."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(sock_path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(f"no dmuser daemon is listening on {sock_path} "
                                   f"({exc.strerror}); start one with 'dmuser serve'") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    finally:
        s.close()
    raw = b"".join(chunks)
    if not raw:
        raise DmError("the daemon closed the connection without a reply")
    reply: dict[str, Any] = json.loads(raw)
    return reply


def ping(sock_path: str) -> dict[str, Any] | None:
    """The daemon's ping reply, or None if no daemon answers on ``sock_path``."""
    try:
        reply = request(sock_path, {"verb": "ping"}, timeout=5)
    except (DmError, OSError, ValueError):
        return None
    return reply if reply.get("ok") else None
