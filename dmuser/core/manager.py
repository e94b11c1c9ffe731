"""The device namespace: mapped devices by name, backing devices by identity.

Resolving a table word to a device (``dm_get_device``):

* ``MAJ:MIN`` — the real block device with that number.
* a word without ``/`` that names a mapped device — that device (stacking is
  resolved here, in process: dmuser never opens its own FUSE files).
* a path whose directory is the mountpoint — the mapped device of that name.
* with ``serve --block-devices``: ``/dev/mapper/NAME`` of a mapped device, or
  the path or ``MAJ:MIN`` of a mapped device's loop device — that mapped
  device, in process (I/O through the loop device would come back to the
  daemon through its own FUSE file).
* any other path — an image file or block device, relative paths taken from
  the client's working directory.
* ``nbd[s]://host[:port]/export`` or ``nbd[s]+unix:///export?socket=PATH`` — a
  remote NBD export (``nbd_device.py``).  Each such word gets a connection of its
  own, made (asynchronously) before the table's constructors run, because
  resolution itself is synchronous; a reload therefore reconnects.

Backing files are opened once and shared, real block devices claimed with
``O_EXCL`` (``backing.py``), and a mapped device used by another table counts
a holder, which blocks its removal.  A table may not refer to its own device,
directly or through the devices it stacks on.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from typing import Any

import trio

from dmuser.core import shutdown
from dmuser.core.backing import BackingFiles
from dmuser.core.blockdev import BlockDevice, FileDevice, IoPolicy
from dmuser.core.config import Config
from dmuser.core.errors import (
    DeviceBusyError,
    DeviceExistsError,
    DmError,
    NoSuchDeviceError,
    TableError,
)
from dmuser.core.hostdev import block_device_node
from dmuser.core.loopdev import LoopDevices
from dmuser.core.mapped_device import DeviceInfo, MappedDevice
from dmuser.core.mapper_links import MAPPER_DIR
from dmuser.core.nbd_device import NbdDevice
from dmuser.core.nbd_wire import is_nbd_uri, parse_uri
from dmuser.core.table import Table, TargetServices, parse_table
from dmuser.core.target import TargetRegistry
from dmuser.core.units import MAX_DEVICE_SECTORS

log = logging.getLogger(__name__)

_MAJ_MIN = re.compile(r"^(\d+):(\d+)$")
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

    # -- resolution ---------------------------------------------------------------------

    def _depends_on(self, md: MappedDevice, target: MappedDevice) -> bool:
        """True if ``md`` is ``target`` or stacks on it, through live or inactive tables."""
        if md is target:
            return True
        for table in (md.live, md.inactive):
            for dev in table.devices() if table else ():
                if isinstance(dev, MappedDevice) and self._depends_on(dev, target):
                    return True
        return False

    def _lookup_mapped(self, name: str, for_device: MappedDevice) -> MappedDevice:
        md = self.get(name)
        if self._depends_on(md, for_device):
            raise TableError(f"{name}: a table cannot use its own device "
                             f"(directly or through stacked devices)")
        return md

    def resolver(self, cwd: str, for_device: MappedDevice,
                 nbd: dict[str, list[NbdDevice]] | None = None) -> Callable[[str], BlockDevice]:
        """A ``get_device`` function for building a table of ``for_device``; ``nbd``
        holds the connections :meth:`connect_nbd` made for the table's NBD words."""

        def get_device(word: str) -> BlockDevice:
            dev: BlockDevice
            if is_nbd_uri(word):
                if not nbd or not nbd.get(word):
                    raise NoSuchDeviceError(f"{word}: not connected")
                return nbd[word].pop()
            match = _MAJ_MIN.match(word)
            if match:
                own = self._mapped_by_block(word, cwd)
                if own is not None:
                    dev = self._lookup_mapped(own.name, for_device)
                    dev.holders += 1
                    return dev
                node = block_device_node(word)
                if node is None:
                    raise NoSuchDeviceError(f"no block device {word}")
                return self._open_backing(node)
            if "/" not in word and word in self.devices:
                dev = self._lookup_mapped(word, for_device)
            else:
                path = os.path.normpath(os.path.join(cwd, word))
                if self.mountpoint and os.path.dirname(path) == self.mountpoint:
                    dev = self._lookup_mapped(os.path.basename(path), for_device)
                elif (own := self._mapped_by_block(word, cwd)) is not None:
                    dev = self._lookup_mapped(own.name, for_device)
                else:
                    return self._open_backing(path)
            assert isinstance(dev, MappedDevice)
            dev.holders += 1
            return dev

        return get_device

    def _mapped_by_block(self, word: str, cwd: str) -> MappedDevice | None:
        """The mapped device whose block device ``word`` names (``/dev/mapper/NAME``,
        its loop device's path or ``MAJ:MIN``), or None.  Never for paths under
        the mountpoint (a stat there would be a FUSE request to ourselves)."""
        if self.loops is None:
            return None
        if _MAJ_MIN.match(word):
            devno = word
        else:
            path = os.path.normpath(os.path.join(cwd, word))
            md = self.devices.get(os.path.basename(path))
            if os.path.dirname(path) == MAPPER_DIR and md is not None and md.block_device:
                return md
            try:
                st = os.stat(path)
            except OSError:
                return None
            if not stat.S_ISBLK(st.st_mode):
                return None
            devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return next((md for md in self.devices.values() if md.block_devno == devno), None)

    def _open_backing(self, path: str) -> FileDevice:
        return self._backing.acquire(path, self.io_policy)

    def open_backing_files(self) -> list[str]:
        """Paths of the backing files and block devices open now (for checks and reports)."""
        return self._backing.paths()

    def release(self, dev: BlockDevice) -> None:
        """Give back a device obtained from a resolver."""
        if isinstance(dev, MappedDevice):
            dev.holders -= 1
            return
        if isinstance(dev, NbdDevice):
            dev.close()
            return
        assert isinstance(dev, FileDevice)
        self._backing.release(dev)

    async def build_table(self, md: MappedDevice, text: str, cwd: str) -> Table:
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
        nbd = await self.connect_nbd(words, cwd) if words else None
        try:
            return await Table.build(md.name, specs, self.resolver(cwd, md, nbd), self.release,
                                     services, types=self.types)
        finally:
            for unused in (nbd or {}).values():
                for dev in unused:
                    dev.close()

    async def connect_nbd(self, words: list[str], cwd: str) -> dict[str, list[NbdDevice]]:
        """One NBD connection per occurrence of each word; all or nothing."""
        if self.service_nursery is None:
            raise DmError("NBD devices need the daemon's service nursery")
        made: dict[str, list[NbdDevice]] = {}
        try:
            for word in words:
                dev = await NbdDevice.connect(parse_uri(word, cwd), self.service_nursery,
                                              self.config.nbd_timeout)
                made.setdefault(word, []).append(dev)
        except BaseException:
            for devs in made.values():
                for dev in devs:
                    dev.close()
            raise
        return made

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
        the swap, the block device's size and read-only state, and the thaw."""
        if md.inactive is not None and not md.suspended:
            await self.suspend(md, nolockfs=nolockfs)
        await md.resume()
        if self.loops is not None:
            await self.sync_block_device(md)
            await self.loops.resumed(md)

    async def sync_block_device(self, md: MappedDevice) -> None:
        """After a resume: give ``md`` its block device on its first live table, or
        bring it up to date (size, read-only).  Nothing without block devices."""
        if self.loops is None or md.live is None or self.devices.get(md.name) is not md:
            return
        if md.block_device:
            await self.loops.update(md)
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
        """Detach the block devices, then resume, suspend and flush every device,
        top-down (``shutdown.py``)."""
        await shutdown.detach_all(self)
        if self.loops is not None:
            await self.loops.close()
        await shutdown.quiesce_all(self)

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
