"""A private ``dmuser serve`` for a test session, and the sweep that undoes it.

Why a module of its own: the fixtures (``dmuser.pytest_plugin``) need a daemon
whose whole footprint -- mountpoint, control socket, log, image files, and any
loop device or mount a test makes on top -- sits below one directory that
nothing else uses.  Knowing that directory is enough to put the machine back,
even after the pytest process that made it was killed.

Guarantees:

* :meth:`PrivateDaemon.start` returns only once the FUSE mount is up and the
  socket answers (``ping``); a daemon that dies first raises with its log.
* :meth:`PrivateDaemon.stop` never raises and always ends with nothing left:
  mounts and loop devices below the directory are undone, the daemon is asked
  to shut down, then the mount is lazily unmounted (``fusermount3 -u -z``,
  ``umount -l``) and the process killed if it is still there, and the directory
  is deleted.
* :func:`sweep_dir` does the same from nothing but the directory (the daemon's
  pid is read from ``owner``), and :func:`sweep_dead` applies it to every
  directory below a base whose pytest process is gone.  Only directories named
  ``dmuser-pytest-*`` that hold an ``owner`` file are ever touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dmuser import client

__all__ = ["DIR_PREFIX", "PrivateDaemon", "base_dir", "sweep_dead", "sweep_dir"]

#: every directory the plugin makes is named like this, directly below :func:`base_dir`
DIR_PREFIX = "dmuser-pytest-"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0


def base_dir() -> Path:
    """Where the plugin's directories go: ``$DMUSER_PYTEST_TMPDIR``, else the system temp
    dir.  Kept short on purpose: a Unix socket path holds at most 107 bytes."""
    return Path(os.environ.get("DMUSER_PYTEST_TMPDIR") or tempfile.gettempdir())


# -- the machine: mounts, loop devices, processes -------------------------------------


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` (tells it from a reused pid); None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    if not fields or fields[0] in ("Z", "X"):
        return None
    return fields[19] if len(fields) > 19 else None


def _under(path: str, base: Path) -> bool:
    root = os.path.realpath(base).rstrip("/")
    return path == root or path.startswith(root + "/")


def mounts_under(base: Path) -> list[tuple[str, str]]:
    """(mountpoint, fstype) of the mounts at or below ``base``, last mounted first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and right:
                mp = fields[4].replace("\\040", " ").replace("\\134", "\\")
                if _under(mp, base):
                    found.append((mp, right.split()[0]))
    return found[::-1]


def loops_under(base: Path) -> list[str]:
    """Loop devices whose backing file is below ``base``; [] without losetup."""
    if not shutil.which("losetup"):
        return []
    try:
        res = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
                             capture_output=True, text=True, timeout=10)
        devs = json.loads(res.stdout or "{}").get("loopdevices", [])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
    return [d["name"] for d in devs
            if _under((d.get("back-file") or "").removesuffix(" (deleted)"), base)]


def unmount(path: str, fuse: bool = False) -> None:
    """Unmount ``path``: plainly, then lazily (``fusermount3 -u -z`` first for FUSE)."""
    cmds = [["umount", path], ["umount", "-l", path]]
    if fuse:
        cmds.insert(0, ["fusermount3", "-u", "-z", path])
    for cmd in cmds:
        if not any(mp == path for mp, _ in mounts_under(Path(path))):
            return
        if shutil.which(cmd[0]):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(cmd, capture_output=True, timeout=15)


def detach_loop(dev: str) -> None:
    for _ in range(30):  # busy for a moment right after an unmount
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            res = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True,
                                 timeout=15)
            if res.returncode == 0 or "No such device" in res.stderr:
                return
        time.sleep(0.1)


def undo_mounts_and_loops(base: Path, keep: str | None = None) -> None:
    """Unmount every mount below ``base`` but ``keep`` (kernel ones and fuse2fs ones),
    then detach the loops."""
    for mp, fstype in mounts_under(base):
        if mp != keep:
            unmount(mp, fuse=fstype.startswith("fuse"))
    for dev in loops_under(base):
        detach_loop(dev)


def _kill(pid: int, start: str | None) -> None:
    """SIGTERM, then SIGKILL, ``pid`` -- only while it is the process started at ``start``."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if start is None or _start_time(pid) != start:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _start_time(pid) == start and time.monotonic() < deadline:
            time.sleep(0.05)


# -- owner records and sweeps --------------------------------------------------------------


def _read_owner(d: Path) -> dict[str, object]:
    try:
        data = json.loads((d / "owner").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def sweep_dir(d: Path) -> None:
    """Put back everything made below ``d`` (a plugin directory) and delete it."""
    if not d.name.startswith(DIR_PREFIX) or not (d / "owner").exists():
        return
    owner = _read_owner(d)
    undo_mounts_and_loops(d, keep=os.path.realpath(d / "mnt"))
    for mp, fstype in mounts_under(d):
        unmount(mp, fuse=fstype.startswith("fuse"))
    pid, start = owner.get("daemon_pid"), owner.get("daemon_start")
    if isinstance(pid, int) and (isinstance(start, str) or start is None):
        _kill(pid, start)
    for mp, fstype in mounts_under(d):
        unmount(mp, fuse=fstype.startswith("fuse"))
    if not mounts_under(d):
        shutil.rmtree(d, ignore_errors=True)


def sweep_dead(base: Path | None = None) -> list[Path]:
    """Sweep the plugin directories below ``base`` whose pytest process is gone."""
    swept = []
    base = base or base_dir()
    with contextlib.suppress(OSError):
        for d in base.iterdir():
            if not d.name.startswith(DIR_PREFIX) or not d.is_dir():
                continue
            owner = _read_owner(d)
            pid = owner.get("pytest_pid")
            if isinstance(pid, int) and _start_time(pid) != owner.get("pytest_start"):
                sweep_dir(d)
                swept.append(d)
    return swept


# -- the daemon ----------------------------------------------------------------------------


class PrivateDaemon:
    """``dmuser serve --foreground`` in a directory of its own (see the module docstring).

    ``dir/mnt`` is the mountpoint, ``dir/s.sock`` the socket, ``dir/daemon.log``
    the log, ``dir/images`` where the device factory puts image files.
    """

    def __init__(self, serve_args: tuple[str, ...] = ()) -> None:
        base = base_dir()
        base.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=base))
        self.mountpoint = self.dir / "mnt"
        self.socket = self.dir / "s.sock"
        self.log_path = self.dir / "daemon.log"
        self.images = self.dir / "images"
        self.images.mkdir()
        self.serve_args = serve_args
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_owner()
        self.client = client.Client(self.socket, timeout=60.0)

    def __repr__(self) -> str:
        return f"PrivateDaemon({str(self.dir)!r})"

    def _write_owner(self) -> None:
        me = os.getpid()
        pid = self.proc.pid if self.proc is not None else None
        owner = {"pytest_pid": me, "pytest_start": _start_time(me), "daemon_pid": pid,
                 "daemon_start": _start_time(pid) if pid is not None else None}
        (self.dir / "owner").write_text(json.dumps(owner))

    def start(self, timeout: float = START_TIMEOUT) -> PrivateDaemon:
        """Start the daemon; return once its mount is up and its socket answers."""
        cmd = [sys.executable, "-m", "dmuser", "serve", "--foreground",
               "--mountpoint", str(self.mountpoint), "--socket", str(self.socket),
               *self.serve_args]
        env = {k: v for k, v in os.environ.items()
               if k not in ("DMUSER_SOCKET", "DMUSER_MOUNTPOINT")}
        with open(self.log_path, "ab") as log:
            # a session of its own: a Ctrl-C meant for pytest must not kill the daemon
            # before the teardown has unmounted what sits on its devices
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=self.dir,
                                         start_new_session=True)
        self._write_owner()
        deadline = time.monotonic() + timeout
        while not (os.path.ismount(self.mountpoint) and client.ping(str(self.socket))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with status {self.proc.returncode}"
                       if self.proc.returncode is not None else f"not ready in {timeout} s")
                log_text = self.log_text()
                self.stop()
                raise RuntimeError(f"dmuser daemon {why}:\n{log_text}")
            time.sleep(0.02)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def remove_all_devices(self) -> None:
        """Resume every device, then remove them all, users before what they stack on
        (a device still in use fails and is tried again next round).  Errors ignored."""
        with contextlib.suppress(Exception):
            for name in self.client.ls():
                with contextlib.suppress(Exception):
                    self.client.resume(name)
            for _ in range(10):
                names = list(self.client.ls())
                if not names:
                    return
                for name in reversed(names):
                    with contextlib.suppress(Exception):
                        self.client.remove(name)

    def stop(self) -> None:
        """Leave nothing behind (see the module docstring).  Never raises."""
        try:
            if self.alive():
                with contextlib.suppress(Exception):  # a suspended device hangs an unmount
                    for name in self.client.ls():
                        with contextlib.suppress(Exception):
                            self.client.resume(name)
            undo_mounts_and_loops(self.dir, keep=os.path.realpath(self.mountpoint))
            if self.alive():
                self.remove_all_devices()
                with contextlib.suppress(Exception):
                    self.client.shutdown()
                assert self.proc is not None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(STOP_TIMEOUT)
            for mp, fstype in mounts_under(self.dir):
                unmount(mp, fuse=fstype.startswith("fuse"))
            if self.proc is not None and self.proc.poll() is None:
                _kill(self.proc.pid, _start_time(self.proc.pid))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        finally:
            sweep_dir(self.dir)
