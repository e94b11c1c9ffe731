"""The demo's session: its work directory, what it set up, and how it runs commands.

Every command runs in the work directory (image files, device files and mount
points are named relative to it, as a user would type them) and is echoed
before it runs: ``$ dmuser  VERB ...`` and, below it, the ``dmsetup`` line it
stands for, aligned word for word::

    $ dmuser  suspend base
    # dmsetup suspend base

In the dmsetup lines the image files are disks (``DISKS``) and dmuser devices
are ``/dev/mapper/NAME``.  A failed command or check raises :class:`DemoFailed`.
The session records what it sets up (devices, loop devices, mounts, a frozen
file system, the writer, the daemon) so that ``teardown.py`` can undo it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

#: the disks the image files stand for in the dmsetup lines
DISKS = {"origin.img": "/dev/sdb", "cow.img": "/dev/sdc", "leg0.img": "/dev/sdd",
         "leg1.img": "/dev/sde", "log.img": "/dev/sdf"}
#: where the system tools live on Debian (not in a normal user's PATH)
SBIN_DIRS = ("/usr/sbin", "/sbin")
MOUNTPOINT = "dev"
SOCKET = "dmuser.sock"
LOG = "dmuser.log"
CMD_TIMEOUT = 120.0


class DemoFailed(Exception):
    """A command or a check failed; the message says which and why."""


class Stoppable(Protocol):
    def stop(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...


def tool(name: str) -> str:
    """Full path of a system tool, also looked up in /usr/sbin and /sbin."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    found = shutil.which(name, path=path)
    if found is None:
        raise DemoFailed(f"{name} not found (install it: scripts/setup does)")
    return found


@dataclass
class Session:
    work: str
    #: why kernel mounts (loop devices) are skipped, or None when they run
    no_loop_reason: str | None
    throttle: int
    devices: list[str] = field(default_factory=list)
    loops: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    frozen: str | None = None
    writer: Stoppable | None = None
    daemon_pid: int | None = None
    checks: int = 0
    steps: int = 0
    #: notes already printed once
    explained: set[str] = field(default_factory=set)
    #: exit status of the last command run
    last_status: int = 0

    @property
    def loop(self) -> bool:
        return self.no_loop_reason is None

    @property
    def sock(self) -> str:
        return os.path.join(self.work, SOCKET)

    @property
    def mountpoint(self) -> str:
        return os.path.join(self.work, MOUNTPOINT)

    def path(self, rel: str) -> str:
        return os.path.join(self.work, rel)

    def env(self) -> dict[str, str]:
        env = dict(os.environ, DMUSER_SOCKET=self.sock)
        env.pop("DMUSER_MOUNTPOINT", None)
        return env

    # -- printing ------------------------------------------------------------------------

    @staticmethod
    def say(text: str = "") -> None:
        print(text, flush=True)

    def step(self, title: str) -> None:
        self.steps += 1
        self.say(f"\n== {self.steps}. {title} ==")

    def note(self, text: str) -> None:
        self.say(f"-- {text}")

    def check(self, ok: bool, what: str, detail: str = "") -> None:
        if not ok:
            raise DemoFailed(what + (f": {detail}" if detail else ""))
        self.checks += 1
        self.say(f"   ok: {what}")

    # -- commands ------------------------------------------------------------------------

    def dm(self, *args: str, kernel: str, live: bool = False, timeout: float = CMD_TIMEOUT,
           check: bool = True, quiet: bool = False) -> str:
        """Run ``dmuser ARGS``; ``kernel`` is the line it stands for with kernel dm
        (``dmsetup ...``, aligned with the dmuser line), or a comment when there is none."""
        if not quiet:
            self.say("$ dmuser  " + shlex.join(args))
            self.say("# " + kernel)
        return self._run([sys.executable, "-m", "dmuser", *args], "dmuser " + args[0],
                         live, timeout, check, quiet)

    def sh(self, *argv: str, kernel: str = "", live: bool = False,
           timeout: float = CMD_TIMEOUT, check: bool = True, quiet: bool = False) -> str:
        """Run a system tool; ``kernel`` notes what differs with kernel dm, if anything."""
        if not quiet:
            self.say("$ " + shlex.join(argv))
            if kernel:
                self.say("# " + kernel)
        return self._run([tool(argv[0]), *argv[1:]], argv[0], live, timeout, check, quiet)

    def _run(self, argv: list[str], what: str, live: bool, timeout: float, check: bool,
             quiet: bool) -> str:
        proc = self.call(argv, what, live, timeout)
        self.last_status = proc.returncode
        out = proc.stdout or ""
        if not quiet and out:
            self.say(out.rstrip("\n"))
        if proc.returncode and check:
            err = (proc.stderr or "").strip()
            raise DemoFailed(f"{what} exited with status {proc.returncode}"
                             + (f": {err}" if err else ""))
        return out

    def call(self, argv: list[str], what: str, live: bool = False,
             timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the work directory, output captured unless ``live``."""
        try:
            return subprocess.run(argv, cwd=self.work, env=self.env(), stdin=subprocess.DEVNULL,
                                  stdout=None if live else subprocess.PIPE,
                                  stderr=None if live else subprocess.PIPE,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DemoFailed(f"{what} did not finish within {timeout:.0f} s") from None

    # -- dmuser shorthands ------------------------------------------------------------

    def dmsetup_table(self, table: str) -> str:
        """The table with image files as disks and dmuser devices as /dev/mapper/NAME."""
        words = [DISKS.get(w) or (f"/dev/mapper/{w}" if w in self.devices else w)
                 for w in table.split()]
        return " ".join(words)

    def create(self, name: str, table: str) -> None:
        self.dm("create", name, "--table", table,
                kernel=f"dmsetup create {name} --table {shlex.quote(self.dmsetup_table(table))}")
        self.devices.append(name)

    def reload(self, name: str, table: str) -> None:
        self.dm("reload", name, "--table", table,
                kernel=f"dmsetup reload {name} --table {shlex.quote(self.dmsetup_table(table))}")

    def verb(self, verb: str, name: str = "", quiet: bool = False) -> str:
        """suspend, resume, remove, status, table, info: the same words for dmsetup."""
        args = [verb, name] if name else [verb]
        out = self.dm(*args, kernel="dmsetup " + " ".join(args), quiet=quiet)
        if verb == "remove" and name in self.devices:
            self.devices.remove(name)
        return out

    def status_words(self, name: str) -> list[str]:
        """The words of the device's (first) status line, fetched without echo."""
        return self.dm("status", name, kernel="", quiet=True).split()

    def watch(self, name: str, timeout: float = 90.0) -> None:
        """The live progress bar of a merge or resync, until it completes."""
        self.dm("status", name, "--watch", "--until-complete", "--interval", "0.2",
                kernel=f"watch -n 0.2 dmsetup status {name}", live=True,
                timeout=timeout)

    def image(self, size_mib: int, *names: str) -> None:
        self.sh("truncate", "-s", f"{size_mib}M", *names,
                kernel="(the kernel would use disks: " +
                       ", ".join(f"{n} = {DISKS[n]}" for n in names) + ")")


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def health(words: list[str]) -> str:
    """The health characters of a mirror status line (e.g. ``AD``)."""
    nr = int(words[3])
    return words[6 + nr]


def in_sync(words: list[str]) -> tuple[int, int]:
    """(in-sync regions, regions) of a mirror status line."""
    nr = int(words[3])
    done, total = words[4 + nr].split("/")
    return int(done), int(total)


def cow_exceptions(inspect_output: str) -> int | None:
    m = re.search(r"^exceptions:\s+(\d+)", inspect_output, re.M)
    return int(m[1]) if m else None
