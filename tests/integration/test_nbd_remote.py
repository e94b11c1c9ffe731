"""NBD past one machine: TLS with real peers, two daemons, a remote leg that dies.

* A TLS export (``dmuser export --tls-cert/--tls-key``) read by ``nbdinfo``
  (``nbds://…?tls-certificates=DIR``) and ``qemu-img`` (``tls-creds-x509``),
  refused to the same tools without TLS; a client certificate required with
  ``--tls-ca``; the allow-list.
* One dmuser daemon exporting a device over TLS to a second daemon that uses it
  as a mirror leg (``nbds://``).
* As root: a 2-leg mirror whose second leg is ``nbdkit --tls=require`` in
  another network namespace, ext4 mounted on the mirror's /dev/mapper device;
  nbdkit killed mid-workload, the leg turns ``D``, the file system stays clean
  and every fsynced file is on the surviving leg; nbdkit back, ``reload``: the
  leg is reconnected, resynced (``AA``) and equal.

Certificates come from ``support.tls`` (openssl).  Missing tools skip, except
under ``CI=true``, where they fail.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon import Daemon, DaemonFactory
from support.data import make_image, pattern, read_at, write_at
from support.system import fsck_clean, in_ci, mkfs_ext4, wait_until
from support.system import need_tools as need
from support.system import run_tool as run
from support.tls import make_certs

S = 512
MIB = 1 << 20


def mirror_health(d: Daemon, name: str) -> tuple[str, str]:
    """(in-sync/total, health chars) of a two-leg mirror's status line."""
    data = d.request("status", name=name)
    assert isinstance(data, dict)
    words = data[name][0].split()
    return words[6], words[8]


def qemu_tls(certs: Path, port: str, export: str) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={certs},endpoint=client", "--image-opts",
            f"driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0"]


def test_tls_export_with_nbdinfo_and_qemu_img(daemon: Daemon, tmp_path: Path) -> None:
    need("nbdinfo", "nbdcopy", "qemu-img")
    certs = make_certs(tmp_path / "certs")
    img = daemon.dir / "vol.img"
    data = make_image(img, 4 * MIB, seed="tls vol")
    daemon.create("vol", f"0 {4 * MIB // S} linear {img} 0")
    # TLS lifts the loopback rule: the wildcard address, clients from loopback only
    res = daemon.cli("export", "vol", "0.0.0.0:0", "--tls-cert", str(certs / "server-cert.pem"),
                     "--tls-key", str(certs / "server-key.pem"), "--allow", "127.0.0.0/8")
    port = res.stdout.strip().rpartition(":")[2].partition("/")[0]
    uri = f"nbds://127.0.0.1:{port}/vol"
    tls_uri = f"{uri}?tls-certificates={certs}"
    info = json.loads(run("nbdinfo", "--json", tls_uri).stdout)
    assert info["exports"][0]["export-size"] == 4 * MIB
    copy = tmp_path / "copy.img"
    run("nbdcopy", tls_uri, str(copy))
    assert copy.read_bytes() == data
    new = make_image(tmp_path / "new.img", 4 * MIB, seed="written over tls")
    run("nbdcopy", "--flush", str(tmp_path / "new.img"), tls_uri)
    assert img.read_bytes() == new
    qinfo = json.loads(run("qemu-img", "info", "--output=json",
                           *qemu_tls(certs, port, "vol")).stdout)
    assert qinfo["virtual-size"] == 4 * MIB
    run("qemu-img", "compare", "--object",
        f"tls-creds-x509,id=tls0,dir={certs},endpoint=client", "--image-opts",
        f"driver=raw,file.driver=file,file.filename={tmp_path / 'new.img'}",
        f"driver=nbd,host=127.0.0.1,port={port},export=vol,tls-creds=tls0")
    # without TLS, neither tool gets in
    assert run("nbdinfo", f"nbd://127.0.0.1:{port}/vol", check=False).returncode != 0
    assert run("qemu-img", "info", f"nbd://127.0.0.1:{port}/vol", check=False).returncode != 0
    # a CA that did not sign the server's certificate: refused by the client
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(certs / "other-ca-cert.pem", other / "ca-cert.pem")
    assert run("nbdinfo", f"{uri}?tls-certificates={other}", check=False).returncode != 0
    daemon.cli("unexport", "vol")

    # --tls-ca: a client certificate signed by that CA is required
    daemon.cli("export", "vol", "127.0.0.1:0", "--tls-cert", str(certs / "server-cert.pem"),
               "--tls-key", str(certs / "server-key.pem"), "--tls-ca", str(certs / "ca-cert.pem"))
    (exp,) = daemon.info("vol")["exports"]
    anon = tmp_path / "anon"
    anon.mkdir()
    shutil.copy(certs / "ca-cert.pem", anon / "ca-cert.pem")
    assert run("nbdinfo", f"{exp['uri']}?tls-certificates={anon}", check=False).returncode != 0
    assert json.loads(run("nbdinfo", "--json", f"{exp['uri']}?tls-certificates={certs}")
                      .stdout)["exports"][0]["export-size"] == 4 * MIB
    # bad input: one line, exit 1, the daemon and the export still there
    bad = daemon.cli("export", "vol", "127.0.0.1:0", "--tls-cert", str(certs / "nope.pem"),
                     "--tls-key", str(certs / "server-key.pem"), check=False)
    assert bad.returncode == 1 and "TLS certificate or key" in bad.stderr
    assert len(bad.stderr.splitlines()) == 1
    assert daemon.info("vol")["exports"] == [exp]
    daemon.cli("unexport", "vol")


LIBNBD_SCRIPT = """
import hashlib, sys
import nbd
uri = sys.argv[1]
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_uri_allow_local_file(True)  # tls-certificates=DIR in the URI
h.connect_uri(uri)
new = bytes(range(256)) * 256
h.pwrite(new, 1048576 + 512, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(len(new), 1048576 + 512) == new
print(h.get_size(), hashlib.sha256(h.pread(h.get_size(), 0)).hexdigest())
h.shutdown()
"""


def test_python_libnbd_reads_and_writes_over_tls(daemon: Daemon, tmp_path: Path) -> None:
    """python3-libnbd (Debian's, for the system python3) against a TLS export."""
    python = "/usr/bin/python3"
    if subprocess.run([python, "-c", "import nbd"], capture_output=True).returncode != 0:
        msg = "python3-libnbd is not installed (scripts/setup installs it)"
        if in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    certs = make_certs(tmp_path / "certs")
    img = daemon.dir / "vol.img"
    data = bytearray(make_image(img, 2 * MIB, seed="libnbd"))
    daemon.create("vol", f"0 {2 * MIB // S} linear {img} 0")
    exp = daemon.request("export", name="vol", address="127.0.0.1:0",
                         tls_cert=str(certs / "server-cert.pem"),
                         tls_key=str(certs / "server-key.pem"))
    assert isinstance(exp, dict)
    out = run(python, "-c", LIBNBD_SCRIPT, f"{exp['uri']}?tls-certificates={certs}").stdout
    data[MIB + 512:MIB + 512 + 65536] = bytes(range(256)) * 256
    assert img.read_bytes() == data
    assert out.split() == [str(2 * MIB), hashlib.sha256(data).hexdigest()]


def test_a_daemon_exports_to_another_daemon_as_a_mirror_leg(make_daemon: DaemonFactory,
                                                            tmp_path: Path) -> None:
    """Daemon A exports ``vol`` over TLS; daemon B mirrors its local leg onto it."""
    certs = make_certs(tmp_path / "certs")
    a, b = make_daemon("a"), make_daemon("b")
    size = 8 * MIB
    make_image(a.dir / "remote.img", size, seed="stale remote")
    a.create("vol", f"0 {size // S} linear remote.img 0")
    exp = a.request("export", name="vol", address="127.0.0.1:0",
                    tls_cert=str(certs / "server-cert.pem"),
                    tls_key=str(certs / "server-key.pem"))
    assert isinstance(exp, dict)
    local = make_image(b.dir / "local.img", size, seed="local leg")
    leg = f"{exp['uri']}?tls-certificates={certs}"
    dev = b.create("m", f"0 {size // S} mirror core 2 1024 nosync 2 local.img 0 {leg} 0")
    assert mirror_health(b, "m") == ("16/16", "AA")  # nosync: taken as in sync
    b.reload("m", f"0 {size // S} mirror core 1 1024 2 local.img 0 {leg} 0")
    b.cli("resume", "m")  # a new table: a new connection, and a full resync
    wait_until(lambda: mirror_health(b, "m") == ("16/16", "AA"), 60, what="the resync")
    assert (a.dir / "remote.img").read_bytes() == local
    new = pattern("through both daemons", 3 * MIB)
    write_at(dev, MIB + 4096, new)
    expect = bytearray(local)
    expect[MIB + 4096:MIB + 4096 + len(new)] = new
    assert (b.dir / "local.img").read_bytes() == expect
    assert (a.dir / "remote.img").read_bytes() == expect
    assert read_at(a.path("vol"), 0, size) == expect
    (vol,) = a.json("info")  # type: ignore[misc]
    assert vol["open_count"] == 1 and vol["exports"][0]["connections"] == 1
    b.request("remove", name="m")
    wait_until(lambda: a.info("vol")["open_count"] == 0, 20, what="B's disconnection")


def test_a_server_that_stops_answering_then_reload_reconnects(
        make_daemon: DaemonFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nbdkit stopped (SIGSTOP: the connection stays open, nothing answers): I/O fails
    with EIO once ``nbd_timeout`` passes, the daemon stays up; a new nbdkit and a
    ``reload`` of the same table reconnect, and I/O works again."""
    need("nbdkit")
    monkeypatch.setenv("DMUSER_NBD_TIMEOUT", "1")
    d = make_daemon()
    sock = tmp_path / "kit.sock"
    cmd = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "memory", "16M"]
    kits: list[subprocess.Popen[bytes]] = []

    def start_kit() -> None:
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()  # left by the killed one
        kits.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_until(sock.exists, 20, what="nbdkit's socket")

    try:
        start_kit()
        table = f"0 {16 * MIB // S} linear nbd+unix:///?socket={sock} 0"
        path = d.create("r", table)
        data = pattern("before the stop", MIB)
        write_at(path, 0, data)
        kits[0].send_signal(signal.SIGSTOP)
        with pytest.raises(OSError) as exc:
            read_at(path, 2 * MIB, 4096)  # not in the page cache: reaches nbdkit
        assert exc.value.errno == errno.EIO
        assert "no reply within 1 s" in d.log_text()
        assert d.request("ping")
        kits[0].kill()
        start_kit()  # a new, empty server; the device reconnects only on a reload
        d.reload("r", table)
        d.cli("resume", "r")
        write_at(path, 0, data)
        assert read_at(path, 0, MIB) == data
        d.request("remove", name="r")
    finally:
        for kit in kits:
            kit.kill()
            kit.wait(10)


# -- a remote leg in another network namespace (root) ------------------------------------


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair: (its name, its address).
    Names and the /30 subnet derive from the pid; deleted (with the pair) after."""
    need("ip")
    pid = os.getpid()
    ns, veth = f"dmunbd{pid}", f"dmv{pid}"
    x = pid % 16384
    net = f"10.213.{x // 64}.{x % 64 * 4}"
    host, far = net[:net.rfind(".") + 1], None
    base = int(net.rsplit(".", 1)[1])
    host, far = f"{host}{base + 1}", f"{host}{base + 2}"
    try:
        for cmd in (["ip", "netns", "add", ns],
                    ["ip", "link", "add", f"{veth}a", "type", "veth", "peer", "name",
                     f"{veth}b", "netns", ns],
                    ["ip", "addr", "add", f"{host}/30", "dev", f"{veth}a"],
                    ["ip", "link", "set", f"{veth}a", "up"],
                    ["ip", "-n", ns, "addr", "add", f"{far}/30", "dev", f"{veth}b"],
                    ["ip", "-n", ns, "link", "set", f"{veth}b", "up"],
                    ["ip", "-n", ns, "link", "set", "lo", "up"]):
            run(*cmd)
        yield ns, far
    finally:
        run("ip", "netns", "del", ns, check=False)
        run("ip", "link", "del", f"{veth}a", check=False)  # gone with the namespace, later


class Nbdkit:
    """``nbdkit --tls=require file FILE`` on ``ADDR:10809`` inside namespace ``ns``."""

    def __init__(self, ns: str, addr: str, certs: Path, file: Path) -> None:
        self.cmd = ["ip", "netns", "exec", ns, "nbdkit", "-f", "--exit-with-parent",
                    "--tls=require", f"--tls-certificates={certs}", "-i", addr,
                    "-p", "10809", "file", str(file)]
        self.addr = addr
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_until(self._listening, 20, what="nbdkit in the namespace")

    def _listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((self.addr, 10809), 1):
            return True
        return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)


@pytest.mark.root
@pytest.mark.loop
@pytest.mark.fuse
@pytest.mark.mkfs
@pytest.mark.timeout(180)
def test_remote_leg_dies_under_ext4_then_resyncs(make_daemon: DaemonFactory, tmp_path: Path,
                                                 netns: tuple[str, str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    need("nbdkit", "debugfs")
    ns, far = netns
    certs = make_certs(tmp_path / "certs", far)
    monkeypatch.setenv("DMUSER_NBD_TIMEOUT", "10")
    d = make_daemon(block_devices=True)
    name = f"dmunbd{os.getpid()}m"
    mapper = Path("/dev/mapper") / name
    size = 64 * MIB
    leg0, leg1 = d.dir / "l0.img", tmp_path / "remote.img"
    for f in (leg0, leg1):
        with open(f, "wb") as fh:
            fh.truncate(size)
    server = Nbdkit(ns, far, certs, leg1)
    server.start()
    table = (f"0 {size // S} mirror core 1 1024 2 l0.img 0 "
             f"nbds://{far}/?tls-certificates={certs} 0")
    try:
        d.create(name, table.replace("core 1 1024", "core 2 1024 nosync"))  # both zero
        mkfs_ext4(mapper)
        fs = d.dir / "fs"
        d.mount(str(mapper), fs)
        acked: list[int] = []
        killed_after: list[int] = []  # how many files were acknowledged at the kill

        def workload() -> None:  # files fsynced one by one: each acknowledged when listed
            i = 0
            while not killed_after or i < killed_after[0] + 15:  # 15 more after the kill
                with open(fs / f"f{i}", "wb") as f:
                    f.write(pattern(i, 192 * 1024))
                    f.flush()
                    os.fsync(f.fileno())
                acked.append(i)
                i += 1

        writer = threading.Thread(target=workload, daemon=True)
        writer.start()
        wait_until(lambda: len(acked) >= 15, 60, what="the first writes")
        server.kill()
        killed_after.append(len(acked))
        writer.join(90)
        assert not writer.is_alive() and acked == list(range(killed_after[0] + 15))
        wait_until(lambda: mirror_health(d, name)[1] == "AD", 30, what="the leg marked dead")
        d.umount(fs)
        fsck_clean(mapper)
        fsck_clean(leg0)  # the surviving leg alone holds a clean file system ...
        for i in acked:  # ... with every acknowledged write on it
            got = subprocess.run(["debugfs", "-R", f"cat /f{i}", str(leg0)], check=True,
                                 capture_output=True, timeout=60).stdout
            assert got == pattern(i, 192 * 1024), f"f{i} on leg 0"

        server.start()  # the server comes back; reconnection is explicit: a reload
        d.reload(name, table)
        d.cli("resume", name)
        wait_until(lambda: mirror_health(d, name) == ("128/128", "AA"), 90, what="the resync")
        d.cli("suspend", name)  # quiesced: both legs final
        assert leg0.read_bytes() == leg1.read_bytes()
        d.cli("resume", name)
        d.request("remove", name=name)
    finally:
        server.kill()
        d.unstack()
        if mapper.is_symlink():
            mapper.unlink()
