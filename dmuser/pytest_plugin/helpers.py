"""Operations that read like what they stand for: snapshots, merges, mirrors, faults.

Why: each of these is a dmsetup ritual of several steps in a fixed order
(README: "A snapshot, changes, and a merge back", "A mirror, a failed leg,
and a resync"); a test that gets the order wrong hangs or tests nothing.
Here each ritual is one call:

* :func:`snapshot` ``(origin) -> Snap``: suspend the origin, create the
  snapshot, turn the origin into ``snapshot-origin``, resume (the LVM way).
  :meth:`Snap.merge` hands the snapshot back to the origin (``snapshot-merge``)
  and, with ``wait=True``, returns once the merge is complete and the origin
  is back on its own table -- its content is then the snapshot's.
* :func:`mirror` ``(devices, n_legs, log=...) -> Mirror`` on legs that are
  devices of their own, so :meth:`Mirror.fail_leg` can switch one to
  ``error`` live; :meth:`Mirror.repair_leg` puts it back and reloads the
  mirror (which resyncs); :meth:`Mirror.wait_in_sync` waits for that.
* :func:`flakey` ``(dev) -> Flakey``: ``drop_writes()``, ``error_writes()``,
  ``error_reads()`` switch the device's own table to ``flakey`` in place (same
  file, no remount); ``restore()`` puts the linear table back.
* :func:`swap_in_error` ``(dev, start, length) -> Swap``: sectors
  ``[start, start+length)`` fail with EIO until ``restore()``.

Flakey and Swap are context managers that restore on exit.  Statuses are the
typed ones of :mod:`dmuser.status`.  Every device made here belongs to the
:class:`~dmuser.pytest_plugin.devices.Devices` of the device passed in, so
the fixture's teardown removes it.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Literal, Self

from dmuser.pytest_plugin.devices import SECTOR, Device, Devices, MiB
from dmuser.status import (
    LinearTable,
    MirrorStatus,
    SnapshotMergeStatus,
    SnapshotOriginTable,
    SnapshotStatus,
    TableLine,
)

__all__ = ["Flakey", "Mirror", "Snap", "Swap", "flakey", "mirror", "snapshot", "swap_in_error"]


def _only_linear(dev: Device, what: str) -> LinearTable:
    lines = dev.table()
    if len(lines) != 1 or not isinstance(lines[0], LinearTable):
        raise ValueError(f"{what} needs a one-line linear table on {dev.name}, "
                         f"found {[str(x) for x in lines]}")
    return lines[0]


def _poll(check: object, timeout: float, what: str) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# -- snapshots ---------------------------------------------------------------------------


class Snap:
    """A snapshot of ``origin``; :attr:`device` reads the origin as it was when taken."""

    def __init__(self, origin: Device, device: Device, image: str, cow: str, store: str,
                 chunk: int, origin_table: str) -> None:
        self.origin, self.device = origin, device
        self.image, self.cow, self.store, self.chunk = image, cow, store, chunk
        self._origin_table = origin_table
        #: a merge was started / has completed (the snapshot device is gone then)
        self.merging = False
        self.merged = False

    def __repr__(self) -> str:
        return f"Snap({self.device.name!r} of {self.origin.name!r})"

    def status(self) -> SnapshotStatus:
        """The snapshot's status; while merging, the origin's ``snapshot-merge`` status
        (a :class:`SnapshotMergeStatus`).  After the merge there is none (NoSuchDevice)."""
        st = (self.origin if self.merging else self.device).status()[0]
        assert isinstance(st, SnapshotStatus), st
        return st

    def merge(self, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Merge the snapshot back into the origin and remove the snapshot device.

        The origin stays usable and shows the snapshot's content at once.  With
        ``wait`` (default) this returns after :meth:`wait_merged`."""
        if not self.store.startswith("P"):
            raise ValueError("only a persistent snapshot (store 'P') can be merged")
        c, n = self.origin.client, self.origin.sectors
        c.suspend(self.device.name)  # the source must be suspended before the handover
        c.suspend(self.origin.name)
        try:
            c.reload(self.origin.name,
                     f"0 {n} snapshot-merge {self.image} {self.cow} P {self.chunk}")
        finally:
            c.resume(self.origin.name)
        self.device.devices.remove(self.device)  # suspended: udev does not probe it
        self.merging = True
        if wait:
            self.wait_merged(timeout)

    def wait_merged(self, timeout: float = 60.0) -> None:
        """Wait for the merge to complete, then put the origin back on the table it had
        before the snapshot (the COW is then empty)."""
        def done() -> bool:
            st = self.origin.status()[0]
            assert isinstance(st, SnapshotMergeStatus), st
            if st.merge_failed or st.invalid:
                raise RuntimeError(f"merge into {self.origin.name} failed: {st.state}")
            return st.merged

        _poll(done, timeout, f"the merge into {self.origin.name}")
        self.origin.switch(self._origin_table)
        self.merging, self.merged = False, True

    def remove(self) -> None:
        """Drop the snapshot (the origin keeps its current content)."""
        self.device.devices.remove(self.device)


def snapshot(origin: Device, *, chunk: int = 8, store: str = "P",
             cow_size: int | None = None) -> Snap:
    """Take a snapshot of ``origin`` (a linear device at offset 0, or a snapshot-origin).

    The COW is a new image of ``cow_size`` bytes (default: half the origin, at
    least 1 MiB).  A mounted file system on the origin should be frozen (or
    unmounted) around this call, as for ``lvcreate -s``."""
    lines = origin.table()
    if len(lines) == 1 and isinstance(lines[0], SnapshotOriginTable):
        image, origin_table = lines[0].origin, str(lines[0])
    else:
        lin = _only_linear(origin, "snapshot()")
        if lin.offset != 0:
            raise ValueError("snapshot(): the origin's linear table must start at offset 0")
        image, origin_table = lin.device, str(lin)
    devices, n = origin.devices, origin.sectors
    size = cow_size or max(MiB, (n * SECTOR // 2) // SECTOR * SECTOR)
    cow = str(devices.image(size))
    c = origin.client
    c.suspend(origin.name)
    try:
        snap = devices.create(f"0 {n} snapshot {image} {cow} {store} {chunk}")
        c.reload(origin.name, f"0 {n} snapshot-origin {image}")
    finally:
        c.resume(origin.name)
    return Snap(origin, snap, image, cow, store, chunk, origin_table)


# -- mirrors -----------------------------------------------------------------------------


class Mirror:
    """A mirror over leg devices :attr:`legs`; :attr:`device` is the mirror itself."""

    def __init__(self, device: Device, legs: list[Device], leg_tables: list[str],
                 table: str, handle_errors: bool) -> None:
        self.device, self.legs = device, legs
        self._leg_tables, self.table = leg_tables, table
        self.handle_errors = handle_errors

    def __repr__(self) -> str:
        return f"Mirror({self.device.name!r}, {len(self.legs)} legs)"

    def status(self) -> MirrorStatus:
        st = self.device.status()[0]
        assert isinstance(st, MirrorStatus), st
        return st

    def fail_leg(self, i: int) -> None:
        """Leg ``i`` turns into ``error`` (live): its next write or read fails."""
        self.legs[i].switch(f"0 {self.legs[i].sectors} error")

    def repair_leg(self, i: int) -> None:
        """Put leg ``i`` back and reload the mirror with its table, which resyncs it.

        With ``handle_errors`` held writes are released first by a suspend (they
        complete with EIO, as in the kernel)."""
        if self.handle_errors:
            self.device.client.suspend(self.device.name)
        self.legs[i].switch(self._leg_tables[i])
        self.device.switch(self.table)

    def wait_in_sync(self, timeout: float = 60.0) -> MirrorStatus:
        """Wait until every region is in sync; the status then."""
        last: list[MirrorStatus] = []

        def done() -> bool:
            last[:] = [self.status()]
            return last[0].in_sync

        _poll(done, timeout, f"mirror {self.device.name} to get in sync")
        return last[0]


def mirror(devices: Devices, n_legs: int = 2, *, log: Literal["core", "disk"] = "core",
           size: int = 8 * MiB, region: int = 1024, handle_errors: bool = False,
           nosync: bool = False) -> Mirror:
    """An ``n_legs`` mirror of ``size`` bytes with a core or disk log (``region`` in
    sectors); each leg is a linear device of its own (so it can fail live)."""
    if log not in ("core", "disk"):
        raise ValueError(f"log must be 'core' or 'disk', not {log!r}")
    n = size // SECTOR
    legs = [devices.linear(size) for _ in range(n_legs)]
    leg_tables = [str(leg.table()[0]) for leg in legs]
    log_args = [str(devices.image(MiB))] if log == "disk" else []
    log_args += [str(region)] + (["nosync"] if nosync else [])
    words = [log, str(len(log_args)), *log_args, str(n_legs)]
    for leg in legs:
        words += [str(leg.path), "0"]
    if handle_errors:
        words += ["1", "handle_errors"]
    table = f"0 {n} mirror {' '.join(words)}"
    return Mirror(devices.create(table), legs, leg_tables, table, handle_errors)


# -- faults ------------------------------------------------------------------------------


class _Restorable:
    """A device whose table was switched; :meth:`restore` switches it back."""

    def __init__(self, dev: Device, original: list[str]) -> None:
        self.dev, self._original = dev, original

    def restore(self) -> None:
        """Put the table back as it was."""
        self.dev.switch(self._original)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.restore()


class Flakey(_Restorable):
    """``dev`` (a linear device) switched to ``flakey`` over the same backing, in place."""

    def __init__(self, dev: Device) -> None:
        lin = _only_linear(dev, "flakey()")
        super().__init__(dev, [str(lin)])
        self._base = f"0 {lin.length} flakey {lin.device} {lin.offset}"

    def _down(self, feature: str | None) -> Flakey:
        # up 0 s, down 1 s: down all the time
        self.dev.switch(f"{self._base} 0 1" + (f" 1 {feature}" if feature else ""))
        return self

    def drop_writes(self) -> Flakey:
        """Writes succeed but are thrown away; reads work."""
        return self._down("drop_writes")

    def error_writes(self) -> Flakey:
        """Writes fail with EIO; reads work."""
        return self._down("error_writes")

    def error_reads(self) -> Flakey:
        """Reads fail with EIO; writes work."""
        return self._down("error_reads")

    def fail_all(self) -> Flakey:
        """Every I/O fails (flakey's down interval without features)."""
        return self._down(None)


class Swap(_Restorable):
    """Sectors ``[start, start+length)`` of ``dev`` replaced by ``error``."""


def _split(line: TableLine, start: int, end: int) -> list[str]:
    """``line`` with the sectors ``[start, end)`` (absolute) turned into ``error``."""
    lo, hi = max(start, line.start), min(end, line.start + line.length)
    if lo >= hi:
        return [str(line)]
    if not isinstance(line, LinearTable) and line.target_type not in ("error", "zero"):
        raise ValueError(f"swap_in_error(): cannot split a {line.target_type} target")

    def piece(s: int, e: int) -> str:
        if isinstance(line, LinearTable):
            return f"{s} {e - s} linear {line.device} {line.offset + s - line.start}"
        return f"{s} {e - s} {line.target_type}"

    out = [piece(line.start, lo)] if lo > line.start else []
    out.append(f"{lo} {hi - lo} error")
    if hi < line.start + line.length:
        out.append(piece(hi, line.start + line.length))
    return out


def swap_in_error(dev: Device, start: int, length: int) -> Swap:
    """Make sectors ``[start, start+length)`` of ``dev`` fail with EIO, live (linear,
    zero and error targets can be split); ``.restore()`` or a ``with`` block undoes it."""
    lines = dev.table()
    if length <= 0 or start < 0 or start + length > sum(x.length for x in lines):
        raise ValueError(f"swap_in_error(): {start}+{length} is not inside {dev.name}")
    new = [p for line in lines for p in _split(line, start, start + length)]
    swap = Swap(dev, [str(x) for x in lines])
    dev.switch(new)
    return swap


def flakey(dev: Device) -> Flakey:
    """A :class:`Flakey` handle on ``dev``; nothing changes until a fault is chosen."""
    return Flakey(dev)
