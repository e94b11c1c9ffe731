"""Dirty region logs for mirror (the kernel's ``dm-log.c``).

Two types, by the name in the mirror table:

* ``core`` -- every bitset in memory (``core.py``);
* ``disk`` -- clean bits persisted on a log device, byte-compatible with the
  kernel's format (``disk.py``, format in ``dmuser.formats.disklog``).

The protocol between a log and the mirror is :class:`DirtyLog` (``base.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from dmuser.core.target import TargetContext
from dmuser.targets.mirror.log.base import DirtyLog, DirtyLogError, EventFn, FlushCallback
from dmuser.targets.mirror.log.core import CoreLog
from dmuser.targets.mirror.log.disk import DiskLog

#: The log types by table name.
LOG_TYPES: dict[str, type[DirtyLog]] = {"core": CoreLog, "disk": DiskLog}


def create_dirty_log(type_name: str, ti: TargetContext, args: Sequence[str], *,
                     flush_callback: FlushCallback | None = None,
                     table_event: EventFn | None = None) -> DirtyLog:
    """``dm_dirty_log_create``.  Raises DirtyLogError (with the DMWARN text) or DmError."""
    cls = LOG_TYPES.get(type_name)
    if cls is None:
        raise DirtyLogError(f'Module for logging type "{type_name}" not found.')
    return cls(ti, args, flush_callback=flush_callback, table_event=table_event)


__all__ = ["LOG_TYPES", "CoreLog", "DirtyLog", "DirtyLogError", "DiskLog", "create_dirty_log"]
