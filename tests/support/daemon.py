"""The daemon rig for tests that run the real daemon.

:class:`Daemon` runs ``python -m dmuser serve --foreground`` as a subprocess with
its mountpoint, control socket and log inside one directory of its own, waits
until the mount and the socket answer, drives the CLI (:meth:`Daemon.cli`) and,
in :meth:`Daemon.stop`, always puts the machine back: it unmounts what is
mounted below its directory, detaches loop devices backed by files below it,
stops the daemon (``dmuser shutdown``, then SIGTERM, then SIGKILL) and lazily
unmounts a mount the daemon left.  The ``daemon``/``make_daemon`` fixtures in
``tests/conftest.py`` wrap it (:class:`DaemonFactory`); :meth:`Daemon.unstack`
tears a test's device stacks down before that (see there when it is needed).

:func:`run_dmuser` runs the CLI without a daemon of its own.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .system import (
    detach_loop,
    is_mounted,
    loops_under,
    mounts_under,
    pid_alive,
    register_daemon,
    umount,
    wait_until,
)

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
CLI_TIMEOUT = 60.0

#: the checkout: the daemon subprocess imports dmuser from here
REPO = Path(__file__).resolve().parents[2]


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


# -- the daemon -------------------------------------------------------------------------


class Daemon:
    """One ``dmuser serve`` subprocess with everything it uses below ``self.dir``."""

    def __init__(self, dir: Path, name: str = "d", debug: bool = False,
                 block_devices: bool = False) -> None:
        self.name = name
        #: off unless asked for: a loop device per device costs time, and /dev/mapper
        #: names are global (tests that use them name their devices uniquely)
        self.block_devices = block_devices
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
                         "--socket", str(self.sock), *(["--debug"] if self.debug else []),
                         *self._block_option())
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
                         "--log-file", str(self.log_path), *self._block_option(), check=False,
                         timeout=timeout, cwd=self.dir)
        m = re.search(r"daemon (\d+) serving", res.stdout)
        if res.returncode == 0 and m:
            self.proc = None
            self.pid = int(m[1])
            self.returncode = None
            register_daemon(self.pid, str(self.sock))
        return res

    def _block_option(self) -> list[str]:
        return ["--block-devices"] if self.block_devices else ["--no-block-devices"]

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

    def __call__(self, name: str = "d", start: bool = True, debug: bool = False,
                 block_devices: bool = False) -> Daemon:
        d = Daemon(self.tmp_path / name, name=name, debug=debug, block_devices=block_devices)
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
