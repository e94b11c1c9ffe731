"""Helpers for tests that run the real daemon: :class:`Daemon`, byte patterns, sweeps.

``Daemon`` runs ``python -m dmuser serve --foreground`` as a subprocess with
its mountpoint, control socket and log inside one directory of its own,
waits until the mount and the socket answer, drives the CLI (:meth:`Daemon.cli`)
and, in :meth:`Daemon.stop`, always puts the machine back: it unmounts what is
mounted below its directory, detaches loop devices backed by files below it,
stops the daemon (``dmuser shutdown``, then SIGTERM, then SIGKILL) and lazily
unmounts a mount the daemon left.  The ``daemon``/``make_daemon`` fixtures in
``conftest.py`` wrap it; :meth:`Daemon.unstack` tears a test's device stacks
down before that (see there when it is needed).

Also: :class:`Io` (one blocking call in a thread), :func:`mkfs_ext4` and
:func:`fsck_clean`.  The mirror's disk log is decoded by ``mirror_log.py``.

Everything here is synchronous (subprocess, os): integration tests are plain
functions, never trio tests, because blocking FUSE I/O from inside the test
process must not stall an event loop.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

SECTOR = 512
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
CLI_TIMEOUT = 60.0

RUNS_DIR = ".dmuser-test-runs"

REPO = Path(__file__).resolve().parent.parent


class DaemonError(AssertionError):
    pass


# -- running the CLI -------------------------------------------------------------------


def dmuser_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dmuser", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DMUSER_SOCKET", None)
    env.pop("DMUSER_MOUNTPOINT", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_dmuser(*args: str, input: str | None = None, check: bool = True,
               timeout: float = CLI_TIMEOUT, cwd: str | os.PathLike[str] | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dmuser ARGS`` (no socket added); text mode, output captured."""
    cmd = dmuser_cmd(*args)
    res = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout,
                         cwd=cwd, env=env or _env(),
                         stdin=None if input is not None else subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise DaemonError(f"{' '.join(args)} exited {res.returncode}\n"
                          f"stdout: {res.stdout}\nstderr: {res.stderr}")
    return res


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


# -- the daemon -------------------------------------------------------------------------


class Daemon:
    """One ``dmuser serve`` subprocess with everything it uses below ``self.dir``."""

    def __init__(self, dir: Path, name: str = "d", debug: bool = False) -> None:
        self.name = name
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.mnt = self.dir / "mnt"
        self.sock = self.dir / "s.sock"
        self.log_path = self.dir / "daemon.log"
        self.debug = debug
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.returncode: int | None = None
        self.loops: list[str] = []
        self.fs_mounts: list[str] = []
        #: set when a test provokes tracebacks on purpose
        self.allow_tracebacks = False
        self._log_fh = None

    def __repr__(self) -> str:
        return f"Daemon({str(self.dir)!r}, pid={self.pid})"

    # -- life cycle -----------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> Daemon:
        """Start ``serve --foreground``; return once the mount and the socket answer."""
        cmd = dmuser_cmd("serve", "--foreground", "--mountpoint", str(self.mnt),
                         "--socket", str(self.sock), *(["--debug"] if self.debug else []))
        self._log_fh = open(self.log_path, "ab")  # noqa: SIM115
        self.returncode = None
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_fh,
                                     stderr=subprocess.STDOUT, env=_env(), cwd=self.dir,
                                     start_new_session=True)
        self.pid = self.proc.pid
        register_daemon(self.pid, str(self.sock))
        self.wait_ready(timeout)
        return self

    def start_background(self, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """``dmuser serve`` in its default (detaching) mode; records the daemon's pid."""
        res = run_dmuser("serve", "--mountpoint", str(self.mnt), "--socket", str(self.sock),
                         "--log-file", str(self.log_path), check=False, timeout=timeout,
                         cwd=self.dir)
        m = re.search(r"daemon (\d+) serving", res.stdout)
        if res.returncode == 0 and m:
            self.proc = None
            self.pid = int(m[1])
            self.returncode = None
            register_daemon(self.pid, str(self.sock))
        return res

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        from dmuser import client

        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise DaemonError(f"daemon exited with status {self.returncode} before it was "
                                  f"ready:\n{self.log_tail()}")
            if os.path.ismount(self.mnt) and client.ping(str(self.sock)) is not None:
                return
            if time.monotonic() > deadline:
                raise DaemonError(f"daemon not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.02)

    def alive(self) -> bool:
        if self.proc is not None:
            rc = self.proc.poll()
            if rc is not None:
                self.returncode = rc
                return False
            return True
        return self.pid is not None and pid_alive(self.pid)

    def signal(self, sig: int) -> None:
        assert self.pid is not None
        os.kill(self.pid, sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Wait for the daemon to exit; its status (None if it was not our child)."""
        if self.proc is not None:
            try:
                self.returncode = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise DaemonError(f"daemon {self.pid} still running after {timeout:.0f} s:\n"
                                  f"{self.log_tail()}") from None
            return self.returncode
        wait_until(lambda: not self.alive(), timeout, what=f"daemon {self.pid} to exit")
        return None

    def stop(self) -> list[str]:
        """Put everything back, whatever state the test left.  Returns problems seen."""
        if self.alive() and (self._other_mounts() or loops_under(self.dir)):
            self._resume_all()  # a suspended device would hang the unmount
        problems = self.unmount_and_detach()
        requested = False
        if self.alive():
            requested = True
            with contextlib.suppress(Exception):
                # in process, no fork: a child inheriting an open device file
                # could block in close() on a suspended device
                self.request("shutdown")
            try:
                self.wait(STOP_TIMEOUT)
            except (DaemonError, AssertionError):
                problems.append("daemon did not exit after 'dmuser shutdown'; sent SIGTERM")
                self._terminate()
            if self.returncode not in (0, None):
                problems.append(f"daemon exited with status {self.returncode} on shutdown")
        if is_mounted(self.mnt) or _enotconn(self.mnt):
            if requested and not self.alive():
                problems.append(f"{self.mnt} still mounted after the daemon exited")
            umount(str(self.mnt), fuse=True)
        if requested and self.sock.exists():
            problems.append(f"socket {self.sock} left after shutdown")
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        if not self.allow_tracebacks and "Traceback" in self.log_text():
            problems.append(f"traceback in daemon log {self.log_path}")
        return problems

    def _resume_all(self) -> None:
        """Resume every device (in process).  Raises if the daemon does not answer."""
        for name in self.devices():
            with contextlib.suppress(Exception):
                self.request("resume", name=name)

    def _other_mounts(self) -> list[str]:
        """Mounts below ``self.dir`` other than the daemon's own, deepest first."""
        own = os.path.realpath(self.mnt)
        return [mp for mp, _ in mounts_under(self.dir) if mp != own]

    def unmount_and_detach(self) -> list[str]:
        """Unmount what is mounted below ``self.dir`` (but the daemon's own mount), then
        detach the loop devices backed by files below it (also after the daemon died);
        the problems seen."""
        problems = [f"cannot unmount {mp}" for mp in self._other_mounts() if not umount(mp)]
        self.fs_mounts.clear()
        for dev in dict.fromkeys(self.loops + loops_under(self.dir)):
            detach_loop(dev)
        self.loops.clear()
        return problems

    def unstack(self) -> None:
        """Tear down what a test set up, while the daemon runs: resume every device,
        unmount and detach everything below ``self.dir``, then remove every device,
        users before the devices they stack on.  Errors are ignored (``stop()``, which
        runs after, reports what is left); a daemon not running is left alone.

        For the teardown of tests that stack devices and suspend the lower ones: the
        daemon's shutdown quiesces a stack top-down, but the final flush of a device
        stacked on one the test left suspended waits for a resume that never comes.
        Resuming first also keeps an unmount from hanging on a suspended device.
        """
        if not self.alive():
            return
        with contextlib.suppress(Exception):
            self._resume_all()
        self.unmount_and_detach()
        with contextlib.suppress(Exception):
            for _ in range(10):
                names = self.devices()
                if not names:
                    break
                for name in names:  # a device still held fails, and goes next round
                    with contextlib.suppress(Exception):
                        self.request("remove", name=name)

    def _terminate(self) -> None:
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if not self.alive():
                return
            with contextlib.suppress(ProcessLookupError):
                self.signal(sig)
            with contextlib.suppress(DaemonError, AssertionError):
                self.wait(wait)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- the CLI ----------------------------------------------------------------------

    def cli(self, *args: str, input: str | None = None, check: bool = True,
            timeout: float = CLI_TIMEOUT, cwd: str | os.PathLike[str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """``python -m dmuser ARGS --socket SOCK`` run in ``cwd`` (default: ``self.dir``)."""
        return run_dmuser(*args, "--socket", str(self.sock), input=input, check=check,
                          timeout=timeout, cwd=cwd or self.dir)

    def request(self, verb: str, **fields: object) -> object:
        """One control request in process (no CLI subprocess): fast, for checks.

        Returns the reply's ``data``; a failed request raises DaemonError.
        """
        from dmuser import client

        req = {"verb": verb, "cwd": str(self.dir), **fields}
        reply = client.request(str(self.sock), req, timeout=CLI_TIMEOUT)
        if not reply.get("ok"):
            raise DaemonError(f"{verb} {fields}: {reply.get('error')}")
        return reply.get("data")

    def json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "--json").stdout)

    def create(self, name: str, table: str) -> Path:
        """Create device ``name`` from ``table`` (';' or newline separated); its file."""
        self.cli("create", name, "--table", table)
        return self.path(name)

    def reload(self, name: str, table: str) -> None:
        self.cli("reload", name, "--table", table)

    def path(self, name: str) -> Path:
        return self.mnt / name

    def info(self, name: str) -> dict:  # type: ignore[type-arg]
        data = self.request("info", name=name)
        assert isinstance(data, list) and len(data) == 1, data
        return data[0]

    def devices(self) -> list[str]:
        data = self.request("ls")
        assert isinstance(data, list), data
        return [d["name"] for d in data]

    def table_lines(self, name: str, inactive: bool = False) -> list[str]:
        """The device's table lines, trailing blanks stripped."""
        data = self.request("table", name=name, inactive=inactive)
        assert isinstance(data, dict), data
        return [line.rstrip() for line in data[name]]

    # -- loop devices and mounts (undone by stop()) -------------------------------------

    def losetup(self, path: str | os.PathLike[str], *opts: str) -> str:
        res = subprocess.run(["losetup", "-f", "--show", *opts, str(path)],
                             capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise DaemonError(f"losetup {path} failed: {res.stderr}")
        dev = res.stdout.strip()
        self.loops.append(dev)
        return dev

    def detach(self, dev: str) -> None:
        detach_loop(dev)
        if dev in self.loops:
            self.loops.remove(dev)

    def mount(self, dev: str, target: str | os.PathLike[str], *opts: str) -> None:
        os.makedirs(target, exist_ok=True)
        subprocess.run(["mount", *opts, dev, str(target)], check=True, capture_output=True,
                       timeout=60)
        self.fs_mounts.append(str(target))

    def umount(self, target: str | os.PathLike[str]) -> None:
        subprocess.run(["umount", str(target)], check=True, capture_output=True, timeout=60)
        if str(target) in self.fs_mounts:
            self.fs_mounts.remove(str(target))

    @contextlib.contextmanager
    def loop_mounted(self, dev: str | os.PathLike[str], target: str | os.PathLike[str],
                     *mount_opts: str, loop_opts: Sequence[str] = ()) -> Iterator[str]:
        """``losetup LOOP_OPTS DEV`` and mount the loop device on ``target`` with
        ``mount_opts``; yields the loop device; unmounts and detaches after the block.
        When the block raises, that is left to :meth:`stop` (which resumes suspended
        devices first, so that the unmount cannot hang)."""
        loop = self.losetup(dev, *loop_opts)
        self.mount(loop, target, *mount_opts)
        yield loop
        self.umount(target)
        self.detach(loop)


def _enotconn(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


class DaemonFactory:
    """Makes daemons below one test's tmp dir and stops them all at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.daemons: list[Daemon] = []

    def __call__(self, name: str = "d", start: bool = True, debug: bool = False) -> Daemon:
        d = Daemon(self.tmp_path / name, name=name, debug=debug)
        self.daemons.append(d)
        if start:
            d.start()
        return d

    def adopt(self, d: Daemon) -> Daemon:
        """Have teardown stop ``d`` too (e.g. a second daemon on the same directory)."""
        self.daemons.append(d)
        return d

    def stop_all(self) -> list[str]:
        problems = []
        for d in reversed(self.daemons):
            try:
                problems += [f"{d.name}: {p}" for p in d.stop()]
            except Exception as exc:  # keep stopping the others
                problems.append(f"{d.name}: teardown error {exc!r}")
        return problems


# -- byte patterns ----------------------------------------------------------------------


def pattern(seed: int | str, nbytes: int) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(nbytes)


def make_image(path: str | os.PathLike[str], nbytes: int, seed: int | str | None = None) -> bytes:
    """Create an image file of ``nbytes`` (sparse zeros, or a pattern); its content."""
    data = bytes(nbytes) if seed is None else pattern(seed, nbytes)
    with open(path, "wb") as f:
        if seed is None:
            f.truncate(nbytes)
        else:
            f.write(data)
    return data


def sha(path: str | os.PathLike[str], offset: int = 0, nbytes: int | None = None) -> str:
    """sha256 (hex) of ``nbytes`` of a file from ``offset`` (default: to its end),
    read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = os.fstat(f.fileno()).st_size - offset if nbytes is None else nbytes
        while left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                raise EOFError(f"{path}: short read at byte {f.tell()}")
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def write_at(path: str | os.PathLike[str], offset: int, data: bytes, fsync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: str | os.PathLike[str], offset: int, nbytes: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        done = 0
        while done < nbytes:
            chunk = os.pread(fd, nbytes - done, offset + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def assert_bytes(actual: bytes, expected: bytes, what: str = "data") -> None:
    """Assert equality with a short message (first differing offset) instead of a huge diff."""
    if actual == expected:
        return
    n = min(len(actual), len(expected)) if len(actual) != len(expected) else len(actual)
    first = next((i for i in range(n) if actual[i] != expected[i]), n)
    raise AssertionError(f"{what}: mismatch at byte {first} (got {len(actual)} bytes, "
                         f"expected {len(expected)}): got {actual[first:first + 16].hex()} "
                         f"expected {expected[first:first + 16].hex()}")


def verify_at(path: str | os.PathLike[str], offset: int, expected: bytes, what: str = "") -> None:
    assert_bytes(read_at(path, offset, len(expected)), expected,
                 what or f"{path} at byte {offset}")


def check_pattern_io(path: str | os.PathLike[str], seed: int | str, offset: int = 0,
                     nbytes: int = 64 * 1024) -> None:
    """Write a fresh pattern through ``path``, fsync, read it back."""
    data = pattern(f"{seed}-{time.monotonic_ns()}", nbytes)
    write_at(path, offset, data)
    verify_at(path, offset, data)


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


@contextlib.contextmanager
def open_fd(path: str | os.PathLike[str], flags: int = os.O_RDWR) -> Iterator[int]:
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def table(*lines: str) -> str:
    return "\n".join(lines)


def sectors(nbytes: int) -> int:
    assert nbytes % SECTOR == 0
    return nbytes // SECTOR


__all__: Sequence[str] = [name for name in dir() if not name.startswith("_")]
