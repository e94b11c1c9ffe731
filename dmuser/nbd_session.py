"""One NBD connection on the server side: the option haggling, then transmission.

The guarantees are those of ``nbd_server.py`` (where the listeners are): every
request is a bio submitted to :meth:`MappedDevice.submit`, in a task of its
own, at most :data:`MAX_IN_FLIGHT` per connection, except plain aligned reads
and writes that the device's direct path (the FUSE file's) completes at once,
answered by the reading loop itself (:func:`_direct`); replies go out whole,
one at a time, in the order the requests complete.  Memory: a request's payload
is charged, in pages, to the daemon's NBD page pool (:data:`BUDGET_PAGES`, a
dm-io :class:`~dmuser.services.dm_io_mem.PagePool`: waiters served in arrival
order) and to the connection's share of it (:data:`CONN_SHARE`) before it is
read or allocated,
and returned once its reply is sent; while either is used up the connection
reads no further request (TCP holds the client back).  Stopping a connection
(:meth:`Conn.stop`) stops reading requests; those in flight finish and are
answered before the transmission returns.

TLS: on a listener with a TLS context, ``NBD_OPT_STARTTLS`` is the only way
forward.  Before it, every option but ``ABORT`` is answered
``NBD_REP_ERR_TLS_REQD`` and ``NBD_OPT_EXPORT_NAME`` (which has no error reply)
hangs up, so no export name, size or byte crosses in clear text.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from dmuser.byte_io import range_lock, read_bytes, write_bytes
from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.errors import DmError, DmIOError, NotSupportedError
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.nbd_wire import Wire
from dmuser.core.units import PAGE_SIZE, SECTOR_SHIFT, SECTOR_SIZE
from dmuser.formats import nbd
from dmuser.services.dm_io_mem import PagePool

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64
#: the payload pages every NBD connection of the daemon may hold at once (64 MiB)
BUDGET_PAGES = (64 << 20) // PAGE_SIZE
#: one connection holds at most 1/CONN_SHARE of the daemon's budget: a client that
#: stops reading its replies (whose data waits to be sent) ties up only that much
CONN_SHARE = 4
#: the zeros of a WRITE_ZEROES written as data (``_write``), one piece at a time
_ZERO_CHUNK = 1 << 20
_TF = nbd.TransmissionFlag
#: flush is global (every backing file) and every connection goes through one
#: MappedDevice, so what one connection flushed is flushed for all: multi-conn is safe
_FLAGS = (_TF.HAS_FLAGS | _TF.SEND_FLUSH | _TF.SEND_FUA | _TF.SEND_TRIM
          | _TF.SEND_WRITE_ZEROES | _TF.CAN_MULTI_CONN)
_WRITES = (nbd.Cmd.WRITE, nbd.Cmd.TRIM, nbd.Cmd.WRITE_ZEROES)
_CLIENT_FLAGS = nbd.ClientFlag.FIXED_NEWSTYLE | nbd.ClientFlag.NO_ZEROES
#: how a client that went away or spoke nonsense shows up
GONE = (OSError, EOFError, nbd.NbdProtocolError, trio.BrokenResourceError,
        trio.ClosedResourceError)


@dataclass(eq=False)
class Export:
    device: str
    name: str
    read_only: bool


@dataclass(eq=False)
class Conn:
    export: Export | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stopping: bool = False
    finished: trio.Event = field(default_factory=trio.Event)
    #: the client negotiated NBD_OPT_STRUCTURED_REPLY
    structured: bool = False
    #: the reading loop is sending a reply itself: a stop waits for it to end
    answering: bool = False

    def stop(self) -> None:
        """Stop reading requests; a reply being sent is finished first."""
        self.stopping = True
        if not self.answering:
            self.scope.cancel()


Found = tuple[Export, MappedDevice]


async def handshake(wire: Wire, lookup: Callable[[str], Found | None],
                    names: Callable[[], list[str]], conn: Conn,
                    tls: ssl.SSLContext | None = None) -> Found | None:
    """Fixed newstyle option haggling: the export chosen (``lookup`` of the name the
    client asked for), or None to hang up.  ``names`` is what NBD_OPT_LIST shows;
    ``conn.structured`` records NBD_OPT_STRUCTURED_REPLY.  With ``tls``, TLS is
    required (see the module docstring); a failed TLS handshake raises one of
    :data:`GONE`."""
    await wire.send_all(nbd.encode_greeting(nbd.HandshakeFlag.FIXED_NEWSTYLE
                                             | nbd.HandshakeFlag.NO_ZEROES))
    cflags = nbd.decode_client_flags(await wire.recv_exactly(nbd.CLIENT_FLAGS_SIZE))
    if not cflags & nbd.ClientFlag.FIXED_NEWSTYLE or cflags & ~_CLIENT_FLAGS:
        return None  # the protocol: drop a client setting flags we did not offer
    no_zeroes = bool(cflags & nbd.ClientFlag.NO_ZEROES)
    while True:
        opt, length = nbd.decode_option_header(
            await wire.recv_exactly(nbd.OPTION_HEADER_SIZE))
        if length > nbd.MAX_OPTION_DATA:
            raise nbd.NbdProtocolError(f"option {opt} with {length} bytes of data")
        data = await wire.recv_exactly(length)

        async def reply(kind: int, payload: bytes = b"", opt: int = opt) -> None:
            await wire.send_all(nbd.encode_option_reply(opt, kind, payload))

        if opt == nbd.Opt.STARTTLS:
            if tls is None:
                await reply(nbd.Rep.ERR_UNSUP, b"this export has no TLS")
            elif wire.tls is not None or length:
                await reply(nbd.Rep.ERR_INVALID, b"TLS is already on" if length == 0
                            else b"NBD_OPT_STARTTLS takes no data")
            else:
                await reply(nbd.Rep.ACK)
                await wire.start_tls(tls, server_side=True)
            continue
        if tls is not None and wire.tls is None and opt != nbd.Opt.ABORT:
            if opt == nbd.Opt.EXPORT_NAME:
                return None  # no error reply exists for it: hang up
            await reply(nbd.Rep.ERR_TLS_REQD, b"this server requires TLS (NBD_OPT_STARTTLS)")
            continue
        if opt == nbd.Opt.EXPORT_NAME:
            found = lookup(data.decode(errors="replace"))
            if found is not None:
                await wire.send_all(nbd.encode_export_name_reply(
                    found[1].nr_sectors << SECTOR_SHIFT, _flags(found[0]), no_zeroes))
            return found  # an unknown name: the protocol says hang up
        if opt in (nbd.Opt.GO, nbd.Opt.INFO):
            try:
                name, _ = nbd.decode_info_request(data)
            except nbd.NbdProtocolError as exc:
                await reply(nbd.Rep.ERR_INVALID, str(exc).encode())
                continue
            found = lookup(name)
            if found is None:
                await reply(nbd.Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
                continue
            await reply(nbd.Rep.INFO, nbd.encode_info_export(
                found[1].nr_sectors << SECTOR_SHIFT, _flags(found[0])))
            # sent whether asked for or not (the protocol allows it); unaligned
            # requests still work (read-modify-write), just slower
            await reply(nbd.Rep.INFO, nbd.encode_info_block_size(
                SECTOR_SIZE, 4096, nbd.MAX_PAYLOAD))
            await reply(nbd.Rep.ACK)
            if opt == nbd.Opt.GO:
                return found
        elif opt == nbd.Opt.ABORT:
            with contextlib.suppress(OSError, trio.BrokenResourceError):
                await reply(nbd.Rep.ACK)
            return None
        elif opt == nbd.Opt.LIST:
            if length:
                await reply(nbd.Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
                continue
            for exp_name in names():
                await reply(nbd.Rep.SERVER, nbd.encode_server_entry(exp_name))
            await reply(nbd.Rep.ACK)
        elif opt == nbd.Opt.STRUCTURED_REPLY:
            if length:
                await reply(nbd.Rep.ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
                continue
            conn.structured = True
            await reply(nbd.Rep.ACK)
        else:
            await reply(nbd.Rep.ERR_UNSUP, f"option {opt} is not supported".encode())


def _reply(conn: Conn, req: nbd.Request, error: int, data: bytes | bytearray | memoryview | None,
           ) -> tuple[bytes | memoryview | bytearray, ...]:
    """The bytes answering ``req``: a simple reply, or one structured chunk (DONE):
    OFFSET_DATA for a READ's data, ERROR for an error, NONE otherwise."""
    if not conn.structured:
        head = nbd.encode_simple_reply(req.handle, error)
        return (head, data) if data is not None and not error else (head,)
    if error:
        name = nbd.Err(error).name if error in nbd.Err._value2member_map_ else ""
        return (nbd.encode_error_chunk(req.handle, error, name),)
    if data is not None and len(data):
        return nbd.encode_data_chunk_header(req.handle, req.offset, len(data)), data
    return (nbd.encode_chunk_header(req.handle, nbd.ReplyType.NONE, 0),)


def _cost(req: nbd.Request) -> int:
    """The bytes ``req`` allocates while it runs: a READ's or WRITE's data, the zeros
    of a WRITE_ZEROES written as data (``_write``); 0 for a request refused anyway."""
    n = req.length
    if req.type in (nbd.Cmd.READ, nbd.Cmd.WRITE):
        return n if n <= nbd.MAX_PAYLOAD else 0
    if req.type == nbd.Cmd.WRITE_ZEROES:
        return min(n, nbd.MAX_PAYLOAD if (req.offset | n) & (SECTOR_SIZE - 1) else _ZERO_CHUNK)
    return 0


def _charge(pool: PagePool, nbytes: int) -> int:
    """The pages a payload of ``nbytes`` takes from ``pool``: at most the whole pool,
    so a larger request runs alone instead of never."""
    return min(-(-nbytes // PAGE_SIZE), pool.statistics().nr_pages)


async def _take(pool: PagePool, n: int) -> None:
    """``pool.acquire(n)``, without a trip through the scheduler when it fits now."""
    if n and not pool.try_acquire(n):
        await pool.acquire(n)


async def transmission(wire: Wire, md: MappedDevice, conn: Conn, budget: PagePool) -> None:
    """Read requests until DISC, EOF or :meth:`Conn.stop`; answer each in a task.
    ``budget`` is the daemon's, shared by all its connections (module docstring)."""
    assert conn.export is not None
    exp = conn.export
    slots = trio.Semaphore(MAX_IN_FLIGHT)
    send_lock = trio.Lock()
    share = PagePool(budget.statistics().nr_pages // CONN_SHARE)

    async def charge(nbytes: int) -> tuple[int, int]:
        mine, all_ = _charge(share, nbytes), _charge(budget, nbytes)
        await _take(share, mine)
        try:
            await _take(budget, all_)
        except BaseException:
            share.release(mine)
            raise
        return mine, all_

    def refund(held: tuple[int, int]) -> None:
        share.release(held[0])
        budget.release(held[1])

    async def one(req: nbd.Request, payload: bytearray | None, held: tuple[int, int]) -> None:
        try:
            try:
                error, data = await execute(md, exp, req, payload)
            except Exception:
                log.exception("NBD request %s on %s", req, md.name)
                error, data = nbd.Err.EIO, None
            async with send_lock:
                await wire.send_all(*_reply(conn, req, error, data))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            conn.stop()  # the client went away (or another task closed the wire)
        finally:
            slots.release()
            refund(held)

    async with trio.open_nursery() as requests:
        with conn.scope:
            try:
                while True:
                    req = nbd.decode_request(await wire.recv_exactly(nbd.REQUEST_SIZE))
                    if req.type == nbd.Cmd.DISC:
                        break
                    if req.type == nbd.Cmd.WRITE and req.length > nbd.MAX_PAYLOAD:
                        raise nbd.NbdProtocolError(f"a write of {req.length} bytes")
                    held = await charge(_cost(req))  # before the payload is read
                    spawned = False
                    try:
                        payload = None
                        if req.type == nbd.Cmd.WRITE:
                            payload = await wire.recv_exactly(req.length)
                        data = _direct(md, exp, req, payload)
                        if data is None:
                            await slots.acquire()
                            requests.start_soon(one, req, payload, held)
                            spawned = True
                            continue
                        # answered at once: no task, no bio (see _direct)
                        conn.answering = True
                        try:
                            if send_lock.locked():
                                await send_lock.acquire()
                            else:  # free: taken without a trip through the scheduler
                                send_lock.acquire_nowait()
                            try:
                                await wire.send_all(*_reply(conn, req, 0, data or None))
                            finally:
                                send_lock.release()
                        finally:
                            conn.answering = False
                    finally:
                        if not spawned:
                            refund(held)
                    if conn.stopping:
                        break
            except GONE as exc:  # the requests in flight still finish
                log.info("NBD client of %s: %s", md.name, exc or type(exc).__name__)


def _direct(md: MappedDevice, exp: Export, req: nbd.Request,
            payload: bytearray | None) -> bytes | None:
    """Run ``req`` by the device's direct path if it can be: the data of a READ, or
    ``b""`` for a WRITE done; None to take a task and a bio.

    The direct path is the FUSE file's (``MappedDevice.read_direct``/``write_direct``:
    one inline ``pread``/``pwrite`` that never waits, for a device whose live table
    remaps straight onto a file).  It takes aligned plain READs and WRITEs only: a
    write with FUA, on a read-only export, or whose sectors a read-modify-write
    holds (the range lock) takes the full path.  Answering from the reading loop
    spares a task and a bio per request, which is most of a request's cost; the
    order of replies is free anyway.
    """
    off, n = req.offset, req.length
    if (off | n) & (SECTOR_SIZE - 1) or not n:
        return None
    first = off >> SECTOR_SHIFT
    if req.type == nbd.Cmd.READ:
        return md.read_direct(first, n)
    if req.type != nbd.Cmd.WRITE or req.flags or exp.read_only or payload is None:
        return None
    if range_lock(md).is_free(first, first + (n >> SECTOR_SHIFT)) \
            and md.write_direct(first, payload):
        return b""
    return None


def _flags(exp: Export) -> int:
    return int(_FLAGS | (_TF.READ_ONLY if exp.read_only else 0))


async def execute(md: MappedDevice, exp: Export, req: nbd.Request,
                   payload: bytearray | None) -> tuple[int, bytearray | memoryview | None]:
    """Run one request on ``md``: (NBD error, data of a READ)."""
    size = md.nr_sectors << SECTOR_SHIFT
    off, n, kind = req.offset, req.length, req.type
    if kind not in (nbd.Cmd.READ, nbd.Cmd.FLUSH, *_WRITES):
        return nbd.Err.EINVAL, None
    if kind in _WRITES and exp.read_only:
        return nbd.Err.EPERM, None
    if kind != nbd.Cmd.FLUSH and off + n > size:
        return (nbd.Err.EINVAL if kind == nbd.Cmd.READ else nbd.Err.ENOSPC), None
    fua = ReqFlag.FUA if req.flags & nbd.CmdFlag.FUA else ReqFlag.NONE
    try:
        if kind == nbd.Cmd.READ:
            if n > nbd.MAX_PAYLOAD:
                return nbd.Err.EINVAL, None
            return 0, memoryview(await read_bytes(md, off, n))
        if kind == nbd.Cmd.FLUSH:
            await md.submit(Bio.flush())
        elif kind == nbd.Cmd.TRIM:  # advisory: only the whole sectors inside the range
            first = -(-off // SECTOR_SIZE)
            end = (off + n) >> SECTOR_SHIFT
            if end > first:
                with contextlib.suppress(NotSupportedError):
                    await md.submit(Bio(Op.DISCARD, first, end - first, None, fua))
        elif n:
            return await _write(md, off, n, payload, fua), None
        return 0, None
    except DmIOError as exc:
        return nbd.error_for(exc.errno), None
    except DmError as exc:
        log.warning("NBD %s on %s: %s", nbd.Cmd(kind).name, md.name, exc)
        return nbd.error_for(exc.errno), None


async def _write(md: MappedDevice, off: int, n: int, payload: bytearray | None,
                 fua: ReqFlag) -> int:
    """WRITE (``payload``) or WRITE_ZEROES (None) of ``n`` bytes at ``off``: 0 or an NBD error.

    Through :mod:`dmuser.byte_io`, under the device's one range lock (FUSE writes
    hold the same): requests not aligned to sectors, from clients that ignored
    the block size announced, are read-modify-written there.
    """
    if payload is not None:
        await write_bytes(md, off, payload, fua)
        return 0
    if (off | n) & (SECTOR_SIZE - 1):
        if n > nbd.MAX_PAYLOAD:
            return nbd.Err.EINVAL
        await write_bytes(md, off, bytes(n), fua)
        return 0
    first, end = off >> SECTOR_SHIFT, (off + n) >> SECTOR_SHIFT
    async with range_lock(md).hold(first, end):
        try:
            await md.submit(Bio(Op.WRITE_ZEROES, first, end - first, None, fua))
        except NotSupportedError:
            zeros = bytes(min(n, _ZERO_CHUNK))
            for pos in range(off, off + n, len(zeros)):
                await md.submit(Bio.write(pos >> SECTOR_SHIFT,
                                          zeros[:min(len(zeros), off + n - pos)], fua))
    return 0
