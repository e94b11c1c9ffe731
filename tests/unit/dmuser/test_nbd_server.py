"""The NBD server and the NBD client device, in one process over a local socket.

A device is exported by the ``export`` verb and read back through a table whose
word is the export's URI (``nbd+unix://`` and ``nbd://``), so both ends are
checked against each other and against the backing file; raw requests check
the option haggling and the refusals the client device itself never sends.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import trio
from support.data import make_image, pattern
from support.targets import nbd_manager
from support.targets import run_verb as run

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.errors import DmError, DmIOError, NoSuchDeviceError
from dmuser.core.manager import DeviceManager
from dmuser.core.nbd_wire import NbdAddress, Wire, handshake
from dmuser.formats import nbd
from dmuser.nbd_server import server_for

S = 512


@pytest.fixture
async def mgr(nursery: trio.Nursery) -> DeviceManager:
    return await nbd_manager(nursery)


@pytest.fixture
def img(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "a.img"
    return path, make_image(path, 256 * S, seed=5)


async def test_round_trip_through_an_export(mgr: DeviceManager, img: tuple[Path, bytes],
                                            tmp_path: Path) -> None:
    path, data = img
    await run(mgr, "create", name="src", table=f"0 256 linear {path} 0")
    rep = await run(mgr, "export", name="src", address=str(tmp_path / "nbd.sock"))
    assert rep.data["uri"] == f"nbd+unix:///src?socket={tmp_path / 'nbd.sock'}"
    await run(mgr, "create", name="remote", table=f"0 128 linear {rep.data['uri']} 64")
    remote = mgr.get("remote")
    assert bytes(await remote.read(0, 128)) == data[64 * S:192 * S]
    assert (await run(mgr, "table", name="remote")).data["remote"] == \
        [f"0 128 linear {rep.data['uri']} 64"]
    (src,) = [d for d in (await run(mgr, "ls")).data if d["name"] == "src"]
    assert src["exports"][0]["connections"] == 1
    assert "NBD export:" in (await run(mgr, "info", name="src")).output

    # many requests in flight on one connection, each its own region
    async with trio.open_nursery() as n:
        for i in range(32):
            n.start_soon(remote.write, i * 4, pattern(i, 4 * S))
    await remote.submit(Bio.write(0, pattern("fua", 4 * S), ReqFlag.FUA))
    await remote.flush()
    expect = bytearray(data)
    for i in range(1, 32):
        expect[(64 + i * 4) * S:(68 + i * 4) * S] = pattern(i, 4 * S)
    expect[64 * S:68 * S] = pattern("fua", 4 * S)
    assert path.read_bytes() == bytes(expect)

    await remote.submit(Bio(Op.WRITE_ZEROES, 8, 8))
    await remote.submit(Bio(Op.DISCARD, 16, 8))
    expect[72 * S:88 * S] = bytes(16 * S)
    assert path.read_bytes()[72 * S:80 * S] == bytes(8 * S)
    assert bytes(await remote.read(0, 128)) == bytes(expect[64 * S:192 * S])

    # the connection counts as an opener; unexport closes it and I/O then fails
    with pytest.raises(DmError, match="busy"):
        await run(mgr, "remove", name="src")
    await run(mgr, "unexport", name="src")
    with pytest.raises(DmIOError) as exc:
        await remote.read(0, 8)
    assert exc.value.errno == errno.EIO
    await run(mgr, "remove", name="remote")
    await run(mgr, "remove", name="src")
    assert not (tmp_path / "nbd.sock").exists()


async def test_tcp_loopback_and_the_refusals(mgr: DeviceManager, img: tuple[Path, bytes]) -> None:
    path, data = img
    await run(mgr, "create", name="src", table=f"0 256 linear {path} 0")
    rep = await run(mgr, "export", name="src", address="127.0.0.1:0", read_only=True)
    uri = rep.data["uri"]
    assert uri.startswith("nbd://127.0.0.1:") and rep.data["read_only"]
    await run(mgr, "create", name="ro", table=f"0 256 linear {uri} 0")
    assert bytes(await mgr.get("ro").read(0, 256)) == data
    with pytest.raises(DmIOError) as exc:
        await mgr.get("ro").write(0, bytes(S))
    assert exc.value.errno == errno.EPERM
    with pytest.raises(DmError, match="not a loopback address") as refused:
        await run(mgr, "export", name="src", address="0.0.0.0:0")
    assert refused.value.errno == errno.EPERM
    wide = await run(mgr, "export", name="src", address="0.0.0.0:0", insecure=True)
    assert wide.data["address"].startswith("0.0.0.0:")
    await run(mgr, "unexport", name="src", address=wide.data["address"])
    assert [e["address"] for e in mgr_exports(mgr, "src")] == [rep.data["address"]]
    with pytest.raises(DmError, match="does not exist"):
        await run(mgr, "export", name="nope", address="127.0.0.1:0")
    with pytest.raises(NoSuchDeviceError, match="no export"):
        await run(mgr, "create", name="bad", table=f"0 8 linear {uri[:-3]}zzz 0")
    with pytest.raises(DmError):
        await run(mgr, "export", name="src", address=rep.data["address"])  # EEXIST
    await run(mgr, "remove", name="ro")
    await run(mgr, "unexport", name="src")


def mgr_exports(mgr: DeviceManager, name: str) -> list[dict[str, Any]]:
    return server_for(mgr).exports_of(name)


async def _connect(address: str) -> Wire:
    host, _, port = address.rpartition(":")
    return Wire((await trio.open_tcp_stream(host, int(port))).socket)


async def _raw_client(address: str, export: str) -> tuple[Wire, int, int]:
    sock = await _connect(address)
    size, flags, _ = await handshake(sock, NbdAddress(export))
    return sock, size, flags


async def _call(sock: Wire, cmd: int, offset: int, length: int,
                payload: bytes = b"", flags: int = 0, handle: int = 1) -> tuple[int, bytes]:
    await sock.send_all(nbd.encode_request(nbd.Request(cmd, handle, offset, length, flags)),
                   payload)
    got, error = nbd.decode_simple_reply(await sock.recv_exactly(nbd.SIMPLE_REPLY_SIZE))
    assert got == handle
    data = bytes(await sock.recv_exactly(length)) if cmd == nbd.Cmd.READ and not error else b""
    return error, data


async def test_raw_requests(mgr: DeviceManager, img: tuple[Path, bytes]) -> None:
    path, data = img
    await run(mgr, "create", name="src", table=f"0 256 linear {path} 0")
    rw = (await run(mgr, "export", name="src", address="127.0.0.1:0")).data["address"]
    ro = (await run(mgr, "export", name="src", address="localhost:0", read_only=True,
                    export_name="snap")).data["address"]
    sock, size, flags = await _raw_client(rw, "")  # the default export
    assert size == 256 * S
    assert flags & nbd.TransmissionFlag.SEND_FUA and flags & nbd.TransmissionFlag.CAN_MULTI_CONN
    assert await _call(sock, nbd.Cmd.READ, 1000, 100) == (0, data[1000:1100])  # unaligned
    # unaligned writes (a client ignoring the block size): read-modify-write
    assert await _call(sock, nbd.Cmd.WRITE, 100, 10, b"x" * 10) == (0, b"")
    assert await _call(sock, nbd.Cmd.WRITE_ZEROES, 1020, 10) == (0, b"")
    assert await _call(sock, nbd.Cmd.WRITE, 3 * S - 3, S + 6, b"y" * (S + 6)) == (0, b"")
    expect = bytearray(data)
    expect[100:110] = b"x" * 10
    expect[1020:1030] = bytes(10)
    expect[3 * S - 3:4 * S + 3] = b"y" * (S + 6)
    assert path.read_bytes()[:5 * S] == bytes(expect[:5 * S])
    assert (await _call(sock, nbd.Cmd.READ, 255 * S, 2 * S))[0] == nbd.Err.EINVAL
    assert (await _call(sock, nbd.Cmd.WRITE, 256 * S, S, bytes(S)))[0] == nbd.Err.ENOSPC
    assert await _call(sock, nbd.Cmd.WRITE, S, S, b"w" * S, nbd.CmdFlag.FUA) == (0, b"")
    assert await _call(sock, nbd.Cmd.FLUSH, 0, 0) == (0, b"")
    assert await _call(sock, nbd.Cmd.TRIM, 4 * S + 10, 3 * S) == (0, b"")  # rounded inward
    assert (await _call(sock, nbd.Cmd.CACHE, 0, S))[0] == nbd.Err.EINVAL
    assert path.read_bytes()[S:2 * S] == b"w" * S
    assert path.read_bytes()[5 * S:] == bytes(2 * S) + data[7 * S:]  # the trim: sectors 5-6
    await sock.send_all(nbd.encode_request(nbd.Request(nbd.Cmd.DISC, 2, 0, 0)))
    assert await sock.sock.recv(10) == b""  # the server hangs up after DISC
    sock.close()

    sock, _, flags = await _raw_client(ro, "snap")
    assert flags & nbd.TransmissionFlag.READ_ONLY
    for cmd in (nbd.Cmd.WRITE, nbd.Cmd.TRIM, nbd.Cmd.WRITE_ZEROES):
        payload = bytes(S) if cmd == nbd.Cmd.WRITE else b""
        assert (await _call(sock, cmd, 0, S, payload))[0] == nbd.Err.EPERM
    sock.close()
    await run(mgr, "unexport", name="src")


async def test_option_haggling(mgr: DeviceManager, img: tuple[Path, bytes]) -> None:
    await run(mgr, "create", name="src", table=f"0 256 linear {img[0]} 0")
    address = (await run(mgr, "export", name="src", address="127.0.0.1:0")).data["address"]
    sock = await _connect(address)
    assert nbd.decode_greeting(await sock.recv_exactly(18)) == 3
    await sock.send_all(nbd.encode_client_flags(3))

    async def ask(opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        await sock.send_all(nbd.encode_option(opt, data))
        replies = []
        while True:
            _, kind, n = nbd.decode_option_reply_header(await sock.recv_exactly(20))
            replies.append((kind, bytes(await sock.recv_exactly(n))))
            if kind != nbd.Rep.SERVER and kind != nbd.Rep.INFO:
                return replies

    assert await ask(nbd.Opt.LIST) == [(nbd.Rep.SERVER, nbd.encode_server_entry("src")),
                                       (nbd.Rep.ACK, b"")]
    assert (await ask(nbd.Opt.LIST, b"x"))[0][0] == nbd.Rep.ERR_INVALID
    assert (await ask(nbd.Opt.STARTTLS))[0][0] == nbd.Rep.ERR_UNSUP
    assert (await ask(nbd.Opt.STRUCTURED_REPLY, b"x"))[0][0] == nbd.Rep.ERR_INVALID
    assert (await ask(nbd.Opt.SET_META_CONTEXT, bytes(8)))[0][0] == nbd.Rep.ERR_UNSUP
    assert (await ask(nbd.Opt.INFO, nbd.encode_info_request("zz")))[0][0] == nbd.Rep.ERR_UNKNOWN
    info = await ask(nbd.Opt.INFO, nbd.encode_info_request("src"))  # block size sent anyway
    assert [nbd.decode_info(d) for _, d in info[:-1]] == \
        [(0, (256 * S, 0x16D)),  # HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES
         (3, (512, 4096, nbd.MAX_PAYLOAD))]  # CAN_MULTI_CONN
    assert await ask(nbd.Opt.ABORT) == [(nbd.Rep.ACK, b"")]
    assert await sock.sock.recv(10) == b""
    sock.close()
    await run(mgr, "unexport", name="src")


async def test_structured_replies(mgr: DeviceManager, img: tuple[Path, bytes]) -> None:
    path, data = img
    await run(mgr, "create", name="src", table=f"0 256 linear {path} 0")
    address = (await run(mgr, "export", name="src", address="127.0.0.1:0",
                         read_only=True)).data["address"]
    sock = await _connect(address)
    nbd.decode_greeting(await sock.recv_exactly(18))
    await sock.send_all(nbd.encode_client_flags(3), nbd.encode_option(nbd.Opt.STRUCTURED_REPLY))
    assert nbd.decode_option_reply_header(await sock.recv_exactly(20)) == \
        (nbd.Opt.STRUCTURED_REPLY, nbd.Rep.ACK, 0)
    await sock.send_all(nbd.encode_option(nbd.Opt.GO, nbd.encode_info_request("src")))
    while True:
        _, kind, n = nbd.decode_option_reply_header(await sock.recv_exactly(20))
        await sock.recv_exactly(n)
        if kind == nbd.Rep.ACK:
            break

    async def chunk() -> tuple[int, int, int, bytes]:
        flags, kind, handle, n = nbd.decode_chunk_header(await sock.recv_exactly(20))
        return flags, kind, handle, bytes(await sock.recv_exactly(n))

    await sock.send_all(nbd.encode_request(nbd.Request(nbd.Cmd.READ, 1, 700, 100)))
    assert await chunk() == (1, nbd.ReplyType.OFFSET_DATA, 1,
                             (700).to_bytes(8, "big") + data[700:800])
    await sock.send_all(nbd.encode_request(nbd.Request(nbd.Cmd.WRITE, 2, 0, S)), bytes(S))
    flags, kind, handle, payload = await chunk()
    assert (flags, kind, handle) == (1, nbd.ReplyType.ERROR, 2)
    assert nbd.decode_error_payload(payload) == (nbd.Err.EPERM, "EPERM")
    await sock.send_all(nbd.encode_request(nbd.Request(nbd.Cmd.FLUSH, 3, 0, 0)))
    assert await chunk() == (1, nbd.ReplyType.NONE, 3, b"")
    sock.close()
    await run(mgr, "unexport", name="src")


async def test_nbd_writes_wait_for_the_same_range_lock_as_fuse_writes(
        mgr: DeviceManager, img: tuple[Path, bytes]) -> None:
    """One lock per device for every door: an unaligned NBD write of sector 3
    waits while the range is held (as by a FUSE read-modify-write), then lands."""
    from dmuser.byte_io import range_lock
    from dmuser.nbd_session import _write

    path, _ = img
    await run(mgr, "create", name="d", table=f"0 64 linear {path} 0")
    md = mgr.get("d")
    done = trio.Event()

    async def nbd_write() -> None:
        await _write(md, 3 * 512 + 100, 10, bytearray(b"x" * 10), ReqFlag.NONE)
        done.set()

    async with trio.open_nursery() as nursery, range_lock(md).hold(3, 4):
        nursery.start_soon(nbd_write)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
    assert done.is_set()
    assert bytes(await md.read(3, 1))[100:110] == b"x" * 10


async def test_the_direct_path_takes_only_plain_aligned_requests(
        mgr: DeviceManager, img: tuple[Path, bytes]) -> None:
    """``_direct`` answers aligned plain READs and WRITEs of a linear device at once,
    and declines (None: a task and a bio) FUA, read-only exports, unaligned
    requests, and writes whose sectors the range lock holds."""
    from dmuser.byte_io import range_lock
    from dmuser.nbd_session import Export, _direct

    path, data = img
    await run(mgr, "create", name="d", table=f"0 64 linear {path} 0")
    md, rw, ro = mgr.get("d"), Export("d", "d", False), Export("d", "d", True)

    def req(cmd: int, off: int, n: int, flags: int = 0) -> nbd.Request:
        return nbd.Request(cmd, 1, off, n, flags)

    assert _direct(md, rw, req(nbd.Cmd.READ, 2 * S, 2 * S), None) == data[2 * S:4 * S]
    assert _direct(md, rw, req(nbd.Cmd.READ, 100, S), None) is None
    new = bytearray(b"n" * S)
    assert _direct(md, rw, req(nbd.Cmd.WRITE, 5 * S, S), new) == b""
    assert path.read_bytes()[5 * S:6 * S] == new
    assert _direct(md, rw, req(nbd.Cmd.WRITE, 6 * S, S, nbd.CmdFlag.FUA), new) is None
    assert _direct(md, ro, req(nbd.Cmd.WRITE, 6 * S, S), new) is None
    assert _direct(md, rw, req(nbd.Cmd.WRITE, 64 * S, S), new) is None  # past the end
    async with range_lock(md).hold(7, 8):
        assert _direct(md, rw, req(nbd.Cmd.WRITE, 6 * S, 2 * S), new * 2) is None
    assert path.read_bytes()[6 * S:8 * S] == data[6 * S:8 * S]
    await md.suspend()
    assert _direct(md, rw, req(nbd.Cmd.READ, 0, S), None) is None  # suspended: waits
    await md.resume()
