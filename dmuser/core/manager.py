"""The device namespace: mapped devices by name, backing devices by identity.

The manager owns every mapped device of one daemon and the verbs that change
the set of them: ``create``, ``remove`` (also deferred: a background task
removes a busy device once it is unused), suspend and resume with the block
device's freeze, size and udev handling (``loopdev.py``), and the shutdown
order (``shutdown.py``).  It builds tables, turning their words into devices
with ``resolve.py`` (``dm_get_device``).

Backing files are opened once and shared, real block devices claimed with
``O_EXCL`` (``backing.py``), and a mapped device used by another table counts
a holder, which blocks its removal.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import trio

from dmuser.core import shutdown
from dmuser.core.backing import BackingFiles
from dmuser.core.blockdev import BlockDevice, FileDevice
from dmuser.core.config import Config
from dmuser.core.errors import (
    DeviceBusyError,
    DeviceExistsError,
    DmError,
    NoSuchDeviceError,
    TableError,
)
from dmuser.core.io_policy import IoPolicy
from dmuser.core.loopdev import LoopDevices
from dmuser.core.mapped_device import DeviceInfo, MappedDevice
from dmuser.core.mapper_links import MAPPER_DIR
from dmuser.core.nbd_device import NbdDevice
from dmuser.core.nbd_wire import is_nbd_uri
from dmuser.core.resolve import WordResolver, connect_nbd
from dmuser.core.table import Table, TargetServices, parse_table
from dmuser.core.target import TargetRegistry
from dmuser.core.units import MAX_DEVICE_SECTORS

log = logging.getLogger(__name__)

MAX_NAME_LEN = 127
#: how often a device with a deferred remove pending is checked for its last close
DEFERRED_POLL_SECONDS = 0.2


def check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or len(name) > MAX_NAME_LEN \
            or "\0" in name or not name.isprintable():
        raise TableError(f"invalid device name {name!r}: use 1-{MAX_NAME_LEN} printable "
                         "characters, no '/'")


class DeviceManager:
    """Owns every mapped device and every open backing device of one daemon."""

    def __init__(self, mountpoint: str = "", *, types: TargetRegistry,
                 config: Config | None = None) -> None:
        self.mountpoint = os.path.abspath(mountpoint) if mountpoint else ""
        #: the target types tables may use (the daemon registers the built-in ones)
        self.types = types
        self.config = config or Config()
        #: how every backing file of this daemon runs its syscalls (one thread limiter)
        self.io_policy = IoPolicy(self.config)
        #: state a target type shares between its instances (see TargetContext.shared)
        self._shared: dict[str, Any] = {}
        self.devices: dict[str, MappedDevice] = {}
        self._backing = BackingFiles()
        #: called when a device appears or disappears (the FUSE layer listens)
        self.on_change: Callable[[], None] | None = None
        #: where targets run background work; set by the daemon (see TargetContext)
        self.service_nursery: trio.Nursery | None = None
        #: the block devices of ``serve --block-devices``; None when off
        self.loops: LoopDevices | None = None
        #: verbs that change the namespace or build tables hold it (``daemon.py``),
        #: and so does a deferred remove when it acts
        self.namespace_lock = trio.Lock()

    def __iter__(self) -> Iterator[MappedDevice]:
        return iter(sorted(self.devices.values(), key=lambda md: md.name))

    def get(self, name: str) -> MappedDevice:
        md = self.devices.get(name)
        if md is None:
            raise NoSuchDeviceError(f"Device {name} does not exist.")
        return md

    def path_of(self, name: str) -> str:
        return os.path.join(self.mountpoint, name) if self.mountpoint else name

    # -- tables (word resolution: ``resolve.py``) ---------------------------------------

    def _open_backing(self, path: str) -> FileDevice:
        return self._backing.acquire(path, self.io_policy)

    def open_backing_files(self) -> list[str]:
        """Paths of the backing files and block devices open now (for checks and reports)."""
        return self._backing.paths()

    def release(self, dev: BlockDevice) -> None:
        """Give back a device a :class:`WordResolver` handed out (``dm_put_device``)."""
        if isinstance(dev, MappedDevice):
            dev.holders -= 1
            return
        if isinstance(dev, NbdDevice):
            dev.close()
            return
        assert isinstance(dev, FileDevice)
        self._backing.release(dev)

    async def build_table(self, md: MappedDevice, text: str, cwd: str) -> Table:
        """Build a table for ``md`` from ``text`` (words resolved from ``cwd``); a
        failure gives back every device it took (``Table.build``) and closes its
        unused NBD connections."""
        specs = parse_table(text)
        end = max(spec.start + spec.length for spec in specs)
        if end > MAX_DEVICE_SECTORS:
            raise TableError(f"{md.name}: a device of {end} sectors is too large: a dmuser "
                             f"device is a file, of at most {MAX_DEVICE_SECTORS} sectors "
                             "(2^63 - 1 bytes)")
        services = TargetServices(nursery=self.service_nursery, table_event=md.table_event,
                                  noflush_suspending=md.noflush_suspending,
                                  config=self.config, shared=self._shared)
        words = [w for spec in specs for w in spec.args if is_nbd_uri(w)]
        nbd = None
        if words:
            if self.service_nursery is None:
                raise DmError("NBD devices need the daemon's service nursery")
            nbd = await connect_nbd(words, cwd, self.service_nursery, self.config.nbd_timeout)
        get_device = WordResolver(self.devices, mountpoint=self.mountpoint,
                                  block_devices=self.loops is not None,
                                  open_backing=self._open_backing, cwd=cwd, for_device=md,
                                  nbd=nbd)
        try:
            return await Table.build(md.name, specs, get_device, self.release, services,
                                     types=self.types)
        finally:
            for unused in (nbd or {}).values():
                for dev in unused:
                    dev.close()

    # -- verbs that change the namespace ------------------------------------------------

    async def create(self, name: str, table_text: str | None, cwd: str,
                     uuid: str = "", read_only: bool = False) -> MappedDevice:
        """``dmsetup create``: a new device, with its table loaded and resumed if given."""
        check_name(name)
        if name in self.devices:
            raise DeviceExistsError(f"Device {name} already exists.")
        if uuid and any(md.uuid == uuid for md in self.devices.values()):
            raise DeviceExistsError(f"A device with uuid {uuid} already exists.")
        md = MappedDevice(name, uuid, self.path_of(name))
        if table_text is not None:
            table = await self.build_table(md, table_text, cwd)
            await md.load(table, read_only)
            try:
                await md.resume()
            except BaseException:
                await md.close()
                raise
        self.devices[name] = md
        self._changed()
        if self.loops is not None and md.live is not None:
            try:
                await self.loops.attach(md)
            except BaseException:
                del self.devices[name]
                self._changed()
                await md.close()
                raise
        return md

    async def infos(self, devices: list[MappedDevice]) -> list[DeviceInfo]:
        """``info`` of ``devices``; the open count of one with a block device adds the
        opens of that block device, as the kernel counts a dm device's."""
        counts = await self.loops.open_counts(devices) if self.loops is not None else {}
        return [dataclasses.replace(i, open_count=i.open_count + counts.get(i.name, 0))
                for i in (md.info() for md in devices)]

    async def suspend(self, md: MappedDevice, noflush: bool = False,
                      nolockfs: bool = False) -> None:
        """``dmsetup suspend``: first keep udev off ``md``'s block device and, unless
        ``nolockfs``, freeze the file system mounted on it (it writes back through
        the device, so before the door closes), then :meth:`MappedDevice.suspend`."""
        loops = self.loops if not md.suspended else None
        if loops is not None:
            await loops.suspending(md, lockfs=not nolockfs)
        try:
            await md.suspend(noflush)
        except BaseException:
            if loops is not None:
                await loops.resumed(md)
            raise

    async def resume(self, md: MappedDevice, nolockfs: bool = False) -> None:
        """``dmsetup resume``: a device running when a new table comes in is suspended
        first (frozen unless ``nolockfs``), as the kernel's ``do_resume`` does; then
        the swap, the block device's read-only state, the thaw (also if the block
        device update fails) and, if the device was suspended, its new size and one
        change uevent for the block device (``LoopDevices.resumed``)."""
        if md.inactive is not None and not md.suspended:
            await self.suspend(md, nolockfs=nolockfs)
        was_suspended = md.suspended
        await md.resume()
        if self.loops is not None:
            try:
                await self.sync_block_device(md, defer_resize=was_suspended)
            finally:
                await self.loops.resumed(md, uevent=was_suspended)

    async def sync_block_device(self, md: MappedDevice, defer_resize: bool = False) -> None:
        """After a resume: give ``md`` its block device on its first live table, or
        bring it up to date (size, read-only; with ``defer_resize`` the size waits
        for ``LoopDevices.resumed``).  Nothing without block devices."""
        if self.loops is None or md.live is None or self.devices.get(md.name) is not md:
            return
        if md.block_device:
            await self.loops.update(md, defer_resize)
        else:
            await self.loops.attach(md)

    async def remove(self, name: str, force: bool = False, deferred: bool = False) -> None:
        """``dmsetup remove``: refuse while open or held, unless forced (open only).

        With ``deferred`` a busy device is only marked (``info`` shows it) and is
        removed by a background task once a check every
        :data:`DEFERRED_POLL_SECONDS` finds it no longer busy (the same check
        that refuses a plain remove); a device not busy goes at once.  The
        caller holds :attr:`namespace_lock`.
        """
        md = self.get(name)
        if md.holders:
            busy: str | None = (f"Device {name} is in use by another mapped device "
                                "(remove that one first).")
        elif force:
            busy = None
        else:
            if self.loops is not None and not deferred:
                await self.loops.check_unused(md)
            busy = await self._busy(md)
        if busy is None:
            await self._remove(md)
        elif deferred:
            if self.service_nursery is None:
                raise DmError("a deferred remove needs the daemon's service nursery")
            if not md.deferred_remove:
                md.deferred_remove = True
                self.service_nursery.start_soon(self._remove_when_closed, md)
        else:
            raise DeviceBusyError(busy)

    async def _busy(self, md: MappedDevice) -> str | None:
        """Why ``md`` cannot be removed without force now, or None."""
        if md.holders:
            return f"Device {md.name} is in use by another mapped device."
        if self.loops is not None and await self.loops.is_open(md):
            return (f"Device {md.name} is busy: its block device {md.block_device} "
                    f"({MAPPER_DIR}/{md.name}) is open (mounted or held).")
        opens = md.user_opens
        if opens > 0:
            return (f"Device {md.name} is busy: open count {opens}. "
                    "Use --force to fail its I/O and remove it anyway.")
        return None

    async def _remove_when_closed(self, md: MappedDevice) -> None:
        """The deferred remove of ``md``: poll until it is not busy, then remove it.
        Ends without removing if the mark is cancelled or the device is gone."""
        while True:
            await trio.sleep(DEFERRED_POLL_SECONDS)
            async with self.namespace_lock:
                if self.devices.get(md.name) is not md or not md.deferred_remove:
                    return
                if await self._busy(md) is None:
                    log.info("%s: deferred remove: last opener closed", md.name)
                    await self._remove(md)
                    return

    async def _remove(self, md: MappedDevice) -> None:
        """Detach, forget and close ``md``; then thaw a file system its suspend froze
        (a thaw writes: only now do those writes fail instead of waiting)."""
        if self.loops is not None:
            await self.loops.detach(md)
        del self.devices[md.name]
        self._changed()
        await md.close()
        if self.loops is not None:
            await self.loops.thaw(md)

    # -- shutdown (``shutdown.py``) -----------------------------------------------------

    def stack_order(self) -> list[MappedDevice]:
        """Every device, each one before the devices its tables stack on (top-down)."""
        return shutdown.stack_order(list(self))

    async def quiesce_all(self) -> None:
        """Detach the block devices, then resume (and thaw), suspend and flush every
        device, top-down (``shutdown.py``); last, remove the udev rule and stop the
        thaw watcher (``LoopDevices.close``)."""
        try:
            await shutdown.detach_all(self)
            await shutdown.quiesce_all(self)
        finally:
            if self.loops is not None:
                await self.loops.close()

    async def remove_all(self) -> None:
        """Remove every device, users before the devices they stack on."""
        while self.devices:
            free = [md for md in self.devices.values() if not md.holders]
            if not free:
                raise DeviceBusyError("cannot remove the remaining devices, each is held: "
                                      + ", ".join(sorted(self.devices)))
            for md in free:
                await self.remove(md.name, force=True)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
