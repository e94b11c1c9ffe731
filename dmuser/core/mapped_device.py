"""A mapped device: a name, a live table, an optional inactive table.

Guarantees (see ``docs/suspend-resume.md``):

* **Suspend** stops new bios at the door (they wait in :meth:`submit`), then
  waits until every bio already inside the live table has completed.  When
  ``suspend()`` returns nothing is in flight and nothing will start until
  ``resume()``.
* **Reload + resume** swaps tables atomically: a bio runs entirely against the
  table that was live when it entered, and the swap happens only while
  suspended and drained.  ``resume()`` with an inactive table suspends first if
  needed, as ``dmsetup resume`` does.
* A table's targets are closed only after the table has left service.
* A table loaded read-only (``--readonly``) makes the device read-only while
  it is live: every write but an empty flush fails with EPERM, as a write to a
  read-only kernel block device does; reads, table and status are unchanged.

State changes happen between checkpoints (trio is single-threaded), so the
I/O path needs no lock: ``_suspended`` and ``live`` are read together without
an intervening ``await`` in :meth:`submit`.  State changes (load, clear,
suspend, resume, close) take the device's own ``_state_lock``, so two clients
cannot interleave a suspend with a resume of the same device, while verbs on
other devices (say, resuming the device this one is stacked on) still run.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import trio

from dmuser.core.bio import Bio
from dmuser.core.blockdev import BlockDevice, FileDevice
from dmuser.core.errors import DeviceBusyError, DmError, DmIOError, NoSuchDeviceError, RequeueError
from dmuser.core.table import Table
from dmuser.core.target import StatusType, Target
from dmuser.core.units import SECTOR_SHIFT

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
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
    #: the loop device and its MAJ:MIN with ``serve --block-devices`` (``loopdev.py``), else ""
    block_device: str = ""
    block_devno: str = ""
    read_only: bool = False
    #: ``remove --deferred`` is pending (``DeviceManager.remove``)
    deferred_remove: bool = False


class MappedDevice(BlockDevice):
    """One dmuser device.  Also a :class:`BlockDevice`, so tables can stack on it."""

    def __init__(self, name: str, uuid: str = "", path: str = "") -> None:
        self.name = name
        self.uuid = uuid
        self.path = path
        self.status_name = path or name
        self.live: Table | None = None
        self.inactive: Table | None = None
        self.open_count = 0          # FUSE opens, changed by fuse_ops
        self.holders = 0             # tables of other devices that use this one
        self.event_nr = 0
        self._suspended = False
        self._resumed = trio.Event()
        self._resumed.set()
        self._in_flight = 0
        self._drained: trio.Event | None = None
        self._state_lock = trio.Lock()
        self._noflush = False
        self._event = trio.Event()
        self._closed = False         # close() ran: the device left the namespace
        self.block_device = ""       # /dev/loopN when it has one (set by loopdev.LoopDevices)
        self.block_devno = ""        # its MAJ:MIN
        self.read_only = False       # the live table was loaded read-only
        self._inactive_read_only = False
        self.deferred_remove = False  # set and acted on by the manager

    def __repr__(self) -> str:
        return f"MappedDevice({self.name!r})"

    @property
    def nr_sectors(self) -> int:
        return self.live.nr_sectors if self.live else 0

    @property
    def suspended(self) -> bool:
        return self._suspended

    @property
    def user_opens(self) -> int:
        """Opens of the device's file, but the one its own loop device holds."""
        return self.open_count - (1 if self.block_device else 0)

    # -- I/O ----------------------------------------------------------------------------

    async def submit(self, bio: Bio) -> None:
        """Run ``bio`` through the live table; waits while the device is suspended.

        A bio a target requeues during a ``--noflush`` suspend (RequeueError)
        waits for the resume and runs again against the table live then.
        """
        while True:
            while self._suspended:
                await self._resumed.wait()
            table = self.live
            if table is None:
                raise DmIOError(f"{self.name}: no live table", 6)  # ENXIO
            if self.read_only and bio.is_write and not bio.is_empty_flush:
                raise DmIOError(f"{self.name}: the device is read-only", errno.EPERM)
            self._in_flight += 1
            try:
                await table.submit(bio)
                return
            except RequeueError:
                log.info("%s: bio at sector %d requeued until resume", self.name, bio.sector)
            finally:
                self._in_flight -= 1
                if self._in_flight == 0 and self._drained is not None:
                    self._drained.set()

    # -- the direct path: a one-target table remapping straight onto a file, no bio -------
    #
    # Applies when the device is not suspended, its live table is ``direct`` (see
    # ``Table.direct``), its target accepts this request now (``direct_remap``)
    # and the request is small enough for inline I/O.  Each call
    # returns None/False when it does not apply, and also when the syscall failed:
    # the caller then sends the request through submit(), which waits, maps and
    # reports errors the usual way (a failed attempt is simply repeated there).
    # No in-flight accounting is needed: these never yield to the scheduler, so a
    # suspend or a table swap can never find one half done.  This is the 4 KiB
    # random I/O fast path (docs/benchmarks.md).

    def _direct_target(self, write: bool, sector: int, nbytes: int) -> Target | None:
        """The live table's direct target, if the direct path may be tried at all."""
        table = self.live
        if self._suspended or table is None or table.direct is None \
                or (write and self.read_only) \
                or sector + (nbytes >> SECTOR_SHIFT) > table.nr_sectors:
            return None
        return table.direct

    @staticmethod
    def _inline_place(remap: tuple[BlockDevice, int] | None, sector: int,
                      nbytes: int) -> tuple[FileDevice, int] | None:
        """The file and sector of a ``direct_remap`` answer, if served inline."""
        if remap is None:
            return None
        dev = remap[0]
        if not isinstance(dev, FileDevice) or not dev.serves_inline(nbytes):
            return None
        return dev, sector + remap[1]

    def read_direct(self, sector: int, nbytes: int) -> bytes | None:
        """``nbytes`` (whole sectors) from ``sector`` by the direct path, or None."""
        target = self._direct_target(False, sector, nbytes)
        if target is None:
            return None
        place = self._inline_place(
            target.direct_remap(False, sector, nbytes >> SECTOR_SHIFT), sector, nbytes)
        if place is None:
            return None
        try:
            data = place[0].pread_inline(place[1], nbytes)
        except OSError:
            return None
        return data if len(data) == nbytes else None

    def write_direct(self, sector: int, data: bytes | bytearray | memoryview) -> bool:
        """Write ``data`` (whole sectors) at ``sector`` by the direct path (or let the
        target absorb it: ``Target.absorb_write``); False if not done."""
        target = self._direct_target(True, sector, len(data))
        if target is None:
            return False
        remap = target.direct_remap(True, sector, len(data) >> SECTOR_SHIFT)
        if remap is None:
            return target.absorb_write(sector, data)
        place = self._inline_place(remap, sector, len(data))
        if place is None:
            return False
        try:
            place[0].pwrite_inline(place[1], data)
        except OSError:
            return False
        return True

    async def wait_drained(self) -> None:
        while self._in_flight:
            self._drained = trio.Event()
            await self._drained.wait()
        self._drained = None

    # -- table life cycle ---------------------------------------------------------------

    async def load(self, table: Table, read_only: bool = False) -> None:
        """Install ``table`` as the inactive table (``dmsetup reload``); ``read_only``
        (``--readonly``) makes the device read-only once the table is live."""
        async with self._state_lock:
            old, self.inactive = self.inactive, table
            self._inactive_read_only = read_only
            if old is not None:
                await old.close()

    async def clear(self) -> None:
        """Drop the inactive table (``dmsetup clear``)."""
        async with self._state_lock:
            old, self.inactive = self.inactive, None
            if old is not None:
                await old.close()

    async def suspend(self, noflush: bool = False) -> None:
        """Hold new I/O, drain I/O in flight, run the suspend hooks.  Idempotent.

        With ``noflush`` (``dmsetup suspend --noflush``), targets may hand bios
        they hold back for requeueing instead of failing them; those run again
        after resume (typically on a repaired table).
        """
        async with self._state_lock:
            await self._suspend(noflush)

    def noflush_suspending(self) -> bool:
        return self._suspended and self._noflush

    async def _suspend(self, noflush: bool = False) -> None:
        if self._suspended:
            return
        self._noflush = noflush
        self._suspended = True
        self._resumed = trio.Event()
        table = self.live
        if table is not None:
            for target in table.targets:
                await target.presuspend()
        await self.wait_drained()
        if table is not None:
            for target in table.targets:
                await target.postsuspend()

    async def resume(self) -> None:
        """Swap in the inactive table if there is one, run resume hooks, release I/O."""
        async with self._state_lock:
            await self._resume()

    async def _resume(self) -> None:
        if self.inactive is None and not self._suspended:
            return
        old: Table | None = None
        if self.inactive is not None:
            if self.live is None:
                self._suspended = True
                self._resumed = trio.Event()
            await self._suspend()
            old, self.live, self.inactive = self.live, self.inactive, None
            self.read_only = self._inactive_read_only
        try:
            if self.live is None:  # suspended without ever having a table: dm_resume's -EINVAL
                raise DmError(f"{self.name}: no table to resume")
            for target in self.live.targets:
                await target.preresume()
            for target in self.live.targets:
                await target.resume()
        finally:
            # As the kernel's do_resume: the old table is destroyed only after the
            # new one's resume hooks ran (snapshot handover looks at it), even if
            # they failed.
            if old is not None:
                await old.close()
        self._suspended = False
        self._noflush = False
        self._resumed.set()

    async def close(self) -> None:
        """Destroy both tables.  The device must not be in use."""
        if self.holders:
            raise DeviceBusyError(f"{self.name}: device is in use by another mapped device")
        async with self._state_lock:
            await self._suspend()
            for table in (self.inactive, self.live):
                if table is not None:
                    await table.close()
            self.live = self.inactive = None
            self._suspended = False
            self._resumed.set()  # waiters wake and find no table: ENXIO
            self._closed = True
            self._event.set()    # event waiters wake and find the device gone: ENXIO

    # -- events -------------------------------------------------------------------------

    def table_event(self) -> None:
        """A target reports a state change (``dm_table_event``): bump ``event_nr``."""
        self.event_nr += 1
        self._event.set()
        self._event = trio.Event()

    async def wait_event(self, after: int) -> int:
        """Wait until ``event_nr`` exceeds ``after`` (``dmsetup wait``); return it.

        Takes no lock.  If the device is closed (removed, or the daemon shuts
        down) first, raises NoSuchDeviceError instead of waiting forever.
        """
        while self.event_nr <= after:
            if self._closed:
                raise NoSuchDeviceError(f"Device {self.name} was removed.")
            await self._event.wait()
        return self.event_nr

    # -- reporting ----------------------------------------------------------------------

    def table_lines(self, kind: StatusType, inactive: bool = False) -> list[str]:
        table = self.inactive if inactive else self.live
        if table is None:
            raise NoSuchDeviceError(f"{self.name}: no {'inactive' if inactive else 'live'} table")
        return table.lines(kind)

    def info(self) -> DeviceInfo:
        return DeviceInfo(
            name=self.name, uuid=self.uuid, suspended=self._suspended,
            live=self.live is not None, inactive=self.inactive is not None,
            open_count=self.user_opens, event_nr=self.event_nr,
            nr_targets=len(self.live.targets) if self.live else 0,
            nr_sectors=self.nr_sectors, path=self.path, in_flight=self._in_flight,
            block_device=self.block_device, block_devno=self.block_devno,
            read_only=self.read_only, deferred_remove=self.deferred_remove)
