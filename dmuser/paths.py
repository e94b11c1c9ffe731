"""Default locations of the control socket and the mountpoint.

As root: ``/run/dmuser`` (mount) and ``/run/dmuser.sock``.  Otherwise under
``$XDG_RUNTIME_DIR`` (or ``/tmp/dmuser-$UID`` without it).  ``DMUSER_SOCKET``
and ``DMUSER_MOUNTPOINT`` override the defaults; ``--socket``/``--mountpoint``
override both.
"""

from __future__ import annotations

import os


def runtime_dir() -> str:
    if os.geteuid() == 0:
        return "/run"
    return os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/dmuser-{os.getuid()}"


def default_socket() -> str:
    return os.environ.get("DMUSER_SOCKET") or os.path.join(runtime_dir(), "dmuser.sock")


def default_mountpoint() -> str:
    return os.environ.get("DMUSER_MOUNTPOINT") or os.path.join(runtime_dir(), "dmuser")
