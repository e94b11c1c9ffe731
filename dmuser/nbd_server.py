"""The daemon's NBD server: mapped devices as NBD exports (``docs/nbd.md``).

``export NAME ADDRESS`` listens on ``ADDRESS`` (TCP ``host:port`` or a Unix
socket path) and serves device ``NAME`` there; several exports may share an
address.  Guarantees:

* **Same path as FUSE.** Every request becomes a :class:`Bio` submitted to
  :meth:`MappedDevice.submit`, or takes the direct path the FUSE file takes
  (``nbd_session._direct``), so an export follows suspend (requests wait),
  resume and table reloads, exactly like the device's file.
* **Ordering.** Each request runs in its own trio task (at most
  ``nbd_session.MAX_IN_FLIGHT`` per connection), so requests complete in any order, as
  the protocol allows; replies are written whole, one at a time.
* **Memory.** The payloads of all connections together stay within
  :attr:`NbdServer.budget` (``nbd_session.BUDGET_PAGES``, 64 MiB); past it the
  connections stop reading requests until replies are sent (``nbd_session.py``).
  ``NBD_CMD_FLUSH`` is an empty flush bio: every write *completed* (replied to)
  before it is durable when its reply comes.  ``NBD_CMD_FLAG_FUA`` is
  ``ReqFlag.FUA``: that write is durable when its reply comes.
* **Read-only exports** refuse WRITE, TRIM and WRITE_ZEROES with EPERM.
* **Security.** A listener may require TLS (``tls_cert``/``tls_key``, x509 via
  :mod:`ssl`; with ``tls_ca`` the client must also show a certificate signed by
  that CA), and may admit only client addresses in an ``allow`` list (checked
  before a byte is sent).  Without TLS a TCP address must be loopback unless
  the request says ``insecure``; Unix sockets are made mode 0600 (owner only).
  TLS and the allow-list belong to the listener (the address): every export on
  one address shares them, and a second export must ask for the same.
* **Stopping.** ``unexport``, and the daemon's shutdown (before it quiesces the
  devices), stop reading requests, let the requests in flight finish and
  answer, then close the connections.  A connected client counts as an opener
  (``open_count``), so ``remove`` without ``--force`` refuses while one is on.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import os
import ssl
import stat
import weakref
from dataclasses import dataclass, field
from typing import Any

import trio

from dmuser.core.errors import DmError
from dmuser.core.manager import DeviceManager
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.nbd_wire import Wire
from dmuser.formats import nbd
from dmuser.nbd_session import BUDGET_PAGES, GONE, Conn, Export, Found, handshake, transmission
from dmuser.services.dm_io_mem import PagePool

log = logging.getLogger(__name__)

#: how long unexport waits for the requests in flight of the clients it disconnects
STOP_TIMEOUT = 30.0
#: how long a client may take from connecting to choosing an export (TLS included):
#: a client that connects and says nothing holds no connection for longer
HANDSHAKE_TIMEOUT = 30.0
#: the same at shutdown: a request held by a device the user left suspended would
#: otherwise hold the shutdown (the quiesce after it resumes such devices)
SHUTDOWN_TIMEOUT = 5.0

_SERVERS: weakref.WeakKeyDictionary[DeviceManager, NbdServer] = weakref.WeakKeyDictionary()


def server_for(mgr: DeviceManager) -> NbdServer:
    """The NBD server of the daemon that owns ``mgr``."""
    server = _SERVERS.get(mgr)
    if server is None or server.nursery is None:
        raise DmError("the NBD server is not running", errno.ENOTSUP)
    return server


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Security:
    """What a listener demands of its clients: TLS files (absolute paths; none: no
    TLS) and the client networks admitted (empty: any)."""

    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    allow: tuple[Network, ...] = ()

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def admits(self, peer: str) -> bool:
        if not self.allow:
            return True
        ip = ipaddress.ip_address(peer.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allow)

    def context(self) -> ssl.SSLContext:
        """The server's TLS context (reads the files: call it in a thread)."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_ca:
            ctx.load_verify_locations(self.tls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


async def security(cwd: str, tls_cert: str | None, tls_key: str | None, tls_ca: str | None,
                   allow: list[str] | None) -> tuple[Security, ssl.SSLContext | None]:
    """The :class:`Security` of an export request and its TLS context; DmError (EINVAL)
    naming the bad field."""
    if bool(tls_cert) != bool(tls_key) or (tls_ca and not tls_cert):
        raise DmError("TLS needs both tls_cert and tls_key (tls_ca only with them)",
                      errno.EINVAL)
    nets = []
    for word in allow or ():
        try:
            nets.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise DmError(f"bad allow entry {word!r}: use an address or a network "
                          "(ADDR/PREFIX)", errno.EINVAL) from None
    cert, key, ca = (os.path.join(cwd, f) if f else "" for f in (tls_cert, tls_key, tls_ca))
    sec = Security(cert, key, ca, tuple(nets))
    if not sec.tls:
        return sec, None
    try:
        return sec, await trio.to_thread.run_sync(sec.context)
    except (OSError, ssl.SSLError) as exc:
        raise DmError(f"TLS certificate or key: {exc}", errno.EINVAL) from None


@dataclass(eq=False)
class _Listener:
    address: str
    unix_path: str = ""
    security: Security = Security()
    tls: ssl.SSLContext | None = None
    exports: dict[str, Export] = field(default_factory=dict)
    conns: set[Conn] = field(default_factory=set)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closed: trio.Event = field(default_factory=trio.Event)


async def parse_address(address: str, cwd: str, insecure: bool,
                        tls: bool = False) -> tuple[str, int, str]:
    """(host, port, unix path) of a listen address: a path (with a ``/``, or after
    ``unix:``) is a Unix socket, else ``HOST[:PORT]`` (port 0: any free port).
    Refuses a TCP address that is not loopback unless ``tls`` or ``insecure``."""
    if "/" in address or address.startswith("unix:"):  # a Unix socket path
        return "", 0, os.path.normpath(os.path.join(cwd, address.removeprefix("unix:")))
    host, sep, port_s = address.rpartition(":")
    if not sep:
        host, port_s = address, str(nbd.DEFAULT_PORT)
    host = host.strip("[]") or "localhost"
    if not port_s.isdigit() or int(port_s) > 65535:
        raise DmError(f"bad NBD address {address!r}: use HOST:PORT or a Unix socket path")
    try:
        infos = await trio.socket.getaddrinfo(host, int(port_s), type=trio.socket.SOCK_STREAM)
    except OSError as exc:
        raise DmError(f"bad NBD address {address!r}: {exc}") from None
    loopback = all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)
    if not loopback and not tls and not insecure:
        raise DmError(f"refusing to serve NBD on {address}: not a loopback address, and "
                      "no TLS (anyone who can reach it could read and write the device); "
                      "give a TLS certificate and key, use a Unix socket or a loopback "
                      "address, or opt in with 'insecure'", errno.EPERM)
    if not loopback and not tls:
        log.warning("NBD on %s: a non-loopback address without TLS ('insecure')", address)
    if int(port_s) == 0:  # any free port: on one address only (each would get its own port)
        host = str(infos[0][4][0])
    return host, int(port_s), ""


class NbdServer:
    """Every NBD listener of one daemon; run :meth:`run` in the daemon's nursery."""

    def __init__(self, mgr: DeviceManager) -> None:
        self.mgr = mgr
        self.listeners: dict[str, _Listener] = {}
        self.nursery: trio.Nursery | None = None
        #: the payload pages all connections may hold together (``nbd_session.py``)
        self.budget = PagePool(BUDGET_PAGES)
        _SERVERS[mgr] = self

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    # -- the verbs ---------------------------------------------------------------------

    async def export(self, device: str, address: str, *, cwd: str = "/",
                     read_only: bool = False, insecure: bool = False,
                     export_name: str | None = None, tls_cert: str | None = None,
                     tls_key: str | None = None, tls_ca: str | None = None,
                     allow: list[str] | None = None) -> dict[str, Any]:
        self.mgr.get(device)  # ENXIO if there is no such device
        sec, ctx = await security(cwd, tls_cert, tls_key, tls_ca, allow)
        host, port, path = await parse_address(address, cwd, insecure, sec.tls)
        if path and sec.allow:
            raise DmError("an allow-list is for TCP addresses (a Unix socket is mode 0600)",
                          errno.EINVAL)
        key = path or f"{host}:{port}"
        lst = self.listeners.get(key)
        if lst is not None and lst.security != sec:
            raise DmError(f"{lst.address} already serves other exports with other TLS or "
                          "allow settings (they belong to the address)", errno.EEXIST)
        if lst is None:
            assert self.nursery is not None
            lst = await self.nursery.start(self._listen, host, port, path)
            lst.security, lst.tls = sec, ctx
            self.listeners[lst.address] = lst
        name = device if export_name is None else export_name
        if name in lst.exports:
            raise DmError(f"{lst.address} already exports {name!r}", errno.EEXIST)
        lst.exports[name] = Export(device, name, read_only)
        log.info("NBD: exporting %s as %r on %s%s", device, name, lst.address,
                 " (read-only)" if read_only else "")
        return self._describe(lst, lst.exports[name])

    async def unexport(self, device: str, address: str | None = None) -> None:
        """Stop exporting ``device`` (on ``address`` only, if given); its clients are
        disconnected once their requests in flight are answered."""
        found = False
        for lst in list(self.listeners.values()):
            if address is not None and address not in (lst.address, lst.unix_path):
                continue
            for name, exp in list(lst.exports.items()):
                if exp.device == device:
                    found = True
                    del lst.exports[name]
                    await self._stop_conns(lst, [c for c in lst.conns if c.export is exp])
            if not lst.exports:
                await self._close(lst)
        if not found:
            raise DmError(f"{device} is not exported" + (f" on {address}" if address else ""),
                          errno.ENOENT)

    def exports_of(self, device: str) -> list[dict[str, Any]]:
        return [self._describe(lst, exp) for lst in self.listeners.values()
                for exp in lst.exports.values() if exp.device == device]

    async def stop(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Close every listener (graceful, see the module docstring); the daemon's shutdown.
        Requests still in flight after ``timeout`` seconds are cancelled, unanswered."""
        for lst in list(self.listeners.values()):
            await self._close(lst, timeout)

    def _describe(self, lst: _Listener, exp: Export) -> dict[str, Any]:
        scheme = "nbds" if lst.security.tls else "nbd"
        if lst.unix_path:
            uri = f"{scheme}+unix:///{exp.name}?socket={lst.unix_path}"
        else:
            host, _, port = lst.address.rpartition(":")
            uri = f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}/{exp.name}"
        return {"address": lst.address, "export": exp.name, "read_only": exp.read_only,
                "uri": uri, "connections": sum(c.export is exp for c in lst.conns),
                "tls": lst.security.tls, "client_certificates": bool(lst.security.tls_ca),
                "allow": [str(n) for n in lst.security.allow]}

    async def _stop_conns(self, lst: _Listener, conns: list[Conn],
                          timeout: float = STOP_TIMEOUT) -> None:
        for conn in conns:
            conn.stop()
        with trio.move_on_after(timeout):
            for conn in conns:
                await conn.finished.wait()

    async def _close(self, lst: _Listener, timeout: float = STOP_TIMEOUT) -> None:
        self.listeners.pop(lst.address, None)
        await self._stop_conns(lst, list(lst.conns), timeout)
        lst.scope.cancel()
        await lst.closed.wait()  # its socket file is gone when this returns

    # -- listening ---------------------------------------------------------------------

    async def _listen(self, host: str, port: int, path: str,
                      task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners: list[trio.SocketListener] = []
        lst: _Listener | None = None
        try:
            if path:
                listeners = [await _unix_listener(path)]
                address = path
            else:
                try:
                    listeners = await trio.open_tcp_listeners(port, host=host)
                except OSError as exc:
                    raise DmError(f"cannot listen on {host}:{port}: {exc.strerror}",
                                  exc.errno) from None
                port = listeners[0].socket.getsockname()[1]
                address = f"{host}:{port}"
            lst = _Listener(address, path)
            with lst.scope:
                async with trio.open_nursery() as conns:
                    task_status.started(lst)
                    await trio.serve_listeners(functools.partial(self._connection, lst), listeners,
                                               handler_nursery=conns)
        finally:
            for listener in listeners:
                await listener.aclose()
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if lst is not None:
                lst.closed.set()

    # -- one connection ----------------------------------------------------------------

    async def _connection(self, lst: _Listener, stream: trio.abc.Stream) -> None:
        conn = Conn()
        lst.conns.add(conn)
        assert isinstance(stream, trio.SocketStream)
        wire = Wire(stream.socket)
        md: MappedDevice | None = None
        try:
            with contextlib.closing(wire):
                if not lst.unix_path:
                    peer = str(stream.socket.getpeername()[0])
                    if not lst.security.admits(peer):
                        log.warning("NBD on %s: refused %s (not in the allow-list)",
                                    lst.address, peer)
                        return
                found: Found | None = None
                with conn.scope:
                    conn.scope.deadline = trio.current_time() + HANDSHAKE_TIMEOUT
                    found = await handshake(wire, functools.partial(self._lookup, lst),
                                            lambda: list(lst.exports), conn, lst.tls)
                if conn.scope.cancelled_caught and not conn.stopping:
                    log.warning("NBD client on %s: no export chosen within %g s",
                                lst.address, HANDSHAKE_TIMEOUT)
                if found is None or conn.stopping:
                    return
                conn.export, md = found
                md.open_count += 1
                conn.scope = trio.CancelScope()
                if conn.stopping:
                    return
                await transmission(wire, md, conn, self.budget)
        except GONE as exc:
            log.info("NBD client on %s: %s", lst.address, exc or type(exc).__name__)
        finally:
            if md is not None:
                md.open_count -= 1
            lst.conns.discard(conn)
            conn.finished.set()

    def _lookup(self, lst: _Listener, name: str) -> Found | None:
        exp = lst.exports.get(name)
        if exp is None and name == "" and len(lst.exports) == 1:
            exp = next(iter(lst.exports.values()))  # the default export
        md = self.mgr.devices.get(exp.device) if exp is not None else None
        return (exp, md) if exp is not None and md is not None else None


async def _unix_listener(path: str) -> trio.SocketListener:
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise DmError(f"{path} exists and is not a socket", errno.EEXIST)
        probe = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise DmError(f"{path}: something already listens there", errno.EADDRINUSE)
        finally:
            probe.close()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(path)
    except OSError as exc:
        sock.close()
        raise DmError(f"cannot listen on {path}: {exc.strerror}", exc.errno) from None
    finally:
        os.umask(old_umask)
    sock.listen(64)
    return trio.SocketListener(sock)
