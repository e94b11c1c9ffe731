"""The daemon's life cycle (docs/daemon.md): start, refusal, stale leftovers, signals.

Tests run real ``dmuser serve`` subprocesses on a FUSE mount below their tmp
dir; the ``make_daemon`` fixture stops them and cleans up even on failure (and
marks the test ``fuse``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from support.daemon import Daemon, dmuser_cmd, run_dmuser
from support.data import check_pattern_io, make_image, pattern, read_at, write_at
from support.system import is_mounted

MiB = 1 << 20


def _stat_errno(path: os.PathLike[str] | str) -> int | None:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno
    return None


# -- start -----------------------------------------------------------------------------


def test_background_serve_returns_when_mount_is_ready(make_daemon) -> None:
    d = make_daemon(start=False)
    make_image(d.dir / "a.img", 4 * MiB)
    t0 = time.monotonic()
    res = d.start_background()
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert f"serving {d.mnt}" in res.stdout
    assert d.pid is not None and d.alive()
    # No polling: the mount must be usable the moment serve returned.
    assert os.path.ismount(d.mnt)
    assert os.listdir(d.mnt) == []
    assert d.cli("ls").stdout == "No devices found\n"
    d.create("dev", "0 8192 linear a.img 0")
    assert os.listdir(d.mnt) == ["dev"]
    check_pattern_io(d.path("dev"), "bg")
    assert d.log_path.exists() and "serving" in d.log_text()
    assert elapsed < 20


def test_foreground_serve_until_shutdown_verb(make_daemon) -> None:
    d = make_daemon()
    make_image(d.dir / "a.img", 1 * MiB)
    d.create("dev", "0 2048 linear a.img 0")
    data = pattern("fg", 64 * 1024)
    write_at(d.path("dev"), 4096, data, fsync=False)
    assert d.cli("shutdown").returncode == 0
    assert d.wait() == 0
    assert not is_mounted(d.mnt)
    assert not d.sock.exists()
    # Acknowledged writes are durable after shutdown, even without an fsync.
    assert read_at(d.dir / "a.img", 4096, len(data)) == data


def test_second_serve_on_same_socket_is_refused(make_daemon, tmp_path) -> None:
    d = make_daemon()
    make_image(d.dir / "a.img", 1 * MiB)
    d.create("keep", "0 2048 linear a.img 0")
    other = tmp_path / "other-mnt"
    for mode in (["--foreground"], []):
        res = run_dmuser("serve", *mode, "--mountpoint", str(other), "--socket", str(d.sock),
                         "--log-file", str(tmp_path / "second.log"), check=False, timeout=30)
        assert res.returncode == 1, (mode, res)
        assert "already running" in res.stderr and str(d.pid) in res.stderr, res.stderr
        assert str(d.sock) in res.stderr
        assert not is_mounted(other)
    # Same mountpoint, another socket: refused too.
    res = run_dmuser("serve", "--foreground", "--mountpoint", str(d.mnt),
                     "--socket", str(tmp_path / "x.sock"), check=False, timeout=30)
    assert res.returncode == 1
    assert "already a mount point" in res.stderr and str(d.mnt) in res.stderr
    assert not (tmp_path / "x.sock").exists()
    # The first daemon is unharmed.
    assert d.alive()
    assert d.devices() == ["keep"]
    check_pattern_io(d.path("keep"), "still-serving")


@pytest.mark.parametrize("leftover", ["socket+mount", "mount-only"])
def test_stale_socket_and_mount_are_cleaned_by_next_serve(make_daemon, leftover) -> None:
    d = make_daemon()
    make_image(d.dir / "a.img", 1 * MiB)
    d.create("dev", "0 2048 linear a.img 0")
    data = pattern("before-kill", 8192)
    write_at(d.path("dev"), 0, data)
    d.signal(signal.SIGKILL)
    assert d.wait() == -signal.SIGKILL
    assert _stat_errno(d.mnt) == errno.ENOTCONN  # the stale FUSE mount
    assert d.sock.exists()
    if leftover == "mount-only":
        d.sock.unlink()
    d.start()  # same mountpoint and socket
    log = d.log_text()
    assert "unmounting stale FUSE mount" in log
    if leftover == "socket+mount":
        assert "removing stale control socket" in log
    assert os.listdir(d.mnt) == []
    d.create("dev", "0 2048 linear a.img 0")
    assert read_at(d.path("dev"), 0, len(data)) == data
    check_pattern_io(d.path("dev"), "after-restart", offset=65536)


# -- signals ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_cleanly(make_daemon, sig) -> None:
    d = make_daemon()
    make_image(d.dir / "a.img", 1 * MiB)
    d.create("dev", "0 2048 linear a.img 0")
    d.signal(sig)
    assert d.wait() == 0, d.log_tail()
    assert not is_mounted(d.mnt)
    assert _stat_errno(d.mnt) is None  # the plain directory again, not a dead mount
    assert not d.sock.exists()
    assert f"got {sig.name}" in d.log_text()
    res = d.cli("ls", check=False)
    assert res.returncode == 1 and "no dmuser daemon is listening" in res.stderr


RECORD = 4096

WRITER = r"""
import os, random, sys
path, nrec = sys.argv[1], int(sys.argv[2])
REC = 4096
def record(i):
    head = b"REC%08d" % i
    return head + random.Random(i).randbytes(REC - len(head))
out = sys.stdout
try:
    fd = os.open(path, os.O_WRONLY)
    for i in range(nrec):
        data = record(i)
        done = 0
        while done < REC:
            done += os.pwrite(fd, data[done:], i * REC + done)
        out.write(f"w {i}\n"); out.flush()
        os.fsync(fd)
        out.write(f"f {i}\n"); out.flush()
    out.write("done\n")
except OSError as exc:
    out.write(f"E {exc.errno} {exc.strerror}\n")
out.flush()
"""


def _record(i: int) -> bytes:
    head = b"REC%08d" % i
    import random
    return head + random.Random(i).randbytes(RECORD - len(head))


@pytest.mark.slow
def test_sigterm_during_writes_keeps_every_acknowledged_record(make_daemon) -> None:
    d = make_daemon()
    nrec = 4096
    img = d.dir / "a.img"
    make_image(img, nrec * RECORD)
    d.create("dev", f"0 {nrec * RECORD // 512} linear a.img 0")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(d.path("dev")), str(nrec)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    enough = threading.Event()

    def collect() -> None:
        assert writer.stdout is not None
        for line in writer.stdout:
            lines.append(line.strip())
            if sum(1 for x in lines if x.startswith("f ")) >= 50:
                enough.set()
        enough.set()

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        assert enough.wait(30), f"writer made no progress: {lines[-5:]}"
        assert writer.poll() is None, f"writer ended early: {lines[-5:]}"
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.log_tail()
        writer.wait(20)
        reader.join(10)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert not is_mounted(d.mnt) and not d.sock.exists()
    assert lines and lines[-1].startswith("E "), f"writer should end with an error: {lines[-3:]}"
    fsynced = [int(x.split()[1]) for x in lines if x.startswith("f ")]
    written = [int(x.split()[1]) for x in lines if x.startswith("w ")]
    assert len(fsynced) >= 50
    print(f"{len(written)} writes acknowledged, {len(fsynced)} fsynced, writer: {lines[-1]}")
    with open(img, "rb") as f:
        backing = f.read()
    for i in written:  # every fsynced record, and every acknowledged write (see daemon.md)
        got = backing[i * RECORD:(i + 1) * RECORD]
        assert got == _record(i), (f"record {i} (fsynced: {i in fsynced}) lost after "
                                   f"SIGTERM: starts {got[:16]!r}")


# -- help -------------------------------------------------------------------------------

VERBS = ["serve", "create", "reload", "remove", "suspend", "resume", "clear", "ls", "table",
         "status", "info", "targets", "message", "shutdown"]


def test_help_for_every_verb() -> None:
    res = run_dmuser("--help")
    assert res.returncode == 0 and "usage:" in res.stdout
    for verb in VERBS:
        assert verb in res.stdout
    from dmuser.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    choices = sorted(sub.choices)  # type: ignore[arg-type]
    assert set(VERBS) <= set(choices)
    for verb in choices:
        res = run_dmuser(verb, "--help")
        assert res.returncode == 0, (verb, res.stderr)
        if verb == "dmsetup":  # dmsetup's own usage text, on stderr as dmsetup prints it
            assert res.stderr.startswith("Usage:\n\ndmsetup"), res.stderr
            continue
        assert res.stdout.startswith(f"usage: dmuser {verb}"), res.stdout
    res = run_dmuser("--version")
    assert res.returncode == 0 and res.stdout.startswith("dmuser ")
    res = subprocess.run(dmuser_cmd(), capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "usage:" in res.stderr


def test_daemon_helper_cleans_up_after_itself(make_daemon, tmp_path) -> None:
    """The fixture's own contract: a stopped Daemon leaves no mount, socket or process."""
    d = make_daemon()
    make_image(d.dir / "a.img", 1 * MiB)
    d.create("dev", "0 2048 linear a.img 0")
    fd = os.open(d.path("dev"), os.O_RDWR)  # left open on purpose
    try:
        assert d.stop() == []
    finally:
        with contextlib.suppress(OSError):  # the device is gone: close may report it
            os.close(fd)
    assert not d.alive() and not is_mounted(d.mnt) and not d.sock.exists()
    again = Daemon(d.dir, name="again")
    make_daemon.adopt(again)
    again.start()
    assert os.listdir(again.mnt) == []
    assert again.alive()
