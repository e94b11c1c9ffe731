"""Undo whatever the demo set up, whatever happened: after a failure or Ctrl-C too.

The order matters:

1. stop the writer (it may be blocked on a suspended device: it is joined later);
2. drop inactive tables and resume every device: a file system on a suspended
   device can neither thaw nor unmount;
3. join the writer, thaw a frozen file system;
4. unmount every mount below the work directory but the daemon's, deepest first
   (lazily if a plain unmount fails);
5. detach every loop device whose backing file is below the work directory;
6. remove the devices, stop the daemon (``dmuser shutdown``; SIGTERM, then
   SIGKILL, if it does not exit), lazily unmount its FUSE mount if it is left;
7. delete the work directory.

Only what lies below the demo's own work directory, and its own daemon, is
touched.  Returns what it did and what it could not undo.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from dmuser.demo.session import DemoFailed, Session, tool


def _under(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def mounts_below(base: str) -> list[str]:
    """Mount points at or below ``base``, the last mounted first."""
    base = os.path.realpath(base)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
                if _under(mp, base):
                    found.append(mp)
    return found[::-1]


def loops_below(base: str) -> list[str]:
    """Loop devices whose backing file lies below ``base``."""
    losetup = shutil.which("losetup", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if losetup is None:
        return []
    try:
        res = subprocess.run([losetup, "--list", "--json", "--output", "NAME,BACK-FILE"],
                             capture_output=True, text=True, timeout=20)
        devs = json.loads(res.stdout or "{}").get("loopdevices", [])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
    base = os.path.realpath(base)
    return [d["name"] for d in devs
            if _under((d.get("back-file") or "").removesuffix(" (deleted)"), base)]


def _quiet(s: Session, argv: list[str], timeout: float = 30.0) -> bool:
    try:
        return s.call(argv, argv[0], timeout=timeout).returncode == 0
    except (DemoFailed, OSError):
        return False


def _dm(s: Session, *args: str, timeout: float = 30.0) -> bool:
    return _quiet(s, [sys.executable, "-m", "dmuser", *args], timeout)


def _devices(s: Session) -> list[str] | None:
    """The daemon's devices, or None if it does not answer."""
    try:
        res = s.call([sys.executable, "-m", "dmuser", "ls", "--json"], "dmuser ls", timeout=20)
        data = json.loads(res.stdout) if res.returncode == 0 else None
    except (DemoFailed, ValueError):
        return None
    return [d["name"] for d in data] if isinstance(data, list) else None


def _ours(s: Session, pid: int | None) -> bool:
    """``pid`` is our daemon: alive, and its command line names our socket."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return s.sock in os.fsdecode(f.read()).split("\0")
    except OSError:
        return False


def _find_daemon(s: Session) -> int | None:
    """The pid of the daemon serving our socket (one interrupted start did not report)."""
    return next((int(e) for e in os.listdir("/proc") if e.isdigit() and _ours(s, int(e))),
                None)


def _stop_daemon(s: Session, done: list[str]) -> None:
    names = _devices(s)
    deadline = time.monotonic() + 10
    while names is None and _ours(s, s.daemon_pid) and time.monotonic() < deadline:
        time.sleep(0.2)  # still starting up: wait until it answers
        names = _devices(s)
    if names is not None:
        for _ in range(3):  # users before the devices they stack on: retry what is held
            for name in reversed(names):
                if _dm(s, "remove", name):
                    done.append(f"removed device {name}")
            names = _devices(s) or []
            if not names:
                break
        if _dm(s, "shutdown"):
            done.append("stopped the daemon")
    deadline = time.monotonic() + 20
    while (os.path.ismount(s.mountpoint) or _ours(s, s.daemon_pid)) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if _ours(s, s.daemon_pid):
            assert s.daemon_pid is not None
            os.kill(s.daemon_pid, sig)
            done.append(f"sent {sig.name} to daemon {s.daemon_pid}")
            time.sleep(2)
    if os.path.ismount(s.mountpoint) and not _quiet(s, ["fusermount3", "-u", "-z",
                                                         s.mountpoint]):
        _quiet(s, ["umount", "-l", s.mountpoint])


def cleanup(s: Session) -> tuple[list[str], list[str]]:
    """Undo everything; (what was done, what is left)."""
    done: list[str] = []
    if s.daemon_pid is None:
        s.daemon_pid = _find_daemon(s)
    if s.writer is not None:
        s.writer.stop()
    names = _devices(s)
    for name in names or []:
        _dm(s, "clear", name)
        _dm(s, "resume", name)
    if s.writer is not None:
        s.writer.join(30)
        s.writer = None
    if s.frozen is not None:
        _quiet(s, [tool("fsfreeze"), "--unfreeze", s.frozen])
        done.append(f"thawed {s.frozen}")
        s.frozen = None
    fuse = os.path.realpath(s.mountpoint)
    for mp in mounts_below(s.work):
        if mp != fuse:
            if not _quiet(s, ["umount", mp], 60):
                _quiet(s, ["umount", "-l", mp])
            done.append(f"unmounted {mp}")
    for dev in loops_below(s.work):
        for _ in range(50):  # busy for a moment after an unmount
            if _quiet(s, ["losetup", "--detach", dev]) or dev not in loops_below(s.work):
                break
            time.sleep(0.1)
        done.append(f"detached {dev}")
    s.mounts.clear()
    s.loops.clear()
    if names is not None or os.path.ismount(s.mountpoint) or _ours(s, s.daemon_pid):
        _stop_daemon(s, done)
    shutil.rmtree(s.work, ignore_errors=True)
    left = [f"mount {mp}" for mp in mounts_below(s.work)]
    left += [f"loop device {dev}" for dev in loops_below(s.work)]
    if _ours(s, s.daemon_pid):
        left.append(f"daemon {s.daemon_pid}")
    if os.path.exists(s.work):
        left.append(f"directory {s.work}")
    return done, left
