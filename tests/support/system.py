"""The machine around the tests: mounts, loop devices, processes, the run registry,
file systems, and a thread for one blocking call.

Everything here is synchronous (subprocess, os): integration tests are plain
functions, never trio tests, because blocking FUSE I/O from inside the test
process must not stall an event loop.  Nothing here touches anything but what
a test (or a test run, through the registry) made itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

RUNS_DIR = ".dmuser-test-runs"


def in_ci() -> bool:
    """``CI`` is set (``1``/``true``/``yes``/``on``): a missing capability fails, not skips."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


# -- mounts, loop devices, processes ----------------------------------------------------


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def mounts() -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount seen by this process."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and right:
                result.append((_unescape(fields[4]), right.split()[0]))
    return result


def _under(path: str, base: str | os.PathLike[str]) -> bool:
    base = os.path.realpath(base)
    return path == base or path.startswith(base.rstrip("/") + "/")


def mounts_under(base: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Mounts at or below ``base``, deepest (last mounted) first."""
    return [m for m in reversed(mounts()) if _under(m[0], base)]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    real = os.path.realpath(path)
    return any(mp == real for mp, _ in mounts())


def loop_devices() -> list[tuple[str, str]]:
    """(device, backing file) of every loop device; empty if losetup is unusable."""
    if not shutil.which("losetup"):
        return []
    try:
        res = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if res.returncode != 0 or not res.stdout.strip():
        return []
    try:
        devs = json.loads(res.stdout).get("loopdevices", [])
    except ValueError:
        return []
    return [(d.get("name", ""), (d.get("back-file") or "").removesuffix(" (deleted)"))
            for d in devs]


def loops_under(base: str | os.PathLike[str]) -> list[str]:
    return [dev for dev, back in loop_devices() if back and _under(back, base)]


def umount(path: str, fuse: bool = False) -> bool:
    """Unmount ``path`` (lazily if a plain unmount fails).  True if it is gone."""
    cmds = [["umount", path], ["umount", "-l", path]]
    if fuse:
        cmds.insert(0, ["fusermount3", "-u", "-z", path])
    for cmd in cmds:
        if not shutil.which(cmd[0]):
            continue
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(cmd, capture_output=True, timeout=15)
        if not is_mounted(path):
            return True
    return not is_mounted(path)


def detach_loop(dev: str) -> None:
    for _ in range(50):
        res = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True, timeout=30)
        if res.returncode == 0 or "No such device" in res.stderr:
            return
        if not any(d == dev for d, _ in loop_devices()):
            return
        time.sleep(0.1)  # busy right after an unmount: retry


def proc_start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (to tell it from a reused pid), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    if fields and fields[0] in ("Z", "X"):
        return None  # a zombie is as good as dead
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    return proc_start_time(pid) is not None


def proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [os.fsdecode(w) for w in f.read().split(b"\0") if w]
    except OSError:
        return []


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.02,
               what: str = "") -> None:
    """Poll ``predicate`` until true; raise AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(interval)


# -- run registry and sweeps -----------------------------------------------------------
#
# Each test run registers itself in ``<basetemp parent>/.dmuser-test-runs/run-PID-START``:
# line 1 is its base temp dir, then one line per daemon it started.  The file
# lives outside the numbered ``pytest-N`` dirs, so pytest's own cleanup of old
# base temp dirs cannot erase what a crashed run left behind before we sweep it.

#: this run's registry file, set by :func:`register_run`
RUN_FILE: Path | None = None


def register_run(base: Path) -> Path:
    global RUN_FILE
    pid = os.getpid()
    runs = base.parent / RUNS_DIR
    runs.mkdir(exist_ok=True)
    RUN_FILE = runs / f"run-{pid}-{proc_start_time(pid)}"
    RUN_FILE.write_text(f"{os.path.realpath(base)}\n")
    return RUN_FILE


def register_daemon(pid: int, sock: str) -> None:
    if RUN_FILE is not None:
        with open(RUN_FILE, "a") as f:
            f.write(f"{pid} {proc_start_time(pid)} {sock}\n")


def dead_runs(parent: Path) -> list[Path]:
    """Registry files of test runs (with ``parent`` as basetemp parent) no longer alive."""
    dead = []
    with contextlib.suppress(OSError):
        for f in (parent / RUNS_DIR).iterdir():
            m = re.fullmatch(r"run-(\d+)-(\S+)", f.name)
            if m and proc_start_time(int(m[1])) != m[2]:
                dead.append(f)
    return dead


def sweep_run(run_file: Path, remove: bool = True) -> list[str]:
    """Sweep what the run of ``run_file`` left; delete the file if ``remove``."""
    try:
        base, *daemons = run_file.read_text().splitlines()
    except (OSError, ValueError):
        return []
    done = sweep(Path(base), daemons)
    if remove:
        with contextlib.suppress(OSError):
            run_file.unlink()
    return done


def sweep(base: Path, daemons: Sequence[str] = ()) -> list[str]:
    """Remove mounts, loop devices and daemons a test run left below ``base``.

    Only things identified by ``base`` are touched: mounts below it, loop
    devices whose backing file is below it, and the daemons listed (lines
    ``PID START SOCKET``) that are still the same process (start time) and
    still name that socket on their command line.
    """
    if not base.is_absolute() or len(base.parts) < 3:
        return []  # never sweep "/" or "/tmp" wholesale
    done: list[str] = []
    for mp, fstype in mounts_under(base):
        if not fstype.startswith("fuse"):
            umount(mp)
            done.append(f"unmounted {fstype} {mp}")
    for dev in loops_under(base):
        detach_loop(dev)
        done.append(f"detached {dev}")
    for line in daemons:
        with contextlib.suppress(ValueError):
            pid_s, start, sock = line.split(" ", 2)
            pid = int(pid_s)
            if proc_start_time(pid) == start and sock in proc_cmdline(pid) \
                    and _under(sock, base):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                done.append(f"killed daemon {pid} ({sock})")
    for mp, fstype in mounts_under(base):
        umount(mp, fuse=fstype.startswith("fuse"))
        done.append(f"unmounted {fstype} {mp}")
    return done


# -- one blocking call in a thread -------------------------------------------------------


class Io(threading.Thread):
    """One blocking call (``fn()``) in a daemon thread: ``result`` or ``error`` kept,
    ``done`` set when it returned.  Started at once unless ``start`` is false."""

    def __init__(self, fn: Callable[[], object], start: bool = True) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: object = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        if start:
            self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001  (reported to the test)
            self.error = exc
        finally:
            self.done.set()


# -- file systems -------------------------------------------------------------------------


def mkfs_ext4(dev: str | os.PathLike[str], *opts: str, extended: str = "nodiscard") -> None:
    """``mkfs.ext4 -q -F -E EXTENDED OPTS... DEV`` (one ``-E``: mke2fs keeps only the
    last), asserting success."""
    res = subprocess.run(["mkfs.ext4", "-q", "-F", "-E", extended, *opts, str(dev)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def fsck_clean(dev: str | os.PathLike[str]) -> str:
    """Assert that ``e2fsck -fn DEV`` finds nothing to fix; its stdout."""
    res = subprocess.run(["e2fsck", "-fn", str(dev)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, f"e2fsck -fn {dev}: exit {res.returncode}\n{res.stdout}{res.stderr}"
    return res.stdout


# -- this process -----------------------------------------------------------------------


def fds_open_on(path: os.PathLike[str] | str) -> int:
    """How many of this process's file descriptors point at ``path``."""
    target = os.path.realpath(path)
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                n += 1
        except OSError:
            pass
    return n


UDEVD = "/lib/systemd/systemd-udevd"


@contextlib.contextmanager
def udevd_running() -> Iterator[None]:
    """A udev daemon for the block: the one that runs, else one started here (as
    ``tools/fstests`` does; a microVM often boots without one) and stopped after.
    Raises RuntimeError if none runs and none can start."""
    def running() -> bool:
        return subprocess.run(["pgrep", "-x", "systemd-udevd"],
                              capture_output=True).returncode == 0
    if running():
        yield
        return
    if not os.access(UDEVD, os.X_OK):
        raise RuntimeError(f"no udev daemon runs and {UDEVD} is missing (install udev)")
    subprocess.run([UDEVD, "--daemon"], check=True, timeout=30,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = subprocess.run(["pgrep", "-n", "-x", "systemd-udevd"], capture_output=True,
                          text=True).stdout.split()
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
        wait_until(lambda: not running(), 10)


def need_tools(*tools: str) -> None:
    """Skip (fail under CI) unless every program in ``tools`` is on PATH."""
    import pytest

    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        msg = f"{', '.join(missing)} not found (scripts/setup installs them)"
        if in_ci():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def run_tool(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an external program (2 min at most); with ``check``, assert it exited 0."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check:
        assert res.returncode == 0, f"{' '.join(cmd)}: exit {res.returncode}\n{res.stderr}"
    return res
