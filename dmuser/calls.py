"""The verbs of the control protocol as requests and reply decoders.

One :class:`Call` per API method: the JSON request to send and the function
that turns a successful reply into the method's result.  The synchronous
:class:`dmuser.Client` and the trio :class:`dmuser.AsyncClient` share these,
so the two clients can differ only in how bytes move, never in what a verb
means.  Decoding is strict: a reply whose data does not have the documented
shape raises :class:`~dmuser.errors.ProtocolError`, not a ``KeyError``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dmuser.errors import ProtocolError, error_from_reply
from dmuser.status import DeviceInfo, TableLine, TargetStatus, parse_status, parse_table

R = TypeVar("R")

#: how much longer than a wait's own timeout the client waits for the reply
WAIT_REPLY_GRACE = 30.0

Table = str | Sequence[str]


@dataclass(frozen=True)
class Reply:
    """A successful reply: the text ``dmuser`` prints and the data ``--json`` prints."""

    output: str
    data: Any


@dataclass(frozen=True)
class DaemonInfo:
    """What ``ping`` reports: the daemon's pid and its FUSE mountpoint."""

    pid: int
    mountpoint: str


@dataclass(frozen=True)
class Call(Generic[R]):
    request: dict[str, Any]
    decode: Callable[[Reply], R]
    #: the socket timeout this call needs instead of the client's (wait: longer)
    timeout: float | None = None
    #: the call blocks on purpose (wait without timeout): no socket timeout at all
    unbounded: bool = False


def check_reply(reply: dict[str, Any]) -> Reply:
    """The reply's payload, or the typed exception of an error reply."""
    if reply.get("ok") is not True:
        raise error_from_reply(reply)
    output = reply.get("output", "")
    return Reply(output if isinstance(output, str) else "", reply.get("data"))


def finish(call: Call[R], reply: dict[str, Any]) -> R:
    """Check ``reply`` and decode it for ``call``; a malformed payload is a ProtocolError."""
    payload = check_reply(reply)
    try:
        return call.decode(payload)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ProtocolError(f"unexpected {call.request.get('verb')} reply from the daemon: "
                            f"{exc}") from None


def table_text(table: Table) -> str:
    """A table as the protocol carries it: one string, lines separated by newlines."""
    return table if isinstance(table, str) else "".join(line + "\n" for line in table)


def _none(r: Reply) -> None:
    return None


def _lines(r: Reply, name: str) -> list[str]:
    lines = r.data[name]
    if not isinstance(lines, list):
        raise TypeError(f"lines of {name} are not a list")
    return [str(line) for line in lines]


def raw(verb: str, **fields: Any) -> Call[Reply]:
    """Any verb, its reply undecoded (what the CLI prints)."""
    return Call({"verb": verb, "cwd": os.getcwd(), **fields}, lambda r: r)


def create(name: str, table: Table | None, uuid: str, read_only: bool = False) -> Call[str]:
    req = {"verb": "create", "name": name, "uuid": uuid, "cwd": os.getcwd(),
           "table": None if table is None else table_text(table), "read_only": read_only}
    return Call(req, lambda r: str(r.data["path"]))


def reload(name: str, table: Table, read_only: bool = False) -> Call[None]:
    return Call({"verb": "reload", "name": name, "table": table_text(table),
                 "cwd": os.getcwd(), "read_only": read_only}, _none)


def simple(verb: str, name: str, **fields: Any) -> Call[None]:
    """suspend, resume, clear, remove: a name in, nothing out."""
    return Call({"verb": verb, "name": name, **fields}, _none)


def message(name: str, sector: int | str, words: Sequence[str]) -> Call[str]:
    return Call({"verb": "message", "name": name, "sector": str(sector),
                 "message": list(words)}, lambda r: r.output.removesuffix("\n"))


def status(name: str, inactive: bool) -> Call[list[TargetStatus]]:
    return Call({"verb": "status", "name": name, "inactive": inactive},
                lambda r: [parse_status(line) for line in _lines(r, name)])


def status_all(inactive: bool) -> Call[dict[str, list[TargetStatus]]]:
    return Call({"verb": "status", "inactive": inactive},
                lambda r: {n: [parse_status(line) for line in _lines(r, n)] for n in r.data})


def table(name: str, inactive: bool) -> Call[list[TableLine]]:
    return Call({"verb": "table", "name": name, "inactive": inactive},
                lambda r: [parse_table(line) for line in _lines(r, name)])


def info(name: str) -> Call[DeviceInfo]:
    def decode(r: Reply) -> DeviceInfo:
        if not isinstance(r.data, list) or len(r.data) != 1:
            raise ValueError("expected one device")
        return DeviceInfo.from_data(r.data[0])
    return Call({"verb": "info", "name": name}, decode)


def info_all() -> Call[list[DeviceInfo]]:
    return Call({"verb": "info"}, lambda r: [DeviceInfo.from_data(d) for d in r.data])


def ls() -> Call[dict[str, str]]:
    return Call({"verb": "ls"}, lambda r: {str(d["name"]): str(d["path"]) for d in r.data})


def targets() -> Call[dict[str, tuple[int, ...]]]:
    return Call({"verb": "targets"},
                lambda r: {str(k): tuple(int(x) for x in v) for k, v in r.data.items()})


def wait(name: str, event_nr: int, timeout: float | None,
         client_timeout: float | None) -> Call[int]:
    req: dict[str, Any] = {"verb": "wait", "name": name, "event_nr": event_nr}
    if timeout is not None:
        req["timeout"] = timeout
        sock_timeout: float | None = timeout + (client_timeout or WAIT_REPLY_GRACE)
    else:
        sock_timeout = None
    return Call(req, lambda r: int(r.data["event_nr"]), sock_timeout,
                unbounded=timeout is None)


def shutdown() -> Call[None]:
    return Call({"verb": "shutdown"}, _none)


def ping() -> Call[DaemonInfo]:
    return Call({"verb": "ping"},
                lambda r: DaemonInfo(int(r.data["pid"]), str(r.data["mountpoint"])))
