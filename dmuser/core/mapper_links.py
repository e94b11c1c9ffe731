"""The ``/dev/mapper/NAME -> ../loopN`` links of a daemon's block devices.

A link is *right* when its loop device is attached to the device's file,
``<mountpoint>/NAME``: that is the whole truth, read from sysfs, so the checks
here need nothing from the daemon but its mountpoint.  ``/dev/mapper`` is
shared with the host's dm and with other dmuser daemons, so only *dmuser's own*
links are ever removed: those to a loop device on a file under the given
mountpoint, and those to a loop device no longer attached (left by a dead
daemon).  Kernel dm nodes, plain files and other daemons' links stay.

These are plain blocking calls on ``/dev`` and ``/sys`` (no I/O through a
device): the daemon calls :func:`make_link` in its loop; :func:`mknodes` runs
in the ``dmsetup mknodes`` client, as dmsetup makes its nodes itself.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping

MAPPER_DIR = "/dev/mapper"


def link_path(name: str) -> str:
    return os.path.join(MAPPER_DIR, name)


def make_link(name: str, loop: str) -> None:
    """Create ``/dev/mapper/NAME -> ../loopN`` (``loop`` is ``/dev/loopN``); raises
    OSError (FileExistsError if something of that name is there)."""
    os.makedirs(MAPPER_DIR, exist_ok=True)
    os.symlink("../" + os.path.basename(loop), link_path(name))


def loop_of_link(link: str) -> str | None:
    """``loopN`` if ``link`` is a symlink ``../loopN`` (as dmuser makes them), else None."""
    try:
        target = os.readlink(link)
    except OSError:
        return None
    loop = target[3:]
    return loop if target.startswith("../loop") and loop[4:].isdigit() else None


def backing_file(loop: str) -> str | None:
    """The file loop device ``loopN`` is attached to, or None if it is detached."""
    try:
        with open(f"/sys/block/{loop}/loop/backing_file") as f:
            return f.read().strip()
    except OSError:
        return None


def mknodes(mountpoint: str, live: Mapping[str, str], names: Collection[str] | None) -> None:
    """``dmsetup mknodes``: make the link of each device of ``live`` (name ->
    ``/dev/loopN``) that ``names`` lists (every one if None) right, replacing a
    missing or wrong entry; names not in ``live`` are ignored, as dmsetup does.
    Without ``names``, also remove dmuser's own links of no live device (see the
    module docstring).  A device removed meanwhile gets no link: each link is
    made only if its loop device is still on the device's file.  Raises OSError."""
    prefix = os.path.abspath(mountpoint).rstrip("/") + "/"
    for name, loop in live.items():
        if names is not None and name not in names:
            continue
        link = link_path(name)
        kernel_name = os.path.basename(loop)
        if loop_of_link(link) == kernel_name and os.path.exists(link):
            continue
        if backing_file(kernel_name) != prefix + name:
            continue  # removed (or being removed) since ``live`` was read
        if os.path.lexists(link):
            os.unlink(link)
        make_link(name, loop)
    if names is not None or not os.path.isdir(MAPPER_DIR):
        return
    for name in os.listdir(MAPPER_DIR):
        target = loop_of_link(link_path(name))
        if target is None:
            continue
        backing = backing_file(target)
        if backing is None or (backing.startswith(prefix) and backing != prefix + name):
            os.unlink(link_path(name))
