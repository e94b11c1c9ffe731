"""The machine side of an fstests run (stdlib only; used by ``tools/fstests``).

:class:`Rig` makes one file system's TEST, SCRATCH and LOGWRITES loop devices
on sparse image files, a private dmuser daemon with block devices, the
``dmsetup`` shim and the ``local.config``; :meth:`Rig.down` undoes all of it
and may be called any number of times, also after a partial :meth:`Rig.up`.
:class:`Udevd` starts ``systemd-udevd`` only when none runs and stops only the
one it started (by pid).  :func:`ensure_users` adds the users fstests wants.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_PY = REPO / ".venv" / "bin" / "python"
USERS = ("fsgqa", "fsgqa2", "123456-fsgqa")
UDEVD = "/lib/systemd/systemd-udevd"
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-f", "-q"],
        "btrfs": ["mkfs.btrfs", "-f", "-q"]}
#: image sizes (sparse files) in GiB
SIZES = {"test": 4, "scratch": 8, "logwrites": 2, "scratch2": 8}


class SetupError(Exception):
    """A setup step failed; the message is one line naming the problem."""


def log(msg: str) -> None:
    print(f"fstests: {msg}", flush=True)


def run(cmd: list[str], timeout: float = 300, check: bool = True) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        why = " ".join((res.stderr or res.stdout).split())[-300:]
        raise SetupError(f"{shlex.join(cmd)}: {why or f'exit status {res.returncode}'}")
    return res.stdout


def python() -> str:
    return str(VENV_PY) if VENV_PY.exists() else sys.executable


class Udevd:
    """Starts systemd-udevd if none runs; stop() ends only the one it started."""

    def __init__(self) -> None:
        self.pid: int | None = None

    def start(self) -> None:
        if run(["pgrep", "-x", "systemd-udevd"], check=False).strip():
            return
        if not os.access(UDEVD, os.X_OK):
            raise SetupError(f"no udev daemon runs and {UDEVD} is missing (install udev)")
        subprocess.run([UDEVD, "--daemon"], check=True, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pids = run(["pgrep", "-n", "-x", "systemd-udevd"], check=False).split()
        self.pid = int(pids[0]) if pids else None
        log(f"started systemd-udevd (pid {self.pid})")

    def stop(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            log(f"stopped systemd-udevd (pid {self.pid})")
            self.pid = None


def ensure_users() -> None:
    for user in USERS:
        if subprocess.run(["getent", "passwd", user], capture_output=True).returncode != 0:
            run(["useradd", "-m", user] if user == "fsgqa" else ["useradd", user])
            log(f"created user {user}")
    if subprocess.run(["getent", "group", "fsgqa"], capture_output=True).returncode != 0:
        run(["groupadd", "fsgqa"])


def mounts_under(base: Path) -> list[str]:
    """Mountpoints at or below ``base``, last mounted first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == str(base) or mp.startswith(f"{base}/"):
                found.append(mp)
    return found[::-1]


class Rig:
    """One file system's devices, daemon and config below ``work``; ``down()`` undoes all."""

    def __init__(self, work: Path, fs: str, soak: int | None = None) -> None:
        self.work, self.fs, self.soak = work, fs, soak
        self.loops: list[str] = []
        self.sock = work / "dmuser.sock"
        self.mnt = work / "dm"
        self.daemon_up = False

    def up(self) -> Path:
        w = self.work
        w.mkdir(parents=True, exist_ok=True)
        devs = {}
        for name, gib in SIZES.items():
            if name == "scratch2" and self.fs != "btrfs":
                continue  # btrfs: SCRATCH_DEV_POOL of two (raid1 tests such as btrfs/142)
            img = w / f"{name}.img"
            with open(img, "wb") as f:
                f.truncate(gib << 30)
            dev = run(["losetup", "--find", "--show", str(img)]).strip()
            self.loops.append(dev)
            devs[name] = dev
        run([*MKFS[self.fs], devs["test"]])
        for d in ("test", "scratch", "results"):
            (w / d).mkdir(exist_ok=True)
        run([python(), "-m", "dmuser", "serve", "--block-devices", "on", "--mountpoint",
             str(self.mnt), "--socket", str(self.sock), "--log-file", str(w / "dmuser.log")],
            timeout=60)
        self.daemon_up = True
        shim = run([python(), "-m", "dmuser", "dmsetup", "--install-shim", str(w / "bin"),
                    "--socket", str(self.sock)]).strip()
        config = w / "local.config"
        config.write_text("\n".join([
            f"export FSTYP={self.fs}",
            f"export TEST_DEV={devs['test']}", f"export TEST_DIR={w / 'test'}",
            f"export SCRATCH_DEV_POOL='{devs['scratch']} {devs['scratch2']}'"
            if self.fs == "btrfs" else f"export SCRATCH_DEV={devs['scratch']}",
            f"export SCRATCH_MNT={w / 'scratch'}",
            f"export LOGWRITES_DEV={devs['logwrites']}",
            f"export RESULT_BASE={w / 'results'}", f"export DMSETUP_PROG={shim}",
            f"export SOAK_DURATION={self.soak}" if self.soak else "", ""]))
        return config

    def down(self) -> None:
        for mp in mounts_under(self.work):
            if Path(mp) != self.mnt and \
                    subprocess.run(["umount", mp], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", mp], capture_output=True)
        if self.daemon_up:
            res = subprocess.run([python(), "-m", "dmuser", "dmsetup", "remove_all", "-f"],
                                 capture_output=True, text=True, timeout=120,
                                 env={**os.environ, "DMUSER_SOCKET": str(self.sock)})
            if res.returncode != 0:
                log(f"remove_all: {res.stderr.strip()}")
            res = subprocess.run([python(), "-m", "dmuser", "shutdown", "--socket",
                                  str(self.sock)], capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                log(f"shutdown: {res.stderr.strip()}")
            self.daemon_up = False
        for mp in mounts_under(self.mnt):
            subprocess.run(["umount", "-l", mp], capture_output=True)
        for dev in self.loops:
            for _ in range(50):
                if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
                    break
                time.sleep(0.1)
        self.loops = []
