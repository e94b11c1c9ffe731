"""The thaw watcher: a file system a suspend froze is thawed even if the daemon dies.

A suspend freezes (FIFREEZE) the file systems mounted on the device's loop
device and the resume thaws them (``loopdev.py``).  Were the daemon killed in
between (SIGKILL, a crash), nothing would ever thaw them, and every writer on
them would wait forever.  So at its first freeze the daemon starts a watcher
process (``python -m dmuser.core.thaw_watch``, from a worker thread) that
reads the other end of a pipe and lives until the daemon's shutdown:

* before each FIFREEZE the daemon writes ``freeze ID [path, st_dev, fstype,
  source, device]`` (JSON), and ``forget ID`` once that file system is no
  longer its to thaw: after its own thaw, or when the freeze was not its own
  (the file system was gone, frozen already by someone else, who keeps the
  thaw, or the ioctl failed);
* at end of file (the daemon closed the pipe at its shutdown, or died and the
  kernel closed it) the watcher thaws (``hostdev.thaw_fs``) every file system
  announced and not forgotten, logs each on its stderr (the daemon's), and
  exits.  With its daemon dead the device fails its I/O, so writers then get
  errors (EIO) instead of waiting.

Guarantees: each freeze is announced before it is made, so after any death
of the daemon no file system it froze stays frozen (one thawed twice is not
frozen: EINVAL, ignored); one frozen by someone else is never thawed.  A
suspend costs two pipe writes per file system, not a process.  A watcher
that died is started again (announcing what is frozen) at the next freeze.
The watcher runs in a session of its own (a signal to the daemon's process
group does not reach it), with ``/`` as its working directory and no file of
a device or its mount open.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from dmuser.core.hostdev import Mount, freeze_fs, thaw_fs

log = logging.getLogger(__name__)


def _announcement(ident: int, m: Mount, device: str) -> str:
    return f"freeze {ident} " + json.dumps([m.path, m.st_dev, m.fstype, m.source, device])


class ThawWatcher:
    """The daemon's end of its watcher.  Every method blocks (process start, pipe
    writes, ioctls, wait): call them in a worker thread.  Freezes and thaws of
    several devices may run at once (a lock orders the lines)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        #: what the watcher must thaw if the daemon dies: id -> (mount, device)
        self._watched: dict[int, tuple[Mount, str]] = {}

    def _start(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:  # one that died
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                           os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                      stdout=subprocess.DEVNULL, cwd="/", env=env,
                                      start_new_session=True)
        for ident, (m, device) in self._watched.items():
            self._tell(_announcement(ident, m, device))

    def _tell(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()

    def freeze(self, m: Mount, device: str) -> int | None:
        """FIFREEZE ``m`` (on ``device``), announced first: its id if this froze it
        (give that to :meth:`thaw`), None if not (``hostdev.freeze_fs``).  Raises
        OSError: the freeze's, or the watcher's (it cannot start, the pipe broke)."""
        with self._lock:
            ident = next(self._ids)
            self._watched[ident] = (m, device)
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._start()  # announces it with the others
                else:
                    self._tell(_announcement(ident, m, device))
            except OSError:
                del self._watched[ident]
                raise
        try:
            froze = freeze_fs(m)
        except OSError:
            self._forget(ident)
            raise
        if not froze:
            self._forget(ident)
            return None
        return ident

    def thaw(self, ident: int) -> None:
        """FITHAW what :meth:`freeze` froze as ``ident``, then tell the watcher to
        forget it (also if the thaw fails: it raises ``thaw_fs``'s errors)."""
        m, device = self._watched[ident]
        try:
            thaw_fs(m, device)
        finally:
            self._forget(ident)

    def _forget(self, ident: int) -> None:
        with self._lock:
            del self._watched[ident]
            if self._proc is not None and self._proc.poll() is None:
                try:
                    self._tell(f"forget {ident}")
                except OSError as exc:  # it died: it thaws nothing any more
                    log.error("thaw watcher: %s", exc)

    def close(self) -> None:
        """At the shutdown, after every thaw: close the pipe and reap the watcher
        (which thaws what is still announced, normally nothing)."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        with contextlib.suppress(OSError):  # a watcher killed meanwhile
            proc.stdin.close()
        if self._watched:
            # Its thaw may write through one of this daemon's devices (ext4
            # writes its superblock), which can no longer be served: do not wait.
            log.error("thaw watcher: leaving it to thaw %d file system(s) after the exit",
                      len(self._watched))
            return
        proc.wait()


def _watch(pipe: IO[str]) -> int:
    """The watcher: follow the daemon's lines; at end of file thaw every file
    system announced and not forgotten."""
    watched: dict[str, tuple[Mount, str]] = {}
    for line in pipe:
        word, _, rest = line.strip().partition(" ")
        ident, _, arg = rest.partition(" ")
        if word == "freeze":
            path, st_dev, fstype, source, device = json.loads(arg)
            watched[ident] = (Mount(path, st_dev, fstype, source), device)
        elif word == "forget":
            watched.pop(ident, None)
    status = 0
    for m, device in watched.values():
        try:
            thaw_fs(m, device)
            log.warning("its daemon is gone and %s was frozen: thawed it", m.path)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("its daemon is gone and %s is frozen; cannot thaw it: %s", m.path, exc)
            status = 1
    return status


if __name__ == "__main__":
    # Only the pipe ends the watcher: a signal meant for the daemon (SIGTERM to
    # its cgroup, ^C to its process group, pkill -f dmuser) must not take the
    # thaw away with it.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    sys.exit(_watch(sys.stdin))
