"""dmuser.Client / AsyncClient without a daemon: error replies mapped to exceptions by
errno, and every client-side failure a one-line DmuserError (fake one-shot servers)."""

from __future__ import annotations

import doctest
import errno
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import dmuser
import dmuser.errors
from dmuser import calls, client
from dmuser.aclient import AsyncClient
from dmuser.core.errors import DmError
from dmuser.errors import error_from_reply


@pytest.mark.parametrize("code,cls", [
    (errno.EINVAL, dmuser.InvalidTable), (errno.ENXIO, dmuser.NoSuchDevice),
    (errno.EEXIST, dmuser.DeviceExists), (errno.EBUSY, dmuser.DeviceBusy),
    (errno.EIO, dmuser.DeviceIOError), (errno.EOPNOTSUPP, dmuser.NotSupported),
    (errno.ETIMEDOUT, dmuser.WaitTimeout), (errno.ESHUTDOWN, dmuser.DaemonShuttingDown),
])
def test_error_replies_map_by_errno(code: int, cls: type[dmuser.DmuserError]) -> None:
    err = error_from_reply({"ok": False, "errno": code, "error": "the kernel's text"})
    assert type(err) is cls and err.errno == code and str(err) == "the kernel's text"
    assert isinstance(err, dmuser.DmuserError) and isinstance(err, DmError)


def test_other_errnos_give_the_base_class() -> None:
    err = error_from_reply({"ok": False, "errno": errno.EPERM, "error": "x"})
    assert type(err) is dmuser.DmuserError and err.errno == errno.EPERM and str(err) == "x"


@pytest.mark.parametrize("reply", [
    {"ok": False, "error": "x"}, {"ok": False, "errno": "22", "error": "x"},
    {"ok": False, "errno": True, "error": "x"}, {"ok": False, "errno": -3, "error": "x"},
])
def test_a_reply_without_a_usable_errno_is_eio(reply: dict[str, object]) -> None:
    err = error_from_reply(reply)
    assert type(err) is dmuser.DeviceIOError and err.errno == errno.EIO and str(err) == "x"


def test_error_without_text_names_its_errno() -> None:
    assert "ENXIO" in str(error_from_reply({"ok": False, "errno": errno.ENXIO}))


def test_connect_errors_are_one_line() -> None:
    sock = "/run/x.sock"
    e = client.connect_error(PermissionError(errno.EACCES, "Permission denied"), sock)
    assert str(e) == f"cannot connect to {sock}: permission denied (the daemon runs as root?)"
    e = client.connect_error(ConnectionRefusedError(errno.ECONNREFUSED, "refused"), sock)
    assert isinstance(e, dmuser.DaemonNotRunning) and "start one with 'dmuser serve'" in str(e)
    with pytest.raises(dmuser.ConnectionFailed, match="socket path too long") as ei:
        client.check_socket_path("/" + "a" * 107)
    assert ei.value.errno == errno.ENAMETOOLONG


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, list[bytes]]]:
    """A one-connection-at-a-time server that answers each request with the next of
    ``answers`` (raw bytes, sent as they are, then the connection is closed)."""
    path = str(tmp_path / "s.sock")
    answers: list[bytes] = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                buf = b""
                while b"\n" not in buf:
                    data = conn.recv(4096)
                    if not data:
                        break
                    buf += data
                conn.sendall(answers.pop(0) if answers else b"")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, answers
    srv.close()


BAD_REPLIES = [
    (b"", dmuser.ProtocolError, "closed the connection without a reply"),
    (b"not json", dmuser.ProtocolError, "not JSON"),
    (b"[1, 2]", dmuser.ProtocolError, "not an object"),
    (b'{"ok": true, "data": {"pid": "x"}}', dmuser.ProtocolError, "unexpected ping reply"),
    (b'{"ok": false, "errno": 16, "error": "busy!"}', dmuser.DeviceBusy, "busy!"),
]


@pytest.mark.parametrize("raw,cls,text", BAD_REPLIES)
def test_sync_client_replies(server: tuple[str, list[bytes]], raw: bytes,
                             cls: type[Exception], text: str) -> None:
    path, answers = server
    answers.append(raw)
    with pytest.raises(cls, match=text) as e:
        dmuser.Client(path, timeout=10).ping()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("raw,cls,text", BAD_REPLIES)
def test_async_client_replies(server: tuple[str, list[bytes]], raw: bytes,
                              cls: type[Exception], text: str) -> None:
    path, answers = server
    answers.append(raw)

    async def main() -> None:
        with pytest.raises(cls, match=text):
            await AsyncClient(path, timeout=10).ping()

    trio.run(main)


def test_typed_results_and_request_fields(server: tuple[str, list[bytes]]) -> None:
    path, answers = server
    answers += [json.dumps(r).encode() for r in (
        {"ok": True, "output": "", "data": {"pid": 7, "mountpoint": "/m"}},
        {"ok": True, "output": "", "data": {"linear": [1, 4, 0]}},
        {"ok": True, "output": "pong\n", "data": None},
        {"ok": True, "output": "", "data": {"a": ["0 8 snapshot Invalid"]}},
        {"ok": True, "output": "", "data": {"event_nr": 4}},
    )]
    c = dmuser.Client(path)
    assert c.ping() == calls.DaemonInfo(7, "/m")
    assert c.targets() == {"linear": (1, 4, 0)}
    assert c.message("a", 0, "ping me") == "pong"
    [st] = c.status_all()["a"]
    assert getattr(st, "invalid", False)
    assert c.wait("a", 3, timeout=1) == 4


def test_request_builders() -> None:
    assert calls.table_text(["0 8 zero", "8 8 error"]) == "0 8 zero\n8 8 error\n"
    req = calls.create("n", ["0 8 zero"], "u").request
    assert req["table"] == "0 8 zero\n" and req["uuid"] == "u" and "cwd" in req
    assert calls.create("n", None, "").request["table"] is None
    assert calls.message("n", 5, ["a", "b"]).request == {
        "verb": "message", "name": "n", "sector": "5", "message": ["a", "b"]}
    w = calls.wait("n", 2, 1.5, None)
    assert w.request == {"verb": "wait", "name": "n", "event_nr": 2, "timeout": 1.5}
    assert w.timeout == 1.5 + calls.WAIT_REPLY_GRACE and not w.unbounded
    assert calls.wait("n", 0, None, 5.0).unbounded


def test_the_package_import_is_light() -> None:
    import subprocess
    import sys

    code = ("import sys, dmuser; bad = [m for m in sys.modules if m in ('trio', 'pyfuse3') "
            "or m.startswith('dmuser.targets') or m == 'dmuser.daemon']; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
    assert dmuser.AsyncClient is AsyncClient


def test_docstring_examples() -> None:
    result = doctest.testmod(dmuser.errors)
    assert result.attempted >= 1 and result.failed == 0
