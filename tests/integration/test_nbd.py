"""NBD against real peers (Debian packages: qemu-utils, libnbd-bin, nbdkit).

* dmuser as the server: ``qemu-img info``/``compare``, ``nbdinfo`` and
  ``nbdcopy`` read a dmuser export byte for byte as the backing file, and
  writes through the export land in it.
* dmuser as the client: a linear table over an ``nbdkit memory`` export
  round-trips data; killing nbdkit makes I/O fail with EIO and the daemon
  stays up.

The export verb is sent as a control request (``Daemon.request``).  A missing
tool skips, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon import Daemon
from support.data import make_image, pattern, read_at, write_at
from support.system import need_tools as need
from support.system import run_tool as run
from support.system import wait_until

from dmuser.formats import nbd

S = 512
MIB = 1 << 20


@pytest.fixture
def exported(daemon: Daemon) -> tuple[Daemon, Path, dict[str, object]]:
    img = daemon.dir / "vol.img"
    make_image(img, 8 * MIB, seed="nbd")
    daemon.create("vol", f"0 {8 * MIB // S} linear {img} 0")
    data = daemon.request("export", name="vol", address="127.0.0.1:0")
    assert isinstance(data, dict)
    return daemon, img, data


def test_qemu_img_and_libnbd_tools_read_the_export(exported: tuple[Daemon, Path, dict]) -> None:
    need("qemu-img", "nbdinfo", "nbdcopy")
    d, img, exp = exported
    uri = str(exp["uri"])
    info = json.loads(run("qemu-img", "info", "--output=json", uri).stdout)
    assert info["virtual-size"] == 8 * MIB
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(img), uri)
    nbdinfo = json.loads(run("nbdinfo", "--json", uri).stdout)
    assert nbdinfo["structured"] is True  # libnbd negotiates structured replies
    (e,) = nbdinfo["exports"]
    assert e["export-size"] == 8 * MIB and e["is_read_only"] is False
    assert e["can_flush"] and e["can_fua"] and e["can_trim"] and e["can_zero"]
    assert "vol" in run("nbdinfo", "--list", uri).stdout
    copy = d.dir / "copy.img"
    run("nbdcopy", uri, str(copy))
    assert copy.read_bytes() == img.read_bytes()

    # writes through the export land in the backing file, and on the device's file
    src = d.dir / "new.img"
    new = make_image(src, 8 * MIB, seed="written over nbd")
    run("nbdcopy", "--flush", str(src), uri)
    assert img.read_bytes() == new
    assert read_at(d.path("vol"), 0, 8 * MIB) == new
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)
    (vol,) = [x for x in d.json("ls") if x["name"] == "vol"]  # type: ignore[union-attr]
    assert vol["exports"][0]["uri"] == uri
    d.request("unexport", name="vol")
    assert run("nbdinfo", uri, check=False).returncode != 0


def test_unix_socket_read_only_export(daemon: Daemon) -> None:
    need("nbdinfo", "nbdcopy")
    img = daemon.dir / "ro.img"
    data = make_image(img, 1 * MIB, seed="ro")
    daemon.create("ro", f"0 {MIB // S} linear {img} 0")
    exp = daemon.request("export", name="ro", address="unix:nbd.sock", read_only=True)
    assert isinstance(exp, dict)
    uri = str(exp["uri"])
    assert uri == f"nbd+unix:///ro?socket={daemon.dir / 'nbd.sock'}"
    assert oct(os.stat(daemon.dir / "nbd.sock").st_mode & 0o777) == "0o600"
    info = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
    assert info["is_read_only"] is True
    out = daemon.dir / "out.img"
    run("nbdcopy", uri, str(out))
    assert out.read_bytes() == data
    zeros = daemon.dir / "zeros.img"
    zeros.write_bytes(bytes(MIB))
    assert run("nbdcopy", str(zeros), uri, check=False).returncode != 0
    assert img.read_bytes() == data
    with pytest.raises(Exception, match="not a loopback address"):
        daemon.request("export", name="ro", address="0.0.0.0:0")


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    need("nbdkit")
    sock = tmp_path / "nbdkit.sock"
    proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", str(sock),
                             "memory", "64M"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, 20, what="nbdkit's socket")
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_linear_over_nbdkit_then_nbdkit_dies(daemon: Daemon, nbdkit: tuple) -> None:
    proc, sock = nbdkit
    uri = f"nbd+unix:///?socket={sock}"
    daemon.create("remote", f"0 {16 * MIB // S} linear {uri} {MIB // S}")
    assert daemon.table_lines("remote") == [f"0 {16 * MIB // S} linear {uri} {MIB // S}"]
    path = daemon.path("remote")
    assert read_at(path, 0, MIB) == bytes(MIB)  # nbdkit memory starts zeroed
    data = pattern("over nbd", 4 * MIB)
    write_at(path, 3 * MIB, data)
    assert read_at(path, 3 * MIB, 4 * MIB) == data
    if shutil.which("nbdcopy"):  # the bytes are on nbdkit, one MiB further on
        out = daemon.dir / "mem.img"
        run("nbdcopy", uri, str(out))
        with open(out, "rb") as f:
            f.seek(4 * MIB)
            assert f.read(4 * MIB) == data

    proc.kill()
    proc.wait(10)
    time.sleep(0.2)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.pread(fd, 4096, 0)
        assert exc.value.errno == errno.EIO
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, bytes(4096), 0)
        assert exc.value.errno == errno.EIO
    finally:
        with pytest.raises(OSError):  # the flush on close fails too
            os.close(fd)
    assert daemon.request("ping")
    daemon.request("remove", name="remote")
    assert daemon.alive()


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def test_shutdown_with_a_client_connected(daemon: Daemon) -> None:
    """The daemon's shutdown closes NBD connections first, then quiesces; a client in
    transmission sees the connection end, and the daemon exits 0 (the fixture checks)."""
    img = daemon.dir / "c.img"
    make_image(img, MIB, seed="c")
    daemon.create("c", f"0 {MIB // S} linear {img} 0")
    daemon.request("export", name="c", address="unix:c.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(daemon.dir / "c.sock"))
    try:
        nbd.decode_greeting(_recv(s, nbd.GREETING_SIZE))
        s.sendall(nbd.encode_client_flags(3) + nbd.encode_option(
            nbd.Opt.GO, nbd.encode_info_request("c")))
        while True:
            _, kind, n = nbd.decode_option_reply_header(_recv(s, 20))
            _recv(s, n)
            if kind == nbd.Rep.ACK:
                break
        s.sendall(nbd.encode_request(nbd.Request(nbd.Cmd.READ, 9, 0, 4096)))
        handle, error = nbd.decode_simple_reply(_recv(s, 16))
        assert (handle, error) == (9, 0) and _recv(s, 4096) == img.read_bytes()[:4096]
        (c,) = [x for x in daemon.json("info") if x["name"] == "c"]  # type: ignore[union-attr]
        assert c["open_count"] == 1 and c["exports"][0]["connections"] == 1
        daemon.request("shutdown")
        assert s.recv(1) == b""
        assert daemon.wait() == 0
    finally:
        s.close()


def _mirror_health(d: Daemon, name: str) -> tuple[str, str]:
    """(in-sync/total, health chars) of a two-leg mirror's status line."""
    data = d.request("status", name=name)
    assert isinstance(data, dict)
    words = data[name][0].split()
    return words[6], words[8]


def test_mirror_leg_on_nbdkit_fails_when_nbdkit_dies(daemon: Daemon, nbdkit: tuple) -> None:
    """A mirror whose second leg is an NBD export: resync copies onto it, and when the
    server dies the leg is marked failed (health D) while writes go on to the other leg."""
    proc, sock = nbdkit
    uri = f"nbd+unix:///?socket={sock}"
    size = 4 * MIB
    data = make_image(daemon.dir / "l0.img", size, seed="mirror l0")
    dev = daemon.create("m", f"0 {size // S} mirror core 1 128 2 l0.img 0 {uri} 0")
    wait_until(lambda: _mirror_health(daemon, "m") == ("64/64", "AA"), 60,
               what="the mirror in sync")
    if shutil.which("nbdcopy"):  # the resync copied leg 0 onto nbdkit
        out = daemon.dir / "leg1.img"
        run("nbdcopy", uri, str(out))
        assert out.read_bytes()[:size] == data
    proc.kill()
    proc.wait(10)
    new = pattern("after nbdkit died", 64 * 1024)
    write_at(dev, MIB, new, fsync=False)  # no handle_errors: the write completes on leg 0
    wait_until(lambda: _mirror_health(daemon, "m")[1] == "AD", 20, what="leg 1 failed")
    assert read_at(dev, MIB, len(new)) == new
    assert read_at(daemon.dir / "l0.img", MIB, len(new)) == new
    daemon.request("remove", name="m")
    assert daemon.alive()


def test_cli_export_and_unexport(daemon: Daemon) -> None:
    """``dmuser export``/``unexport``: the URI printed, the export in ``ls --json``,
    a refused address with one line and exit 1, and gone after unexport."""
    need("nbdinfo")
    img = daemon.dir / "c.img"
    make_image(img, MIB, seed="cli")
    daemon.create("c", f"0 {MIB // S} linear {img} 0")
    res = daemon.cli("export", "c", "unix:cli.sock", "--read-only")
    uri = res.stdout.strip()
    assert uri == f"nbd+unix:///c?socket={daemon.dir / 'cli.sock'}"
    listed = json.loads(daemon.cli("ls", "--json").stdout)
    assert listed[0]["exports"][0]["uri"] == uri and listed[0]["exports"][0]["read_only"]
    assert json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]["is_read_only"]
    bad = daemon.cli("export", "c", "0.0.0.0:0", check=False)
    assert bad.returncode == 1 and "not a loopback address" in bad.stderr
    assert len(bad.stderr.splitlines()) == 1
    daemon.cli("unexport", "c")
    assert "exports" not in json.loads(daemon.cli("ls", "--json").stdout)[0]
    assert run("nbdinfo", uri, check=False).returncode != 0
