"""A remote NBD export as a :class:`BlockDevice` (the kernel's nbd client, in process).

A table word ``nbd[s]://HOST[:PORT]/EXPORT`` or ``nbd[s]+unix:///EXPORT?socket=PATH``
(the NBD URI syntax, ``nbd_wire.py``) resolves to an :class:`NbdDevice`: one
connection, made and negotiated (fixed newstyle, TLS first for ``nbds``,
``NBD_OPT_GO``, falling back to ``NBD_OPT_EXPORT_NAME``) while the table is built.

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
  a mirror marks the leg failed.  So does a server that keeps the connection
  open but leaves a request unanswered for ``timeout`` seconds (the daemon's
  ``nbd_timeout``): the connection is then closed, as the kernel's nbd driver
  does.  There is no reconnection: a reload builds a new table, which connects
  again.  A failed READ leaves its buffer zeroed.
* **Cancellation.** A bio cancelled while waiting for its reply leaves the
  request to complete on the server; its reply is read and dropped (a READ's
  data never lands in the caller's buffer after it gave up).
* **Memory.** A request's data is the caller's buffer (the bio's), sent from
  and received into directly: what a slow server makes the device hold is the
  bios waiting for it, which their submitters bound.  Of its own it holds
  ``_Pending`` records, a 64 KiB receive buffer, and pieces of at most
  :data:`_PIECE` (the zeros of a WRITE_ZEROES sent as writes, a dropped reply).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
from dataclasses import dataclass, field

import trio

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError, NoSuchDeviceError, NotSupportedError
from dmuser.core.nbd_wire import NbdAddress, Wire, handshake, open_wire
from dmuser.core.units import SECTOR_SHIFT
from dmuser.formats import nbd

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15.0
#: the largest TRIM / WRITE_ZEROES request sent (the length field is 32 bits)
_MAX_RANGE = 1 << 30
#: the largest piece the device allocates itself (see the module docstring)
_PIECE = 1 << 20
#: what a dead or unparseable connection raises while reading replies
_LOST = (OSError, EOFError, nbd.NbdProtocolError, trio.ClosedResourceError,
         trio.BrokenResourceError)


# -- the device ------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Pending:
    """One request waiting for its reply."""

    length: int
    buf: memoryview | None          # where a READ's data goes; None once the caller left
    sent: float                     # trio.current_time() when it was queued
    done: trio.Event = field(default_factory=trio.Event)
    error: DmIOError | None = None


class NbdDevice(BlockDevice):
    """One connection to one NBD export.  Make it with :meth:`connect`; close it with
    :meth:`close` once nothing submits to it any more."""

    def __init__(self, addr: NbdAddress, wire: Wire, size: int, flags: int,
                 max_payload: int, timeout: float = 0) -> None:
        self.addr = addr
        self.status_name = str(addr)
        self.flags = nbd.TransmissionFlag(flags)
        self.size = size
        self.max_payload = max(1 << SECTOR_SHIFT, min(max_payload, nbd.MAX_PAYLOAD)
                               >> SECTOR_SHIFT << SECTOR_SHIFT)
        self._wire = wire
        #: seconds a request may wait for its reply (0: forever)
        self.timeout = timeout
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
    async def connect(cls, addr: NbdAddress, nursery: trio.Nursery,
                      timeout: float = 0) -> NbdDevice:
        """Connect, negotiate, and start the reply reader in ``nursery``; ``timeout``
        bounds each request's wait for its reply (and the connection, else
        :data:`CONNECT_TIMEOUT`).

        Raises NoSuchDeviceError when the server cannot be reached or refuses."""
        wire: Wire | None = None
        try:
            with trio.fail_after(timeout or CONNECT_TIMEOUT):
                wire = await open_wire(addr)
                size, flags, max_payload = await handshake(wire, addr)
        except NoSuchDeviceError as exc:
            if wire is not None:
                wire.close()
            raise NoSuchDeviceError(f"{addr}: {exc}") from None
        except (*_LOST, trio.TooSlowError, DmIOError) as exc:
            if wire is not None:
                wire.close()
            text = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
            raise NoSuchDeviceError(f"{addr}: cannot connect: {text}") from None
        dev = cls(addr, wire, size, flags, max_payload, timeout)
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
                async with trio.open_nursery() as nursery:
                    if self.timeout:
                        nursery.start_soon(self._watchdog)
                    await self._read_replies()
                    nursery.cancel_scope.cancel()
        finally:
            healthy = self._dead is None
            self._fail_all("device closed" if healthy else self._dead or "")
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
                if healthy:
                    with contextlib.suppress(OSError, trio.ClosedResourceError,
                                             trio.BrokenResourceError, trio.BusyResourceError):
                        await self._wire.send_all(nbd.encode_request(
                            nbd.Request(nbd.Cmd.DISC, 0, 0, 0)))
            self._wire.close()

    async def _watchdog(self) -> None:
        """Declare the connection dead when the oldest request has waited ``timeout``
        seconds (checked every quarter of it: within 1.25 x ``timeout``)."""
        while True:
            await trio.sleep(self.timeout / 4)
            oldest = next(iter(self._pending.values()), None)
            if oldest is not None and trio.current_time() - oldest.sent >= self.timeout:
                self._fail_all(f"{self.status_name}: no reply within {self.timeout:g} s")
                assert self._scope is not None
                self._scope.cancel()  # the reader closes the connection
                return

    async def _read_replies(self) -> None:
        head = bytearray(nbd.SIMPLE_REPLY_SIZE)
        try:
            while True:
                await self._wire.recv_into(memoryview(head))
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
                        await self._wire.recv_into(p.buf)
                    else:  # the caller left: drop the data, a piece at a time
                        scrap = memoryview(bytearray(min(p.length, _PIECE)))
                        for pos in range(0, p.length, len(scrap)):
                            await self._wire.recv_into(scrap[:min(len(scrap), p.length - pos)])
                p.done.set()
        except _LOST as exc:
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
        p = _Pending(len(buf) if buf is not None else 0, buf, trio.current_time())
        self._pending[handle] = p
        header = nbd.encode_request(nbd.Request(cmd, handle, offset, length, flags))
        try:
            with trio.CancelScope(shield=True):  # never half a request on the wire
                async with self._send_lock:
                    if self._dead is None:
                        await self._wire.send_all(header, *(() if payload is None
                                                             else (payload,)))
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
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
                zeros = _zeros()[:min(step, length)]
                for pos in range(0, length, len(zeros)):
                    n = min(len(zeros), length - pos)
                    await self._request(nbd.Cmd.WRITE, offset + pos, n, cmd_flags,
                                        payload=zeros[:n])
        else:
            raise NotSupportedError(f"{self.status_name}: operation {op.name} not supported")
        if fua and not cmd_flags:
            await self._flush()


@functools.cache
def _zeros() -> memoryview:
    """:data:`_PIECE` zero bytes, shared by every device (never written to)."""
    return memoryview(bytes(_PIECE))
