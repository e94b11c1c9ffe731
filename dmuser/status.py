"""Typed views of the strings ``status``, ``table`` and ``info`` return.

The daemon answers with the kernel's own strings (``dmsetup status`` and
``dmsetup table`` lines); this module turns them into objects, without any
I/O, so scripts test ``st.invalid`` or ``st.in_sync`` instead of splitting
words.  :func:`parse_status` and :func:`parse_table` take one line
``START LENGTH TYPE PARAMS...`` and return the class registered for the
type; an unknown type gives :class:`RawStatus` / :class:`RawTable`, which
keep the words.  A line that is malformed for its (known) type raises
:class:`ValueError`.  The table classes live in :mod:`dmuser.tables` and are
re-exported here.

    >>> st = parse_status("0 32768 snapshot 24/8192 16")
    >>> st.used_sectors, st.total_sectors, st.metadata_sectors, st.valid
    (24, 8192, 16, True)
    >>> parse_status("0 32768 snapshot Invalid").invalid
    True
    >>> m = parse_status("0 8192 mirror 2 254:0 254:64 8/8 1 AA 3 disk 254:48 A")
    >>> [leg.health for leg in m.legs], m.in_sync, m.log_type, m.log_device
    (['A', 'A'], True, 'disk', '254:48')
    >>> parse_table("0 8192 linear 254:0 2048").offset
    2048
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dmuser.tables import (
    FlakeyTable,
    LinearTable,
    MirrorTable,
    RawTable,
    SnapshotOriginTable,
    SnapshotTable,
    TableLine,
    parse_table,
    split_line,
    uint,
)

__all__ = [
    "DeviceInfo", "EmptyStatus", "FlakeyTable", "LinearTable", "MirrorLeg", "MirrorStatus",
    "MirrorTable", "RawStatus", "RawTable", "SnapshotMergeStatus", "SnapshotOriginTable",
    "SnapshotStatus", "SnapshotTable", "TableLine", "TargetStatus", "parse_status",
    "parse_table",
]


# -- status ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetStatus:
    """One status line: where the target sits, its type and its raw words."""

    start: int
    length: int
    target_type: str
    params: tuple[str, ...]


@dataclass(frozen=True)
class RawStatus(TargetStatus):
    """The status of a target type this module does not know: only the words."""


@dataclass(frozen=True)
class EmptyStatus(TargetStatus):
    """linear, zero, error, flakey, snapshot-origin: the kernel reports nothing."""


@dataclass(frozen=True)
class SnapshotStatus(TargetStatus):
    """``snapshot``: ``USED/TOTAL METADATA`` in sectors, or one of three states.

    ``state`` is ``"valid"``, ``"invalid"`` (a copy or commit failed, or the
    COW filled on an origin write: all I/O fails), ``"overflow"`` (a
    ``PO`` snapshot's COW filled on a snapshot write) or ``"merge_failed"``.
    The sector counts are ``None`` unless the state is valid.

    >>> parse_status("0 32768 snapshot Overflow").overflow
    True
    >>> parse_status("0 32768 snapshot Merge failed").state
    'merge_failed'
    """

    state: str
    used_sectors: int | None
    total_sectors: int | None
    metadata_sectors: int | None

    @property
    def valid(self) -> bool:
        return self.state == "valid"

    @property
    def invalid(self) -> bool:
        return self.state == "invalid"

    @property
    def overflow(self) -> bool:
        return self.state == "overflow"

    @property
    def merge_failed(self) -> bool:
        return self.state == "merge_failed"


@dataclass(frozen=True)
class SnapshotMergeStatus(SnapshotStatus):
    """``snapshot-merge``: as a snapshot; the merge is done when USED == METADATA.

    >>> st = parse_status("0 32768 snapshot-merge 40/8192 16")
    >>> st.remaining_sectors, st.merged
    (24, False)
    """

    @property
    def remaining_sectors(self) -> int | None:
        """Sectors of exceptions still to merge back (``None`` unless valid)."""
        if self.used_sectors is None or self.metadata_sectors is None:
            return None
        return max(0, self.used_sectors - self.metadata_sectors)

    @property
    def merged(self) -> bool:
        return self.remaining_sectors == 0


_SNAPSHOT_STATES = {"Invalid": "invalid", "Overflow": "overflow", "Merge failed": "merge_failed"}


def _snapshot(cls: type[SnapshotStatus]) -> Callable[[int, int, str, tuple[str, ...]],
                                                         SnapshotStatus]:
    def parse(start: int, length: int, ttype: str, p: tuple[str, ...]) -> SnapshotStatus:
        text = " ".join(p)
        if text in _SNAPSHOT_STATES:
            return cls(start, length, ttype, p, _SNAPSHOT_STATES[text], None, None, None)
        if len(p) != 2 or p[0].count("/") != 1:
            raise ValueError(f"{ttype} status: expected USED/TOTAL METADATA, got {text!r}")
        used, total = p[0].split("/")
        return cls(start, length, ttype, p, "valid", uint(used, "used sectors"),
                   uint(total, "total sectors"), uint(p[1], "metadata sectors"))
    return parse


@dataclass(frozen=True)
class MirrorLeg:
    """One mirror leg: its device and its health character.

    ``A`` alive, ``D`` a write failed, ``S`` a resync failed, ``R`` a read
    failed, ``U`` failed for another reason.
    """

    device: str
    health: str

    @property
    def alive(self) -> bool:
        return self.health == "A"


@dataclass(frozen=True)
class MirrorStatus(TargetStatus):
    """``mirror``: ``N DEV... INSYNC/TOTAL 1 HEALTH LOGARGC LOGTYPE LOGARGS...``.

    >>> st = parse_status("0 8192 mirror 2 254:0 254:64 3/8 1 AD 1 core")
    >>> st.in_sync_regions, st.total_regions, st.in_sync, st.degraded, st.log_health
    (3, 8, False, True, None)
    """

    legs: tuple[MirrorLeg, ...]
    in_sync_regions: int
    total_regions: int
    log_type: str
    log_args: tuple[str, ...]

    @property
    def in_sync(self) -> bool:
        return self.in_sync_regions >= self.total_regions

    @property
    def degraded(self) -> bool:
        return any(not leg.alive for leg in self.legs)

    @property
    def log_device(self) -> str | None:
        """The disk log's device (``None`` for a core log)."""
        return self.log_args[0] if self.log_type == "disk" and self.log_args else None

    @property
    def log_health(self) -> str | None:
        """The disk log's state: ``A`` alive, ``D`` failed, ``F`` a flush failed."""
        return self.log_args[1] if self.log_type == "disk" and len(self.log_args) > 1 else None


def _mirror(start: int, length: int, ttype: str, p: tuple[str, ...]) -> MirrorStatus:
    try:
        n = uint(p[0], "number of legs")
        devices = p[1:1 + n]
        regions, nr_health, health = p[1 + n], p[2 + n], p[3 + n]
        log_argc = uint(p[4 + n], "log argument count")
        log_type, log_args = p[5 + n], p[6 + n:]
    except IndexError:
        raise ValueError(f"mirror status too short: {' '.join(p)!r}") from None
    if len(devices) != n or len(health) != n or nr_health != "1" or regions.count("/") != 1:
        raise ValueError(f"mirror status malformed: {' '.join(p)!r}")
    if log_argc != 1 + len(log_args):
        raise ValueError(f"mirror status: log argument count {log_argc} does not match")
    in_sync, total = regions.split("/")
    return MirrorStatus(start, length, ttype, p,
                        tuple(MirrorLeg(d, h) for d, h in zip(devices, health, strict=True)),
                        uint(in_sync, "in-sync regions"), uint(total, "total regions"),
                        log_type, tuple(log_args))


def _empty(start: int, length: int, ttype: str, p: tuple[str, ...]) -> TargetStatus:
    return EmptyStatus(start, length, ttype, p)


STATUS_PARSERS: dict[str, Callable[[int, int, str, tuple[str, ...]], TargetStatus]] = {
    "linear": _empty, "zero": _empty, "error": _empty, "flakey": _empty,
    "snapshot-origin": _empty,
    "snapshot": _snapshot(SnapshotStatus),
    "snapshot-merge": _snapshot(SnapshotMergeStatus),
    "mirror": _mirror,
}


def parse_status(line: str) -> TargetStatus:
    """The typed status of one ``dmsetup status`` line (see the module's examples)."""
    start, length, ttype, params = split_line(line)
    parser = STATUS_PARSERS.get(ttype)
    if parser is None:
        return RawStatus(start, length, ttype, params)
    return parser(start, length, ttype, params)


# -- info -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """``dmsetup info`` of one device, as the ``info`` verb's data reports it.

    ``event_nr`` counts the events its targets raised (a mirror leg failing,
    a snapshot becoming invalid, a resync finishing): ``wait`` blocks on it.
    """

    name: str
    uuid: str
    suspended: bool
    live: bool
    inactive: bool
    open_count: int
    event_nr: int
    nr_targets: int
    nr_sectors: int
    path: str
    in_flight: int
    #: the block device (``/dev/loopN``) and its ``MAJ:MIN`` when it has one, else ""
    block_device: str = ""
    block_devno: str = ""
    #: the live table was loaded read-only (``create``/``reload --readonly``)
    read_only: bool = False
    #: ``remove --deferred`` is pending: it goes when its last opener closes
    deferred_remove: bool = False

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> DeviceInfo:
        """From one entry of the reply's list; fields unknown here are ignored."""
        fields = dataclasses.fields(cls)
        names = {f.name for f in fields}
        missing = {f.name for f in fields if f.default is dataclasses.MISSING} - set(data)
        if missing:
            raise ValueError(f"info reply lacks {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in data.items() if k in names})
