"""dmuser: the Linux device-mapper, rebuilt in userspace Python.

The Python API: :class:`Client` (synchronous) and :class:`AsyncClient` (trio)
talk to a running ``dmuser serve``; errors are the classes of
``dmuser.errors``; typed status, table and info objects live in
``dmuser.status``.  Importing the package loads neither trio nor the
targets: :class:`AsyncClient` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dmuser.client import Client
from dmuser.errors import (
    ConnectionFailed,
    DaemonNotRunning,
    DaemonShuttingDown,
    DeviceBusy,
    DeviceExists,
    DeviceIOError,
    DmuserError,
    InvalidTable,
    NoSuchDevice,
    NotSupported,
    ProtocolError,
    WaitTimeout,
)
from dmuser.status import DeviceInfo

if TYPE_CHECKING:
    from dmuser.aclient import AsyncClient

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "Client", "ConnectionFailed", "DaemonNotRunning", "DaemonShuttingDown",
    "DeviceBusy", "DeviceExists", "DeviceIOError", "DeviceInfo", "DmuserError",
    "InvalidTable", "NoSuchDevice", "NotSupported", "ProtocolError", "WaitTimeout",
]


def __getattr__(name: str) -> Any:
    if name == "AsyncClient":
        from dmuser.aclient import AsyncClient

        return AsyncClient
    raise AttributeError(f"module 'dmuser' has no attribute {name!r}")
