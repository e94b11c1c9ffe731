"""The dmsetup verbs, independent of transport.

Each verb takes the request's fields and returns a :class:`Reply` holding the
text ``dmuser`` prints (formats as ``dmsetup`` prints them) and, for ``--json``,
structured data.  Errors are raised as :class:`DmError`; the control server
turns them into error replies (``daemon.py``).
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from dmuser.core.args import parse_uint
from dmuser.core.errors import DmError, TableError
from dmuser.core.manager import DeviceManager
from dmuser.core.mapped_device import DeviceInfo, MappedDevice
from dmuser.core.target import StatusType
from dmuser.nbd_server import server_for


@dataclass
class Reply:
    output: str = ""
    data: Any = None


Verb = Callable[[DeviceManager, dict[str, Any]], Awaitable[Reply]]
VERBS: dict[str, Verb] = {}


def verb(name: str) -> Callable[[Verb], Verb]:
    def deco(fn: Verb) -> Verb:
        VERBS[name] = fn
        return fn
    return deco


def _lines(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _devices(mgr: DeviceManager, req: dict[str, Any]) -> list[MappedDevice]:
    """The named device, or every device when no name was given."""
    name = req.get("name")
    return [mgr.get(name)] if name else list(mgr)


@verb("create")
async def create(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
    md = await mgr.create(req["name"], req.get("table"), req.get("cwd", "/"), req.get("uuid", ""),
                          read_only=bool(req.get("read_only")))
    return Reply(data={"name": md.name, "path": md.path})


@verb("remove")
async def remove(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
    await mgr.remove(req["name"], bool(req.get("force")), deferred=bool(req.get("deferred")))
    return Reply()


@verb("reload")
async def reload(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
    md = mgr.get(req["name"])
    table = await mgr.build_table(md, req["table"], req.get("cwd", "/"))
    await md.load(table, read_only=bool(req.get("read_only")))
    return Reply()


def _state_verb(method: str) -> Verb:
    """A verb that calls one state-changing method of the named device."""
    async def run(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
        await getattr(mgr.get(req["name"]), method)()
        return Reply()
    return run


VERBS["clear"] = _state_verb("clear")


@verb("resume")
async def resume(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
    """Swap in the inactive table; with block devices also attach, resize, thaw."""
    await mgr.resume(mgr.get(req["name"]), nolockfs=bool(req.get("nolockfs")))
    return Reply()


@verb("suspend")
async def suspend(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
    """Unless ``nolockfs``, freeze the file system on the block device first."""
    await mgr.suspend(mgr.get(req["name"]), noflush=bool(req.get("noflush")),
                      nolockfs=bool(req.get("nolockfs")))
    return Reply()


@verb("ls")
async def ls(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
    devices = list(mgr)
    if not devices:
        return Reply("No devices found\n", [])
    return Reply(_lines([f"{md.name}\t({md.path})" for md in devices]),
                 [{"name": md.name, "path": md.path, **_block(md), **_exports(mgr, md)}
                  for md in devices])


def _block(md: MappedDevice) -> dict[str, str]:
    """The block device fields (``serve --block-devices``) when ``md`` has one."""
    if not md.block_device:
        return {}
    return {"block_device": md.block_device, "block_devno": md.block_devno}


def _exports(mgr: DeviceManager, md: MappedDevice) -> dict[str, Any]:
    """``{"exports": [...]}`` when ``md`` is exported over NBD, else ``{}``."""
    try:
        found = server_for(mgr).exports_of(md.name)
    except DmError:
        return {}
    return {"exports": found} if found else {}


@verb("export")
async def export(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
    """Serve device ``name`` over NBD on ``address`` (``nbd_server.py``)."""
    found = await server_for(mgr).export(
        req["name"], req["address"], cwd=req.get("cwd", "/"),
        read_only=bool(req.get("read_only")), insecure=bool(req.get("insecure")),
        export_name=req.get("export_name"), tls_cert=req.get("tls_cert"),
        tls_key=req.get("tls_key"), tls_ca=req.get("tls_ca"),
        allow=[str(a) for a in req.get("allow") or ()])
    return Reply(found["uri"] + "\n", found)


@verb("unexport")
async def unexport(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
    await server_for(mgr).unexport(req["name"], req.get("address"))
    return Reply()


def _table_verb(kind: StatusType) -> Verb:
    async def run(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
        devices = _devices(mgr, req)
        if not devices:
            return Reply("No devices found\n", {})
        inactive = bool(req.get("inactive"))
        out, data = [], {}
        for md in devices:
            if (md.inactive if inactive else md.live) is None:
                lines: list[str] = []
            else:
                lines = md.table_lines(kind, inactive)
            data[md.name] = lines
            if req.get("name"):
                out.extend(lines)
            else:
                out.extend(f"{md.name}: {line}" for line in lines)
        return Reply(_lines(out), data)
    return run


VERBS["table"] = _table_verb(StatusType.TABLE)
VERBS["status"] = _table_verb(StatusType.INFO)


def format_info(i: DeviceInfo, exports: Sequence[dict[str, Any]] = ()) -> str:
    tables = " & ".join(t for t, present in (("LIVE", i.live), ("INACTIVE", i.inactive))
                        if present) or "None"
    rows = [("Name", i.name),
            ("State", ("SUSPENDED" if i.suspended else "ACTIVE")
             + (" (READ-ONLY)" if i.read_only else "")
             + (" (DEFERRED REMOVE)" if i.deferred_remove else "")),
            ("Tables present", tables),
            ("Open count", str(i.open_count)),
            ("Event number", str(i.event_nr)),
            ("Number of targets", str(i.nr_targets)),
            ("Size", f"{i.nr_sectors} sectors"),
            ("File", i.path)]
    if i.block_device:
        rows.append(("Block device", f"{i.block_device} ({i.block_devno})"))
    if i.uuid:
        rows.append(("UUID", i.uuid))
    for exp in exports:
        rows.append(("NBD export", exp["uri"] + (" (read-only)" if exp["read_only"] else "")))
    return _lines([f"{k + ':':<19}{v}" for k, v in rows])


@verb("info")
async def info(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
    devices = _devices(mgr, req)
    if not devices:
        return Reply("No devices found\n", [])
    exports = {md.name: _exports(mgr, md) for md in devices}
    infos = await mgr.infos(devices)
    return Reply("\n".join(format_info(i, exports[i.name].get("exports", [])) for i in infos),
                 [{**dataclasses.asdict(i), **exports[i.name]} for i in infos])


@verb("message")
async def message(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
    md = mgr.get(req["name"])
    words = list(req.get("message", []))
    if not words:
        raise TableError("Empty message received.")
    sector = parse_uint(str(req.get("sector", "")))
    if sector is None:
        raise TableError("Invalid target message parameters.")
    if words == ["@cancel_deferred_remove"]:  # the dm core's own message
        md.deferred_remove = False
        return Reply()
    if md.live is None or sector >= md.nr_sectors:
        raise TableError("Target message sector outside device.")
    result = await md.live.target_at(sector).message(words)
    return Reply(result + "\n" if result else "")


@verb("wait")
async def wait(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
    """``dmsetup wait NAME [EVENT_NR]``: until the device's event number exceeds
    ``event_nr`` (default 0), at most ``timeout`` seconds (default: no limit).

    Holds no lock while it waits; ends with ENXIO when the device is removed
    (also by the daemon's shutdown) and ETIMEDOUT after the timeout.
    """
    md = mgr.get(req["name"])
    after = parse_uint(str(req.get("event_nr", 0)))
    if after is None:
        raise TableError(f"Invalid event number {req.get('event_nr')!r}.")
    timeout = req.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout >= 0):
        raise TableError(f"Invalid timeout {timeout!r}.")
    with trio.move_on_after(math.inf if timeout is None else float(timeout)):
        nr = await md.wait_event(after)
        return Reply(data={"event_nr": nr})
    raise DmError(f"Timed out after {timeout} s waiting for an event on {md.name} "
                  f"(event number {md.event_nr}).", errno.ETIMEDOUT)


@verb("targets")
async def targets(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
    rows = [(name, cls.version) for name, cls in mgr.types.items()]
    return Reply(_lines([f"{n:<16} v{'.'.join(map(str, v))}" for n, v in rows]),
                 {n: list(v) for n, v in rows})


@verb("ping")
async def ping(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
    return Reply(data={"pid": os.getpid(), "mountpoint": mgr.mountpoint})


async def dispatch(mgr: DeviceManager, req: dict[str, Any]) -> Reply:
    name = req.get("verb")
    fn = VERBS.get(str(name))
    if fn is None:
        raise DmError(f"unknown verb {name!r}")
    return await fn(mgr, req)
