"""``dmuser demo``: the whole mission, end to end, on throw-away images.

In a fresh temporary directory, with a daemon of its own (private mountpoint
and socket), the demo shows:

1. ext4 on a ``snapshot-origin`` device, files written (``snapshot.py``);
2. a snapshot taken the LVM way, the file system frozen around it;
3. files changed on the origin;
4. the snapshot showing the old files;
5. a merge back (``snapshot-merge``) with a live progress bar, after which the
   origin holds the snapshot's files again;
6. a 2-leg mirror with a disk log and its resync, with a bar (``mirror.py``);
7. a leg failed live under a writer on ext4, the status showing it (``AD``);
8. the leg repaired, the mirror reloaded and resynced (bar), the writer still
   running;
9. the file system checked (``e2fsck -fn``), the legs compared (``cmp``), the
   writer's files read back;
10. everything torn down (``teardown.py``), also on failure or Ctrl-C.

Each command is printed with the ``dmsetup`` line it stands for
(``session.py``); each check prints ``ok:`` or stops the demo with
``demo: FAILED: <what>``.  Exit status 0 only when every check passed, 1 when
one failed, 130 when interrupted.

Kernel mounts go through loop devices (root).  Without them (not root, or
``--no-loop``) the same steps run with the file systems reached through
``debugfs`` on the device files; the demo says what it skipped and why.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from types import FrameType

from dmuser.demo import mirror, snapshot, teardown
from dmuser.demo.session import LOG, MOUNTPOINT, DemoFailed, Session, tool, wait_for

RESYNC_THROTTLE = 5
SKIPPED_WITHOUT_LOOP = (
    "loop devices and kernel mounts of the ext4 file systems: debugfs writes and reads "
    "their files on the device files instead",
    "fsfreeze around the snapshot: nothing is mounted, so there is nothing to freeze",
    "the writer's file I/O through a kernel mount of the mirror: it writes its files "
    "with debugfs instead")


def loop_unavailable(no_loop: bool) -> str | None:
    """Why kernel mounts through loop devices cannot run, or None if they can."""
    if no_loop:
        return "--no-loop given"
    if os.geteuid() != 0:
        return "not root"
    for name in ("losetup", "mount", "umount", "fsfreeze"):
        try:
            tool(name)
        except DemoFailed as exc:
            return str(exc)
    try:
        res = subprocess.run([tool("losetup"), "--find"], capture_output=True, text=True,
                             timeout=30)
    except subprocess.TimeoutExpired:
        return "losetup --find did not answer"
    if res.returncode != 0:
        return f"no free loop device ({res.stderr.strip() or 'losetup --find failed'})"
    return None


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _start(s: Session) -> None:
    s.step("start the daemon")
    s.say(f"$ cd {s.work}; export DMUSER_SOCKET=$PWD/dmuser.sock")
    out = s.dm("serve", "--mountpoint", MOUNTPOINT, "--resync-throttle", str(s.throttle),
               "--no-block-devices",  # the demo attaches its own loop devices to the files
               kernel="(kernel dm needs no daemon; --resync-throttle is explained at the "
                      "mirror)")
    m = re.search(r"daemon (\d+) serving", out)
    s.daemon_pid = int(m[1]) if m else None


def _finish(s: Session) -> None:
    s.step("tear down")
    s.verb("ls")
    s.dm("shutdown", kernel="(kernel dm: nothing to stop)")
    wait_for(lambda: not os.path.ismount(s.mountpoint), 30, "the daemon to unmount its files")
    done, left = teardown.cleanup(s)
    s.say(f"$ rm -rf {s.work}")
    s.check(not left and not done, "nothing left: no devices, mounts, loop devices, daemon "
                                   "or files", "; ".join(left + done))


def _skipped(s: Session) -> None:
    if not s.loop:
        s.say(f"skipped ({s.no_loop_reason}):")
        for line in SKIPPED_WITHOUT_LOOP:
            s.say(f"  - {line}")


def _log_tail(s: Session, lines: int = 25) -> str:
    try:
        with open(os.path.join(s.work, LOG), errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def main(no_loop: bool = False) -> int:
    t0 = time.monotonic()
    work = os.path.realpath(tempfile.mkdtemp(prefix="dmuser-demo-"))
    s = Session(work, loop_unavailable(no_loop), RESYNC_THROTTLE)
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    s.say("dmuser demo: the device-mapper in userspace -- a snapshot and a merge, a mirror, "
          "a failed leg and a resync")
    s.say(f"work directory {work} (deleted at the end)")
    _skipped(s)
    status = 1
    try:
        _start(s)
        snapshot.run(s)
        mirror.run(s)
        _finish(s)
        status = 0
    except DemoFailed as exc:
        s.say(f"\ndemo: FAILED: {exc}")
        tail = _log_tail(s)
        if tail:
            s.say(f"--- last lines of the daemon's log ---\n{tail.rstrip()}")
    except KeyboardInterrupt as exc:
        s.say(f"\ndemo: interrupted ({str(exc) or 'SIGINT'})")
        status = 130
    except Exception:  # a bug of the demo itself: show it, and still tear down
        s.say("\ndemo: FAILED with an unexpected error:\n" + traceback.format_exc())
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not stop the teardown
        try:
            if os.path.exists(work):
                s.say("demo: tearing down")
                done, left = teardown.cleanup(s)
                for line in done:
                    s.say(f"   teardown: {line}")
                for line in left:
                    s.say(f"   teardown: LEFT BEHIND: {line}")
                if left:
                    status = 1
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    took = time.monotonic() - t0
    if status == 0:
        s.say(f"\ndemo: OK -- {s.checks} checks passed in {took:.0f} s")
        _skipped(s)
    sys.stdout.flush()
    shutil.rmtree(work, ignore_errors=True)
    return status
