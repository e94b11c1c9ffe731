"""No udev probe of a suspended dmuser device's loop device.

udev probes a block device (blkid) on its add and change events, and the
inotify watch 60-block.rules puts on loop devices turns each close after a
write into a change event.  A probe of the loop device of a *suspended* dmuser
device reads through it and hangs until the resume, holding the loop device
open, so a plain ``remove`` of the suspended device fails with "busy".  The
kernel's dm rules avoid this for dm devices (60-persistent-storage-dm.rules:
no blkid and no watch while ``DM_SUSPENDED=1``); :class:`UdevQuiet` gives
dmuser's loop devices the same rule.  Guarantees:

* with udev present (``/run/udev``), a daemon's first block device installs
  ``/run/udev/rules.d/59-dmuser-<id>.rules`` (``<id>`` from the mountpoint)
  and reloads udev's rules.  While the flag file
  ``/run/dmuser/udev-<id>/loopN`` exists, the rule skips
  60-persistent-storage.rules (blkid) for ``loopN`` and drops its watch
  (``OPTIONS:="nowatch"``, final, so 60-block.rules cannot add it back);
* :meth:`UdevQuiet.quiet` (before a suspend closes the door) sets the flag,
  then waits until no udev process has the loop device open.  A udev worker
  holds the device open from the start of an event to its end, so an event
  either finishes its probe before the door closes or runs its rules after the
  flag is set.  It waits at most :data:`SETTLE_SECONDS` (then logs and goes on);
* :meth:`UdevQuiet.unquiet` (after the resume, or when the loop device goes)
  clears the flag; :meth:`UdevQuiet.close` (shutdown) removes the rule and the
  flags, and :func:`remove_stale` (at the start of any daemon with block
  devices) those of killed daemons: every rule whose mountpoint is no FUSE
  mount any more.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import shutil

import trio

from dmuser.core.hostdev import fuse_mountpoints, udev_has_open

log = logging.getLogger(__name__)

UDEV_DIR = "/run/udev"
RULES_DIR = "/run/udev/rules.d"
FLAGS_ROOT = "/run/dmuser"
#: how long a suspend waits for udev to finish an event on the loop device
SETTLE_SECONDS = 5.0


def _paths(mountpoint: str) -> tuple[str, str]:
    """(rule file, flag directory) of the daemon on ``mountpoint``."""
    tag = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return (os.path.join(RULES_DIR, f"59-dmuser-{tag}.rules"),
            os.path.join(FLAGS_ROOT, f"udev-{tag}"))


_MOUNTPOINT = "# mountpoint: "


def _rule_text(mountpoint: str, flags: str) -> str:
    return ("# A dmuser daemon: no probe (blkid) and no watch of its loop devices while\n"
            "# their device is suspended (dmuser/core/udev_quiet.py).\n"
            f"{_MOUNTPOINT}{mountpoint}\n"
            'SUBSYSTEM=="block", KERNEL=="loop[0-9]*", ACTION!="remove", '
            f'TEST=="{flags}/%k", ENV{{UDEV_DISABLE_PERSISTENT_STORAGE_RULES_FLAG}}="1", '
            'OPTIONS:="nowatch"\n')


def _remove(mountpoint: str) -> bool:
    """Remove the rule and flags of the daemon on ``mountpoint``; True if a rule was there."""
    rule, flags = _paths(mountpoint)
    shutil.rmtree(flags, ignore_errors=True)
    try:
        os.unlink(rule)
    except FileNotFoundError:
        return False
    return True


def remove_stale(mountpoint: str) -> None:
    """Remove the rules and flags killed daemons left: the one of ``mountpoint`` (not
    mounted yet) and every other whose mountpoint is no FUSE mount now.  Blocking;
    a removed rule stays loaded in udev until its next reload, matching nothing."""
    if _remove(mountpoint):
        log.warning("removed the udev rule of a dead daemon on %s", mountpoint)
    live = fuse_mountpoints()
    for rule in glob.glob(os.path.join(RULES_DIR, "59-dmuser-*.rules")):
        with contextlib.suppress(OSError), open(rule) as f:
            mnt = next((line[len(_MOUNTPOINT):].rstrip("\n") for line in f
                        if line.startswith(_MOUNTPOINT)), None)
        if mnt is not None and mnt not in live:
            shutil.rmtree(_paths(mnt)[1], ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rule)
            log.warning("removed the udev rule of a dead daemon on %s", mnt)


async def _reload_rules() -> None:
    res = await trio.run_process(["udevadm", "control", "--reload"], capture_stdout=True,
                                 capture_stderr=True, check=False)
    if res.returncode != 0:
        log.warning("udevadm control --reload: %s", res.stderr.decode().strip())


class UdevQuiet:
    """The udev rule of one daemon's loop devices and their suspended flags."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self.rule, self.flags = _paths(self.mountpoint)
        self._installed = False

    async def install(self) -> None:
        """Install the rule (once; nothing without udev)."""
        if self._installed or not os.path.isdir(UDEV_DIR) or shutil.which("udevadm") is None:
            return
        os.makedirs(RULES_DIR, exist_ok=True)
        os.makedirs(self.flags, exist_ok=True)
        with open(self.rule + ".tmp", "w") as f:
            f.write(_rule_text(self.mountpoint, self.flags))
        os.replace(self.rule + ".tmp", self.rule)
        self._installed = True
        await _reload_rules()

    async def quiet(self, loop: str, devno: str) -> None:
        """Flag loop device ``loop`` (``/dev/loopN``, number ``devno``) suspended, then
        wait for udev to let go of it."""
        if not self._installed:
            return
        with open(os.path.join(self.flags, os.path.basename(loop)), "w"):
            pass
        with trio.move_on_after(SETTLE_SECONDS) as scope:
            while await trio.to_thread.run_sync(udev_has_open, devno):
                await trio.sleep(0.02)
        if scope.cancelled_caught:
            log.warning("%s: udev still has it open after %g s; suspending anyway",
                        loop, SETTLE_SECONDS)

    def unquiet(self, loop: str) -> None:
        """Clear the flag of ``loop``: udev may probe it again."""
        if self._installed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.flags, os.path.basename(loop)))

    async def close(self) -> None:
        """Remove the rule and every flag (shutdown)."""
        if not self._installed:
            return
        self._installed = False
        _remove(self.mountpoint)
        await _reload_rules()
