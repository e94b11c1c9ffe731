"""The NBD client device against scripted servers: URIs, the handshake, and the
failures a real server can show (going away, lying, refusing)."""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from dmuser.core.bio import Bio, Op
from dmuser.core.errors import DmIOError, NoSuchDeviceError
from dmuser.core.nbd_device import NbdDevice
from dmuser.core.nbd_wire import NbdAddress, Wire, parse_uri
from dmuser.formats import nbd

S = 512
Sock = Wire


def test_uris() -> None:
    assert parse_uri("nbd://localhost/disk") == NbdAddress("disk", "localhost", 10809)
    assert parse_uri("nbd://[::1]:2000/") == NbdAddress("", "::1", 2000)
    assert parse_uri("nbd+unix:///e?socket=s.sock", "/run") == NbdAddress("e", path="/run/s.sock")
    assert str(NbdAddress("e", "::1", 5)) == "nbd://[::1]:5/e"
    tls = parse_uri("nbds+unix:///e?socket=s&tls-certificates=c&tls-verify-peer=false", "/r")
    assert tls == NbdAddress("e", path="/r/s", tls=True, tls_certificates="/r/c",
                             tls_verify=False)
    assert parse_uri(str(tls)) == tls
    for bad in ("nbd:///x", "nbd+unix:///x", "nbd+unix://h/x?socket=a", "nbds://h/x?x=1",
                "nbd://h/x?tls-certificates=d", "nbds://h/x?tls-verify-peer=no", "http://h/x"):
        with pytest.raises(NoSuchDeviceError):
            parse_uri(bad)


async def _serve(tmp_path: Path, nursery: trio.Nursery, script: Callable[[Sock], Awaitable[None]],
                 flags: int = nbd.TransmissionFlag.HAS_FLAGS | nbd.TransmissionFlag.SEND_FLUSH,
                 size: int = 64 * S) -> NbdAddress:
    """A one-connection server: GO handshake for any name, then ``script(sock)``."""
    path = str(tmp_path / "fake.sock")
    lsock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await lsock.bind(path)
    lsock.listen(1)

    async def server() -> None:
        raw, _ = await lsock.accept()
        sock = Wire(raw)
        with raw, lsock:
            await sock.send_all(nbd.encode_greeting(1))
            await sock.recv_exactly(4)
            opt, n = nbd.decode_option_header(await sock.recv_exactly(16))
            await sock.recv_exactly(n)
            await sock.send_all(nbd.encode_option_reply(opt, nbd.Rep.INFO,
                                                         nbd.encode_info_export(size, flags)),
                           nbd.encode_option_reply(opt, nbd.Rep.ACK))
            await script(sock)

    nursery.start_soon(server)
    return NbdAddress("x", path=path)


async def _request(sock: Sock) -> tuple[nbd.Request, bytes]:
    req = nbd.decode_request(await sock.recv_exactly(nbd.REQUEST_SIZE))
    data = bytes(await sock.recv_exactly(req.length)) if req.type == nbd.Cmd.WRITE else b""
    return req, data


async def test_replies_in_any_order_and_errors(tmp_path: Path, nursery: trio.Nursery) -> None:
    async def script(sock: Sock) -> None:
        reqs = [(await _request(sock))[0] for _ in range(3)]
        for req in reversed(reqs):  # answer backwards
            if req.offset == 8 * S:
                await sock.send_all(nbd.encode_simple_reply(req.handle, nbd.Err.ENOSPC))
            else:
                await sock.send_all(nbd.encode_simple_reply(req.handle),
                               bytes([req.offset // S]) * req.length)
        req, _ = await _request(sock)
        assert req.type == nbd.Cmd.DISC

    dev = await NbdDevice.connect(await _serve(tmp_path, nursery, script), nursery)
    assert dev.nr_sectors == 64 and not dev.read_only
    results: dict[int, object] = {}

    async def read(sector: int) -> None:
        buf = bytearray(b"\xff" * S)
        try:
            await dev.submit(Bio.read(sector, buf))
            results[sector] = bytes(buf)
        except DmIOError as exc:
            results[sector] = (exc.errno, bytes(buf))

    async with trio.open_nursery() as n:
        for sector in (1, 2, 8):
            n.start_soon(read, sector)
            await trio.sleep(0.01)
    assert results == {1: b"\x01" * S, 2: b"\x02" * S, 8: (errno.ENOSPC, bytes(S))}
    with pytest.raises(DmIOError):  # no SEND_TRIM offered
        await dev.submit(Bio(Op.DISCARD, 0, 8))
    dev.close()


async def test_a_server_that_goes_away_fails_everything(tmp_path: Path,
                                                        nursery: trio.Nursery) -> None:
    async def script(sock: Sock) -> None:
        await _request(sock)  # a write: never answered

    dev = await NbdDevice.connect(await _serve(tmp_path, nursery, script), nursery)
    with pytest.raises(DmIOError) as exc:
        await dev.write(0, b"a" * S)
    assert exc.value.errno == errno.EIO and "connection lost" in str(exc.value)
    with pytest.raises(DmIOError, match="connection lost"):
        await dev.read(0, 1)
    dev.close()


async def test_a_server_that_lies_fails_the_connection(tmp_path: Path,
                                                       nursery: trio.Nursery) -> None:
    async def script(sock: Sock) -> None:
        req, _ = await _request(sock)
        await sock.send_all(nbd.encode_simple_reply(req.handle + 1000))
        await trio.sleep_forever()

    dev = await NbdDevice.connect(await _serve(tmp_path, nursery, script), nursery)
    with pytest.raises(DmIOError, match="never sent"):
        await dev.flush()
    dev.close()


async def test_refusals_at_connect(tmp_path: Path, nursery: trio.Nursery) -> None:
    with pytest.raises(NoSuchDeviceError, match="cannot connect"):
        await NbdDevice.connect(NbdAddress("x", path=str(tmp_path / "none.sock")), nursery)

    async def nothing(sock: Sock) -> None:
        pass

    addr = await _serve(tmp_path, nursery, nothing, flags=nbd.TransmissionFlag.HAS_FLAGS
                        | nbd.TransmissionFlag.READ_ONLY)
    dev = await NbdDevice.connect(addr, nursery)
    with pytest.raises(DmIOError) as exc:
        await dev.write(0, bytes(S))
    assert exc.value.errno == errno.EPERM
    dev.close()


async def test_a_server_that_stops_answering_times_out(tmp_path: Path,
                                                       nursery: trio.Nursery) -> None:
    """A request without a reply for ``timeout`` seconds kills the connection: every
    bio in flight and every later one fails with EIO, and the socket is closed."""
    closed = trio.Event()

    async def script(sock: Sock) -> None:
        await _request(sock)  # a read: never answered, the connection kept open
        try:
            while await sock.sock.recv(4096):
                pass
        finally:
            closed.set()

    dev = await NbdDevice.connect(await _serve(tmp_path, nursery, script), nursery,
                                  timeout=0.2)
    with pytest.raises(DmIOError, match="no reply within 0.2 s") as exc:
        await dev.read(0, 1)
    assert exc.value.errno == errno.EIO
    await closed.wait()  # the client hung up
    with pytest.raises(DmIOError, match="no reply"):
        await dev.write(0, bytes(S))
    dev.close()


async def test_what_the_device_allocates_itself_comes_in_pieces(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    """Zeros for a server without WRITE_ZEROES go out as writes of at most 1 MiB; the
    reply to a read whose caller gave up is dropped and the stream stays in step."""
    big, piece = 3 << 20, 1 << 20
    writes: list[tuple[int, int]] = []

    async def script(sock: Sock) -> None:
        abandoned, _ = await _request(sock)
        assert abandoned.type == nbd.Cmd.READ and abandoned.length == big
        while sum(n for _, n in writes) < big:
            req, data = await _request(sock)
            assert req.type == nbd.Cmd.WRITE and data == bytes(req.length)
            writes.append((req.offset, req.length))
            await sock.send_all(nbd.encode_simple_reply(req.handle))
        await sock.send_all(nbd.encode_simple_reply(abandoned.handle), b"\x55" * big)
        req, _ = await _request(sock)
        await sock.send_all(nbd.encode_simple_reply(req.handle), b"\x07" * req.length)
        assert (await _request(sock))[0].type == nbd.Cmd.DISC

    dev = await NbdDevice.connect(await _serve(tmp_path, nursery, script, size=2 * big),
                                  nursery)
    untouched = bytearray(b"\xff" * big)
    async with trio.open_nursery() as n:
        n.start_soon(dev.submit, Bio.read(0, untouched))
        await trio.testing.wait_all_tasks_blocked()
        n.cancel_scope.cancel()  # the caller gives up; the request stays on the server
    await dev.submit(Bio(Op.WRITE_ZEROES, 8, big // S))
    assert writes == [(8 * S + pos, min(piece, big - pos)) for pos in range(0, big, piece)]
    assert bytes(await dev.read(1, 1)) == b"\x07" * S  # after the dropped 3 MiB
    assert untouched == b"\xff" * big
    dev.close()
