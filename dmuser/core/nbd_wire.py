"""NBD connections: URIs, the byte stream (plain or TLS), and the client handshake.

Shared by the client device (``nbd_device.py``) and the daemon's server
(``dmuser/nbd_session.py``).  Guarantees:

* :class:`Wire` moves whole messages: :meth:`Wire.recv_into` fills its buffer
  or raises (EOFError when the peer closed), :meth:`Wire.send_all` sends every
  part.  One task may send while another receives; two concurrent senders need
  a lock (both users hold one).
* After :meth:`Wire.start_tls` every byte goes through TLS (``ssl``, TLS 1.2 or
  later), in pieces of at most :data:`_TLS_PIECE` (the copies ``ssl`` makes
  stay that small whatever the payload).  A plain wire makes the non-blocking
  socket calls itself, and waits (``wait_readable``/``wait_writable``) only
  when the socket is not ready; every call is a cancellation point, but it
  yields to other tasks only once every :data:`_YIELD_EVERY` calls (trio's own
  socket yields on each, which costs as much as the copy of a 256 KiB reply).
* The client :func:`handshake` of an ``nbds`` address sends ``NBD_OPT_STARTTLS``
  first and gives up if the server refuses it: it never falls back to plain
  text, so a TLS URI never carries data in the clear.

URIs (the NBD URI specification, as libnbd reads them):
``nbd[s]://HOST[:PORT]/EXPORT`` and ``nbd[s]+unix:///EXPORT?socket=PATH``; for
``nbds`` the query may add ``tls-certificates=DIR`` (``DIR/ca-cert.pem`` is the
CA that signed the server; ``DIR/client-cert.pem`` and ``client-key.pem``, when
present, are sent to servers that ask for a client certificate),
``tls-verify-peer=false`` and ``tls-hostname=NAME``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import urllib.parse
from dataclasses import dataclass

import trio

from dmuser.core.errors import DmIOError, NoSuchDeviceError
from dmuser.formats import nbd

_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")
#: the receive-ahead buffer of a :class:`Wire`
_RECV_AHEAD = 64 << 10
#: a plain :class:`Wire` yields to the scheduler once every this many calls
_YIELD_EVERY = 16
#: the most a TLS :class:`Wire` hands to ``ssl`` at once: ``ssl`` copies (encrypts
#: or decrypts) what it is given whole, so a 32 MiB payload would be copied whole
_TLS_PIECE = 256 << 10


def is_nbd_uri(word: str) -> bool:
    return word.startswith(tuple(f"{s}://" for s in _SCHEMES))


@dataclass(frozen=True, slots=True)
class NbdAddress:
    """Where an export is (a TCP ``host``/``port``, or a Unix socket ``path``), and
    how to reach it (``tls``, and the TLS options of the URI's query)."""

    export: str
    host: str = ""
    port: int = nbd.DEFAULT_PORT
    path: str = ""
    tls: bool = False
    tls_certificates: str = ""
    tls_verify: bool = True
    tls_hostname: str = ""

    def __str__(self) -> str:
        scheme = "nbds" if self.tls else "nbd"
        query = []
        if self.path:
            query.append(("socket", self.path))
        if self.tls_certificates:
            query.append(("tls-certificates", self.tls_certificates))
        if not self.tls_verify:
            query.append(("tls-verify-peer", "false"))
        if self.tls_hostname:
            query.append(("tls-hostname", self.tls_hostname))
        q = ("?" + "&".join(f"{k}={v}" for k, v in query)) if query else ""
        if self.path:
            return f"{scheme}+unix:///{self.export}{q}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.export}{q}"


def parse_uri(word: str, cwd: str = "/") -> NbdAddress:
    """An :class:`NbdAddress` from a URI (relative paths in the query are taken from
    ``cwd``).  Raises NoSuchDeviceError (ENXIO) for anything else."""
    url = urllib.parse.urlsplit(word)
    export = urllib.parse.unquote(url.path[1:] if url.path.startswith("/") else url.path)
    if url.scheme not in _SCHEMES:
        raise NoSuchDeviceError(f"{word}: not an NBD URI (nbd://, nbds://, nbd+unix:// "
                                "or nbds+unix://)")
    tls = url.scheme.startswith("nbds")
    try:
        query = urllib.parse.parse_qs(url.query, strict_parsing=bool(url.query))
        known = {"socket"} | ({"tls-certificates", "tls-verify-peer", "tls-hostname"}
                              if tls else set())
        if set(query) - known or any(len(v) != 1 for v in query.values()):
            raise ValueError(f"query {url.query!r}: the parameters allowed are "
                             f"{', '.join(sorted(known))}, each once")
        opts = {k: v[0] for k, v in query.items()}
        verify = opts.get("tls-verify-peer", "true").lower()
        if verify not in ("true", "false"):
            raise ValueError("tls-verify-peer is true or false")
        certs = opts.get("tls-certificates", "")
        base = NbdAddress(export, tls=tls, tls_verify=verify == "true",
                          tls_hostname=opts.get("tls-hostname", ""),
                          tls_certificates=os.path.join(cwd, certs) if certs else "")
        if url.scheme.endswith("+unix"):
            if url.netloc or "socket" not in opts:
                raise ValueError("needs exactly one socket=PATH and no host")
            return dataclasses.replace(base, path=os.path.join(cwd, opts["socket"]))
        if not url.hostname or "socket" in opts:
            raise ValueError("needs a host (and no socket=)")
        return dataclasses.replace(base, host=url.hostname, port=url.port or nbd.DEFAULT_PORT)
    except ValueError as exc:
        raise NoSuchDeviceError(f"{word}: not a valid NBD URI ({exc})") from None


def client_tls_context(addr: NbdAddress) -> ssl.SSLContext:
    """The TLS settings of ``addr`` (reads certificate files: call it in a thread)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    d = addr.tls_certificates
    if d:
        ctx.load_verify_locations(os.path.join(d, "ca-cert.pem"))
        cert, key = os.path.join(d, "client-cert.pem"), os.path.join(d, "client-key.pem")
        if os.path.exists(cert) and os.path.exists(key):
            ctx.load_cert_chain(cert, key)
    # a Unix socket has no host name to check unless the URI names one
    ctx.check_hostname = addr.tls_verify and bool(addr.tls_hostname or addr.host)
    if not addr.tls_verify:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- the byte stream -------------------------------------------------------------------


class Wire:
    """One connected NBD stream: a socket, with TLS over it after :meth:`start_tls`."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        #: the same connection, for the plain calls (a duplicate descriptor: closed here)
        self._raw = socket.socket(fileno=os.dup(sock.fileno()))
        self._raw.setblocking(False)
        # room for a whole 256 KiB reply (nbdcopy's and qemu's request size) in one call:
        # the kernel caps this at twice net.core.wmem_max (2 x 208 KiB by default)
        self._raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self._calls = 0
        self.tls: trio.SSLStream[trio.SocketStream] | None = None
        #: bytes received ahead (``_rbuf[_rpos:_rend]``): one receive may bring several
        #: small messages (pipelined requests or replies), each a wait less
        self._rbuf = memoryview(bytearray(_RECV_AHEAD))
        self._rpos = self._rend = 0

    async def start_tls(self, ctx: ssl.SSLContext, *, server_side: bool,
                        hostname: str | None = None) -> None:
        """The TLS handshake; from then on everything is encrypted.  A failed handshake
        raises trio.BrokenResourceError (its ``__cause__`` is the ssl error)."""
        if self._rend > self._rpos:  # the peer may not send before our ACK
            raise nbd.NbdProtocolError("data received ahead of the TLS handshake")
        tls = trio.SSLStream(trio.SocketStream(self.sock), ctx, server_side=server_side,
                             server_hostname=hostname)
        await tls.do_handshake()
        self.tls = tls

    async def _turn(self) -> None:
        """A cancellation point that yields once every :data:`_YIELD_EVERY` calls."""
        self._calls += 1
        if self._calls >= _YIELD_EVERY:
            self._calls = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()

    async def _receive(self, view: memoryview) -> int:
        """One receive into ``view``: at least one byte, or EOFError."""
        if self.tls is None:
            await self._turn()
            while True:
                try:
                    n = self._raw.recv_into(view)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self._raw)
        else:  # receive_some never returns more than asked: nothing is left over
            chunk = await self.tls.receive_some(min(len(view), _TLS_PIECE))
            n = len(chunk)
            view[:n] = chunk
        if n == 0:
            raise EOFError("connection closed by the peer")
        return n

    async def recv_into(self, view: memoryview) -> None:
        """Fill ``view``; EOFError if the peer closes first.  Small reads are served
        from a receive-ahead buffer; large ones land in ``view`` directly."""
        want = len(view)
        got = min(self._rend - self._rpos, want)
        if got:
            view[:got] = self._rbuf[self._rpos:self._rpos + got]
            self._rpos += got
        while got < want:
            if want - got >= _RECV_AHEAD:
                got += await self._receive(view[got:])
                continue
            self._rend = await self._receive(self._rbuf)
            take = min(self._rend, want - got)
            view[got:got + take] = self._rbuf[:take]
            self._rpos = take
            got += take

    async def recv_exactly(self, n: int) -> bytearray:
        buf = bytearray(n)
        await self.recv_into(memoryview(buf))
        return buf

    async def send_all(self, *parts: bytes | bytearray | memoryview) -> None:
        tls = self.tls
        if tls is not None:
            for part in parts:
                view = memoryview(part).cast("B")
                for pos in range(0, len(view), _TLS_PIECE):
                    await tls.send_all(view[pos:pos + _TLS_PIECE])
            return
        await self._turn()
        views = [memoryview(p).cast("B") for p in parts]  # one sendmsg: one wake-up
        while views:
            try:
                n = self._raw.sendmsg(views)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self._raw)
                continue
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]

    def close(self) -> None:
        """Close the connection (both descriptors); a task waiting on it is woken."""
        if self._raw.fileno() >= 0:
            trio.lowlevel.notify_closing(self._raw)
            self._raw.close()
        self.sock.close()


async def open_wire(addr: NbdAddress) -> Wire:
    """A plain connection to ``addr`` (TLS starts in :func:`handshake`)."""
    if addr.path:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.connect(addr.path)
        except BaseException:
            sock.close()
            raise
        return Wire(sock)
    stream = await trio.open_tcp_stream(addr.host, addr.port)
    sock = stream.socket
    sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
    return Wire(sock)


# -- the client handshake --------------------------------------------------------------


async def _option_reply(wire: Wire, option: int) -> tuple[int, bytearray]:
    head = await wire.recv_exactly(nbd.OPTION_REPLY_HEADER_SIZE)
    opt, reply, length = nbd.decode_option_reply_header(head)
    if opt != option or length > nbd.MAX_OPTION_DATA:
        raise nbd.NbdProtocolError(f"unexpected option reply ({opt}, {reply}, {length} bytes)")
    return reply, await wire.recv_exactly(length)


async def _start_tls(wire: Wire, addr: NbdAddress) -> None:
    await wire.send_all(nbd.encode_option(nbd.Opt.STARTTLS))
    reply, data = await _option_reply(wire, nbd.Opt.STARTTLS)
    if reply != nbd.Rep.ACK:
        text = bytes(data).decode(errors="replace")
        raise DmIOError(f"the server refused TLS (reply {reply:#x}{': ' if text else ''}{text})")
    try:
        ctx = await trio.to_thread.run_sync(client_tls_context, addr)
    except (OSError, ssl.SSLError) as exc:
        raise DmIOError(f"TLS settings: {exc}") from None
    try:
        await wire.start_tls(ctx, server_side=False,
                             hostname=(addr.tls_hostname or addr.host or None)
                             if ctx.check_hostname else None)
    except trio.BrokenResourceError as exc:
        raise DmIOError(f"TLS handshake failed: {exc.__cause__ or exc}") from None


async def handshake(wire: Wire, addr: NbdAddress) -> tuple[int, int, int]:
    """Negotiate ``addr`` (TLS first for ``nbds``): (size in bytes, transmission flags,
    maximum payload)."""
    export = addr.export
    flags = nbd.decode_greeting(await wire.recv_exactly(nbd.GREETING_SIZE))
    if not flags & nbd.HandshakeFlag.FIXED_NEWSTYLE:
        raise nbd.NbdProtocolError("the server does not speak fixed newstyle")
    no_zeroes = bool(flags & nbd.HandshakeFlag.NO_ZEROES)
    cflags = nbd.ClientFlag.FIXED_NEWSTYLE | (nbd.ClientFlag.NO_ZEROES if no_zeroes else 0)
    await wire.send_all(nbd.encode_client_flags(cflags))
    if addr.tls:
        await _start_tls(wire, addr)
    await wire.send_all(nbd.encode_option(
        nbd.Opt.GO, nbd.encode_info_request(export, (nbd.Info.BLOCK_SIZE,))))
    size = tflags = -1
    max_payload = nbd.MAX_PAYLOAD
    while True:
        reply, data = await _option_reply(wire, nbd.Opt.GO)
        if reply == nbd.Rep.INFO:
            kind, values = nbd.decode_info(data)
            if kind == nbd.Info.EXPORT:
                size, tflags = values
            elif kind == nbd.Info.BLOCK_SIZE:
                max_payload = min(max_payload, values[2])
        elif reply == nbd.Rep.ACK:
            if size < 0:
                raise nbd.NbdProtocolError("NBD_OPT_GO ended without NBD_INFO_EXPORT")
            return size, tflags, max_payload
        elif reply == nbd.Rep.ERR_UNSUP:
            break  # an old server: NBD_OPT_EXPORT_NAME
        elif reply in (nbd.Rep.ERR_UNKNOWN, nbd.Rep.ERR_POLICY):
            raise NoSuchDeviceError(f"the server has no export {export!r}"
                                    + (f": {bytes(data).decode(errors='replace')}" if data else ""))
        elif reply == nbd.Rep.ERR_TLS_REQD:
            raise DmIOError("the server requires TLS: use an nbds:// URI")
        else:
            text = bytes(data).decode(errors="replace")
            raise DmIOError(f"the server refused export {export!r} (reply {reply:#x}: {text})")
    await wire.send_all(nbd.encode_option(nbd.Opt.EXPORT_NAME, export.encode()))
    head = await wire.recv_exactly(nbd.EXPORT_NAME_REPLY_SIZE
                                   + (0 if no_zeroes else nbd.EXPORT_NAME_PADDING))
    size, tflags = nbd.decode_export_name_reply(head)
    return size, tflags, max_payload
