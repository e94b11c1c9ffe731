"""A remote NBD export as a :class:`BlockDevice` (the kernel's nbd client, in process).

A table word ``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``
(the NBD URI syntax) resolves to an :class:`NbdDevice`: one connection, made
and negotiated (fixed newstyle, ``NBD_OPT_GO``, falling back to
``NBD_OPT_EXPORT_NAME``) while the table is built.

Guarantees:

* **Pipelining.** Every bio is one or more requests sent at once, each with its
  own handle; one reader task matches replies to handles, in any order.
  Requests are written whole (the send is shielded from cancellation), so the
  stream never carries half a request.
* **Flush and FUA.** PREFLUSH sends ``NBD_CMD_FLUSH`` and waits for it before the
  data; FUA sets ``NBD_CMD_FLAG_FUA``.  A server that does not offer flush or
  FUA says its writes are durable when acknowledged; then they are skipped.
* **Failure.** A reply error fails the bio with DmIOError (that errno); a server
  that goes away, or sends something that is not a valid reply (bad magic, an
  unknown handle), fails every bio in flight and every later one with EIO, so
  a mirror marks the leg failed.  There is no reconnection: a reload builds a
  new table, which connects again.  A failed READ leaves its buffer zeroed.
* **Cancellation.** A bio cancelled while waiting for its reply leaves the
  request to complete on the server; its reply is read and dropped (a READ's
  data never lands in the caller's buffer after it gave up).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import urllib.parse
from dataclasses import dataclass, field

import trio

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError, NoSuchDeviceError, NotSupportedError
from dmuser.core.units import SECTOR_SHIFT
from dmuser.formats import nbd

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0
#: the largest TRIM / WRITE_ZEROES request sent (the length field is 32 bits)
_MAX_RANGE = 1 << 30


def is_nbd_uri(word: str) -> bool:
    return word.startswith(("nbd://", "nbd+unix://"))


@dataclass(frozen=True, slots=True)
class NbdAddress:
    """Where an export is: a TCP ``host``/``port``, or a Unix socket ``path``."""

    export: str
    host: str = ""
    port: int = nbd.DEFAULT_PORT
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return f"nbd+unix:///{self.export}?socket={self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.export}"


def parse_uri(word: str, cwd: str = "/") -> NbdAddress:
    """``nbd://host[:port]/export`` or ``nbd+unix:///export?socket=PATH`` (relative PATHs
    are taken from ``cwd``).  Raises NoSuchDeviceError (ENXIO) for anything else."""
    url = urllib.parse.urlsplit(word)
    export = urllib.parse.unquote(url.path[1:] if url.path.startswith("/") else url.path)
    try:
        if url.scheme == "nbd":
            if not url.hostname:
                raise ValueError("no host")
            return NbdAddress(export, url.hostname, url.port or nbd.DEFAULT_PORT)
        if url.scheme == "nbd+unix":
            sockets = urllib.parse.parse_qs(url.query).get("socket", [])
            if url.netloc or len(sockets) != 1:
                raise ValueError("needs exactly one socket=PATH and no host")
            return NbdAddress(export, path=os.path.join(cwd, sockets[0]))
    except ValueError as exc:
        raise NoSuchDeviceError(f"{word}: not a valid NBD URI ({exc})") from None
    raise NoSuchDeviceError(f"{word}: not an NBD URI (nbd:// or nbd+unix://)")


# -- socket helpers (shared with the server) -------------------------------------------


async def recv_exactly_into(sock: trio.socket.SocketType, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; EOFError if the peer closes first."""
    got = 0
    while got < len(view):
        n = await sock.recv_into(view[got:])
        if n == 0:
            raise EOFError("connection closed by the peer")
        got += n


async def recv_exactly(sock: trio.socket.SocketType, n: int) -> bytearray:
    buf = bytearray(n)
    await recv_exactly_into(sock, memoryview(buf))
    return buf


async def send_all(sock: trio.socket.SocketType, *parts: bytes | bytearray | memoryview) -> None:
    for part in parts:
        view = memoryview(part).cast("B")
        while view:
            n = await sock.send(view)
            view = view[n:]


async def open_socket(addr: NbdAddress) -> trio.socket.SocketType:
    if addr.path:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.connect(addr.path)
        except BaseException:
            sock.close()
            raise
        return sock
    stream = await trio.open_tcp_stream(addr.host, addr.port)
    sock = stream.socket
    sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
    return sock


# -- the client handshake --------------------------------------------------------------


async def _option_reply(sock: trio.socket.SocketType, option: int) -> tuple[int, bytearray]:
    head = await recv_exactly(sock, nbd.OPTION_REPLY_HEADER_SIZE)
    opt, reply, length = nbd.decode_option_reply_header(head)
    if opt != option or length > nbd.MAX_OPTION_DATA:
        raise nbd.NbdProtocolError(f"unexpected option reply ({opt}, {reply}, {length} bytes)")
    return reply, await recv_exactly(sock, length)


async def handshake(sock: trio.socket.SocketType, export: str) -> tuple[int, int, int]:
    """Negotiate ``export``: (size in bytes, transmission flags, maximum payload)."""
    flags = nbd.decode_greeting(await recv_exactly(sock, nbd.GREETING_SIZE))
    if not flags & nbd.HandshakeFlag.FIXED_NEWSTYLE:
        raise nbd.NbdProtocolError("the server does not speak fixed newstyle")
    no_zeroes = bool(flags & nbd.HandshakeFlag.NO_ZEROES)
    cflags = nbd.ClientFlag.FIXED_NEWSTYLE | (nbd.ClientFlag.NO_ZEROES if no_zeroes else 0)
    await send_all(sock, nbd.encode_client_flags(cflags))
    await send_all(sock, nbd.encode_option(
        nbd.Opt.GO, nbd.encode_info_request(export, (nbd.Info.BLOCK_SIZE,))))
    size = tflags = -1
    max_payload = nbd.MAX_PAYLOAD
    while True:
        reply, data = await _option_reply(sock, nbd.Opt.GO)
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
        else:
            text = bytes(data).decode(errors="replace")
            raise DmIOError(f"the server refused export {export!r} (reply {reply:#x}: {text})")
    await send_all(sock, nbd.encode_option(nbd.Opt.EXPORT_NAME, export.encode()))
    head = await recv_exactly(sock, nbd.EXPORT_NAME_REPLY_SIZE
                              + (0 if no_zeroes else nbd.EXPORT_NAME_PADDING))
    size, tflags = nbd.decode_export_name_reply(head)
    return size, tflags, max_payload


# -- the device ------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Pending:
    """One request waiting for its reply."""

    length: int
    buf: memoryview | None          # where a READ's data goes; None once the caller left
    done: trio.Event = field(default_factory=trio.Event)
    error: DmIOError | None = None


class NbdDevice(BlockDevice):
    """One connection to one NBD export.  Make it with :meth:`connect`; close it with
    :meth:`close` once nothing submits to it any more."""

    def __init__(self, addr: NbdAddress, sock: trio.socket.SocketType, size: int,
                 flags: int, max_payload: int) -> None:
        self.addr = addr
        self.status_name = str(addr)
        self.flags = nbd.TransmissionFlag(flags)
        self.size = size
        self.max_payload = max(1 << SECTOR_SHIFT, min(max_payload, nbd.MAX_PAYLOAD)
                               >> SECTOR_SHIFT << SECTOR_SHIFT)
        self._sock = sock
        self._pending: dict[int, _Pending] = {}
        self._next_handle = 1
        self._send_lock = trio.Lock()
        #: why the connection is unusable (None while it works)
        self._dead: str | None = None
        self._closed = False
        self._scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"NbdDevice({self.status_name!r})"

    @classmethod
    async def connect(cls, addr: NbdAddress, nursery: trio.Nursery) -> NbdDevice:
        """Connect, negotiate, and start the reply reader in ``nursery``.

        Raises NoSuchDeviceError when the server cannot be reached or refuses."""
        sock: trio.socket.SocketType | None = None
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                sock = await open_socket(addr)
                size, flags, max_payload = await handshake(sock, addr.export)
        except NoSuchDeviceError as exc:
            if sock is not None:
                sock.close()
            raise NoSuchDeviceError(f"{addr}: {exc}") from None
        except (OSError, EOFError, nbd.NbdProtocolError, trio.TooSlowError, DmIOError) as exc:
            if sock is not None:
                sock.close()
            text = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
            raise NoSuchDeviceError(f"{addr}: cannot connect: {text}") from None
        dev = cls(addr, sock, size, flags, max_payload)
        nursery.start_soon(dev.reader)
        return dev

    @property
    def nr_sectors(self) -> int:
        return self.size >> SECTOR_SHIFT

    @property
    def read_only(self) -> bool:
        return bool(self.flags & nbd.TransmissionFlag.READ_ONLY)

    def close(self) -> None:
        """Stop the reader; it fails what is in flight, says NBD_CMD_DISC and closes."""
        self._closed = True
        if self._scope is not None:
            self._scope.cancel()

    # -- the reader ----------------------------------------------------------------

    async def reader(self) -> None:
        """Match replies to requests until the connection fails or :meth:`close`."""
        try:
            with trio.CancelScope() as self._scope:
                if self._closed:
                    self._scope.cancel()
                await self._read_replies()
        finally:
            healthy = self._dead is None
            self._fail_all("device closed" if healthy else self._dead or "")
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
                if healthy:
                    with contextlib.suppress(OSError, trio.ClosedResourceError,
                                             trio.BusyResourceError):
                        await send_all(self._sock, nbd.encode_request(
                            nbd.Request(nbd.Cmd.DISC, 0, 0, 0)))
            self._sock.close()

    async def _read_replies(self) -> None:
        head = bytearray(nbd.SIMPLE_REPLY_SIZE)
        try:
            while True:
                await recv_exactly_into(self._sock, memoryview(head))
                handle, error = nbd.decode_simple_reply(head)
                p = self._pending.pop(handle, None)
                if p is None:
                    raise nbd.NbdProtocolError(f"a reply for handle {handle}, never sent")
                if error:
                    text = os.strerror(error) if 0 < error < 256 else f"error {error}"
                    p.error = DmIOError(f"{self.status_name}: the server replied: {text}",
                                        error if error in nbd.Err._value2member_map_
                                        else errno.EIO)
                elif p.length:
                    if p.buf is not None:
                        await recv_exactly_into(self._sock, p.buf)
                    else:
                        await recv_exactly(self._sock, p.length)  # the caller left: drop
                p.done.set()
        except (OSError, EOFError, nbd.NbdProtocolError, trio.ClosedResourceError) as exc:
            self._fail_all(f"{self.status_name}: connection lost: {exc or type(exc).__name__}")

    def _fail_all(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
            if not self._closed:
                log.warning("%s", reason)
        pending, self._pending = self._pending, {}
        for p in pending.values():
            p.error = DmIOError(reason, errno.EIO)
            p.done.set()

    # -- requests ------------------------------------------------------------------

    async def _request(self, cmd: int, offset: int, length: int, flags: int = 0,
                       payload: memoryview | None = None, buf: memoryview | None = None) -> None:
        """Send one request and wait for its reply (see the module docstring)."""
        if self._dead is not None:
            raise DmIOError(self._dead, errno.EIO)
        handle = self._next_handle
        self._next_handle += 1
        p = _Pending(len(buf) if buf is not None else 0, buf)
        self._pending[handle] = p
        header = nbd.encode_request(nbd.Request(cmd, handle, offset, length, flags))
        try:
            with trio.CancelScope(shield=True):  # never half a request on the wire
                async with self._send_lock:
                    if self._dead is None:
                        await send_all(self._sock, header, *(() if payload is None
                                                             else (payload,)))
        except (OSError, trio.ClosedResourceError) as exc:
            self._fail_all(f"{self.status_name}: connection lost: {exc}")
        try:
            await p.done.wait()
        finally:
            if not p.done.is_set():
                p.buf = None  # cancelled: the reply's data goes nowhere
        if p.error is not None:
            raise p.error

    async def submit(self, bio: Bio) -> None:
        try:
            await self._submit(bio)
        except DmIOError:
            if bio.op is Op.READ and bio.data is not None:
                bio.data[:] = bytes(len(bio.data))
            raise

    async def _flush(self) -> None:
        if self.flags & nbd.TransmissionFlag.SEND_FLUSH:
            await self._request(nbd.Cmd.FLUSH, 0, 0)

    def _check_writable(self) -> None:
        if self.read_only:
            raise DmIOError(f"{self.status_name}: the export is read-only", errno.EPERM)

    async def _submit(self, bio: Bio) -> None:
        flags = bio.flags
        if flags and flags & ReqFlag.PREFLUSH:
            await self._flush()
        op = bio.op
        offset = bio.sector << SECTOR_SHIFT
        length = bio.nr_sectors << SECTOR_SHIFT
        fua = bool(flags and flags & ReqFlag.FUA) and length > 0
        cmd_flags = nbd.CmdFlag.FUA if fua and self.flags & nbd.TransmissionFlag.SEND_FUA else 0
        step = self.max_payload
        if op is Op.READ:
            assert bio.data is not None
            for pos in range(0, length, step):
                n = min(step, length - pos)
                await self._request(nbd.Cmd.READ, offset + pos, n, buf=bio.data[pos:pos + n])
            return
        if op is Op.FLUSH or length == 0:
            if op is Op.FLUSH:
                await self._flush()
            return
        self._check_writable()
        if op is Op.WRITE:
            assert bio.data is not None
            for pos in range(0, length, step):
                n = min(step, length - pos)
                await self._request(nbd.Cmd.WRITE, offset + pos, n, cmd_flags,
                                    payload=bio.data[pos:pos + n])
        elif op is Op.DISCARD:
            if not self.flags & nbd.TransmissionFlag.SEND_TRIM:
                raise NotSupportedError(f"{self.status_name}: the server does not offer trim")
            for pos in range(0, length, _MAX_RANGE):
                await self._request(nbd.Cmd.TRIM, offset + pos,
                                    min(_MAX_RANGE, length - pos), cmd_flags)
        elif op is Op.WRITE_ZEROES:
            if self.flags & nbd.TransmissionFlag.SEND_WRITE_ZEROES:
                for pos in range(0, length, _MAX_RANGE):
                    await self._request(nbd.Cmd.WRITE_ZEROES, offset + pos,
                                        min(_MAX_RANGE, length - pos), cmd_flags)
            else:
                zeros = memoryview(bytes(min(step, length)))
                for pos in range(0, length, len(zeros)):
                    n = min(len(zeros), length - pos)
                    await self._request(nbd.Cmd.WRITE, offset + pos, n, cmd_flags,
                                        payload=zeros[:n])
        else:
            raise NotSupportedError(f"{self.status_name}: operation {op.name} not supported")
        if fua and not cmd_flags:
            await self._flush()
