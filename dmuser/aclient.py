"""The trio client of the control socket: :class:`AsyncClient`.

The same verbs, arguments, results and exceptions as :class:`dmuser.Client`
(both are built on ``calls.py``); only the transport differs: a trio Unix
stream per call, so a ``wait`` blocks only its own task.  Cancelling a call
closes its connection; the daemon then ends a pending ``wait`` at once.

    >>> async def main() -> None:                       # doctest: +SKIP
    ...     c = AsyncClient()
    ...     nr = (await c.info("mirr")).event_nr
    ...     await c.wait("mirr", nr, timeout=10)         # a leg failed, or resync ended
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import trio

from dmuser import calls, paths
from dmuser.calls import DaemonInfo, Reply, Table
from dmuser.client import (
    check_socket_path,
    connect_error,
    decode_reply,
    gone_error,
    timeout_error,
)
from dmuser.status import DeviceInfo, TableLine, TargetStatus

R = TypeVar("R")


async def arequest(sock_path: str, req: dict[str, Any],
                   timeout: float | None = None) -> dict[str, Any]:
    """:func:`dmuser.client.request` for trio: the same reply, the same one-line errors."""
    check_socket_path(sock_path)
    with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
        try:
            stream = await trio.open_unix_socket(sock_path)
        except OSError as exc:
            raise connect_error(exc, sock_path) from None
        async with stream:
            try:
                await stream.send_all(json.dumps(req).encode() + b"\n")
                chunks = []
                while data := await stream.receive_some(65536):
                    chunks.append(data)
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__
                raise gone_error(cause if isinstance(cause, OSError)
                                 else OSError(errno.EPIPE, "connection broken"),
                                 sock_path) from None
            except OSError as exc:
                raise gone_error(exc, sock_path) from None
        return decode_reply(b"".join(chunks))
    assert scope.cancelled_caught
    raise timeout_error(sock_path, timeout)


class AsyncClient:
    """:class:`dmuser.Client` for trio: every method is a coroutine, same semantics."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, *,
                 timeout: float | None = None) -> None:
        self.socket = os.fspath(socket) if socket is not None else paths.default_socket()
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"AsyncClient({self.socket!r})"

    async def _run(self, call: calls.Call[R]) -> R:
        timeout = call.timeout if call.timeout is not None or call.unbounded else self.timeout
        return calls.finish(call, await arequest(self.socket, call.request, timeout))

    async def call(self, verb: str, **fields: Any) -> Reply:
        return await self._run(calls.raw(verb, **fields))

    async def create(self, name: str, table: Table | None = None, *, uuid: str = "",
                     read_only: bool = False) -> str:
        return await self._run(calls.create(name, table, uuid, read_only))

    async def reload(self, name: str, table: Table, *, read_only: bool = False) -> None:
        await self._run(calls.reload(name, table, read_only))

    async def suspend(self, name: str, *, noflush: bool = False,
                      nolockfs: bool = False) -> None:
        await self._run(calls.simple("suspend", name, noflush=noflush, nolockfs=nolockfs))

    async def resume(self, name: str, *, nolockfs: bool = False) -> None:
        await self._run(calls.simple("resume", name, nolockfs=nolockfs))

    async def clear(self, name: str) -> None:
        await self._run(calls.simple("clear", name))

    async def remove(self, name: str, *, force: bool = False, deferred: bool = False) -> None:
        await self._run(calls.simple("remove", name, force=force, deferred=deferred))

    async def message(self, name: str, sector: int | str,
                      message: str | Sequence[str]) -> str:
        words = message.split() if isinstance(message, str) else message
        return await self._run(calls.message(name, sector, words))

    async def status(self, name: str, *, inactive: bool = False) -> list[TargetStatus]:
        return await self._run(calls.status(name, inactive))

    async def status_all(self, *, inactive: bool = False) -> dict[str, list[TargetStatus]]:
        return await self._run(calls.status_all(inactive))

    async def table(self, name: str, *, inactive: bool = False) -> list[TableLine]:
        return await self._run(calls.table(name, inactive))

    async def info(self, name: str) -> DeviceInfo:
        return await self._run(calls.info(name))

    async def info_all(self) -> list[DeviceInfo]:
        return await self._run(calls.info_all())

    async def ls(self) -> dict[str, str]:
        return await self._run(calls.ls())

    async def targets(self) -> dict[str, tuple[int, ...]]:
        return await self._run(calls.targets())

    async def wait(self, name: str, event_nr: int = 0, *,
                   timeout: float | None = None) -> int:
        return await self._run(calls.wait(name, event_nr, timeout, self.timeout))

    async def shutdown(self) -> None:
        await self._run(calls.shutdown())

    async def ping(self) -> DaemonInfo:
        return await self._run(calls.ping())
