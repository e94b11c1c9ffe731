"""TLS and the allow-list of NBD exports, server and client in one process.

The daemon's server with a certificate (``tls_cert``/``tls_key``, optionally
``tls_ca`` for client certificates) is read back through ``nbds://`` table
words, so both ends of STARTTLS are checked against each other; raw sockets
check what a client that skips TLS gets.  Certificates: ``support.tls``.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import trio
from support.data import make_image, pattern
from support.targets import nbd_manager
from support.targets import run_verb as run
from support.tls import make_certs

from dmuser.core.errors import DmError, NoSuchDeviceError
from dmuser.core.manager import DeviceManager
from dmuser.core.nbd_wire import NbdAddress, Wire, handshake
from dmuser.formats import nbd

S = 512


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
async def mgr(nursery: trio.Nursery) -> DeviceManager:
    return await nbd_manager(nursery)


@pytest.fixture
def img(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "a.img"
    return path, make_image(path, 256 * S, seed="tls")


def tls(certs: Path, ca: bool = False) -> dict[str, str]:
    keys = {"tls_cert": str(certs / "server-cert.pem"), "tls_key": str(certs / "server-key.pem")}
    return {**keys, "tls_ca": str(certs / "ca-cert.pem")} if ca else keys


def client_dir(tmp_path: Path, certs: Path, name: str, ca: str = "ca-cert.pem",
               client_cert: bool = False) -> Path:
    """A tls-certificates directory holding ``ca`` as its CA, and the client's pair."""
    d = tmp_path / name
    d.mkdir()
    shutil.copy(certs / ca, d / "ca-cert.pem")
    if client_cert:
        for f in ("client-cert.pem", "client-key.pem"):
            shutil.copy(certs / f, d / f)
    return d


async def test_tls_round_trip_and_refusals(mgr: DeviceManager, img: tuple[Path, bytes],
                                           certs: Path, tmp_path: Path) -> None:
    path, data = img
    await run(mgr, "create", name="src", table=f"0 256 linear {path} 0")
    rep = await run(mgr, "export", name="src", address="127.0.0.1:0", **tls(certs))
    uri = rep.data["uri"]
    assert uri.startswith("nbds://127.0.0.1:") and rep.data["tls"] is True
    good = client_dir(tmp_path, certs, "good")
    await run(mgr, "create", name="r", table=f"0 256 linear {uri}?tls-certificates={good} 0")
    remote = mgr.get("r")
    assert bytes(await remote.read(0, 256)) == data
    async with trio.open_nursery() as n:  # pipelined over TLS
        for i in range(16):
            n.start_soon(remote.write, i * 16, pattern(i, 16 * S))
    await remote.flush()
    assert path.read_bytes() == b"".join(pattern(i, 16 * S) for i in range(16))
    assert bytes(await remote.read(8, 200)) == path.read_bytes()[8 * S:208 * S]

    plain = "nbd://" + uri.removeprefix("nbds://")
    with pytest.raises(NoSuchDeviceError, match="requires TLS"):
        await run(mgr, "create", name="p", table=f"0 8 linear {plain} 0")
    wrong = client_dir(tmp_path, certs, "wrong", ca="other-ca-cert.pem")
    with pytest.raises(NoSuchDeviceError, match="TLS handshake failed"):
        await run(mgr, "create", name="w", table=f"0 8 linear {uri}?tls-certificates={wrong} 0")
    # a client that skips STARTTLS learns nothing: not the export list, not the size
    host, _, port = rep.data["address"].rpartition(":")
    wire = Wire((await trio.open_tcp_stream(host, int(port))).socket)
    await wire.recv_exactly(nbd.GREETING_SIZE)
    await wire.send_all(nbd.encode_client_flags(3))
    for opt, payload in ((nbd.Opt.LIST, b""), (nbd.Opt.GO, nbd.encode_info_request("src"))):
        await wire.send_all(nbd.encode_option(opt, payload))
        _, kind, n = nbd.decode_option_reply_header(await wire.recv_exactly(20))
        await wire.recv_exactly(n)
        assert kind == nbd.Rep.ERR_TLS_REQD
    await wire.send_all(nbd.encode_option(nbd.Opt.EXPORT_NAME, b"src"))
    assert await wire.sock.recv(10) == b""  # hung up: EXPORT_NAME has no error reply
    wire.close()
    await run(mgr, "remove", name="r")
    await run(mgr, "unexport", name="src")


async def test_client_certificates(mgr: DeviceManager, img: tuple[Path, bytes],
                                   certs: Path, tmp_path: Path) -> None:
    path, data = img
    await run(mgr, "create", name="src", table=f"0 256 linear {path} 0")
    rep = await run(mgr, "export", name="src", address="unix:tls.sock", cwd=str(tmp_path),
                    **tls(certs, ca=True))
    uri = rep.data["uri"]
    assert uri.startswith("nbds+unix:///src?socket=") and rep.data["client_certificates"]
    anon = client_dir(tmp_path, certs, "anon")
    with pytest.raises(NoSuchDeviceError, match="cannot connect"):
        await run(mgr, "create", name="a", table=f"0 8 linear {uri}&tls-certificates={anon} 0")
    known = client_dir(tmp_path, certs, "known", client_cert=True)
    await run(mgr, "create", name="k", table=f"0 256 linear {uri}&tls-certificates={known} 0")
    assert bytes(await mgr.get("k").read(0, 256)) == data
    await run(mgr, "remove", name="k")
    await run(mgr, "unexport", name="src")


async def test_allow_list_and_bad_requests(mgr: DeviceManager, img: tuple[Path, bytes],
                                           certs: Path, tmp_path: Path) -> None:
    path, data = img
    await run(mgr, "create", name="src", table=f"0 256 linear {path} 0")
    shut = await run(mgr, "export", name="src", address="127.0.0.1:0", allow=["10.0.0.0/8"])
    assert shut.data["allow"] == ["10.0.0.0/8"]
    with pytest.raises(NoSuchDeviceError, match="cannot connect"):
        await run(mgr, "create", name="x", table=f"0 8 linear {shut.data['uri']} 0")
    with pytest.raises(DmError, match="other TLS or allow") as exc:  # settings of the address
        await run(mgr, "export", name="src", address=shut.data["address"], export_name="b")
    assert exc.value.errno == errno.EEXIST
    await run(mgr, "unexport", name="src")
    ok = await run(mgr, "export", name="src", address="127.0.0.1:0",
                   allow=["192.168.0.0/16", "127.0.0.1"])
    await run(mgr, "create", name="y", table=f"0 256 linear {ok.data['uri']} 0")
    assert bytes(await mgr.get("y").read(0, 256)) == data
    await run(mgr, "remove", name="y")
    # TLS lifts the loopback rule; without it a wide address still needs 'insecure'
    wide = await run(mgr, "export", name="src", address="0.0.0.0:0", **tls(certs))
    assert wide.data["uri"].startswith("nbds://0.0.0.0:")
    with pytest.raises(DmError, match="not a loopback address"):
        await run(mgr, "export", name="src", address="0.0.0.0:0")
    for bad, match in (({"allow": ["10.0.0.300"]}, "bad allow entry"),
                       ({"tls_cert": str(certs / "server-cert.pem")}, "both tls_cert"),
                       ({"tls_cert": str(certs / "nope.pem"), "tls_key": "k"},
                        "TLS certificate or key"),
                       ({"address": "unix:a.sock", "allow": ["127.0.0.1"]}, "for TCP")):
        with pytest.raises(DmError, match=match) as exc:
            await run(mgr, "export", **{"name": "src", "address": "127.0.0.1:0",
                                        "cwd": str(tmp_path), **bad})
        assert exc.value.errno == errno.EINVAL
    await run(mgr, "unexport", name="src")


async def test_starttls_on_a_plain_server_is_refused(mgr: DeviceManager,
                                                     img: tuple[Path, bytes]) -> None:
    """An nbds:// client never falls back to clear text."""
    await run(mgr, "create", name="src", table=f"0 256 linear {img[0]} 0")
    rep = await run(mgr, "export", name="src", address="127.0.0.1:0")
    host, _, port = rep.data["address"].rpartition(":")
    wire = Wire((await trio.open_tcp_stream(host, int(port))).socket)
    with pytest.raises(Exception, match="refused TLS"):
        await handshake(wire, NbdAddress("src", host, int(port), tls=True))
    wire.close()
    await run(mgr, "unexport", name="src")


async def test_a_silent_client_is_dropped_after_the_handshake_timeout(
        mgr: DeviceManager, img: tuple[Path, bytes], certs: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that connects and never starts TLS (or never picks an export) holds
    its connection for HANDSHAKE_TIMEOUT at most."""
    from dmuser import nbd_server

    monkeypatch.setattr(nbd_server, "HANDSHAKE_TIMEOUT", 0.2)
    await run(mgr, "create", name="src", table=f"0 256 linear {img[0]} 0")
    rep = await run(mgr, "export", name="src", address="127.0.0.1:0", **tls(certs))
    host, _, port = rep.data["address"].rpartition(":")
    wire = Wire((await trio.open_tcp_stream(host, int(port))).socket)
    await wire.recv_exactly(nbd.GREETING_SIZE)
    await wire.send_all(nbd.encode_client_flags(3))
    with trio.fail_after(10):
        assert await wire.sock.recv(10) == b""  # the server hung up
    wire.close()
    await run(mgr, "unexport", name="src")
