"""Real block devices for mapped devices (``dmuser serve --block-devices``, root only).

Each mapped device with a live table gets a loop device on its FUSE file and
the link ``/dev/mapper/NAME -> ../loopN`` (what udev makes for a kernel dm
device is ``../dm-N``).  Guarantees:

* the loop device and the link are made when the device first has a live
  table and kept for its life; a table swap that changes the size updates the
  loop device's capacity (``losetup -c``);
* while it has one, tables stacked on the device print it as ``MAJ:MIN`` of
  its loop device (``status_name``), as the kernel prints every device of a
  table (``format_dev_t``), so ``dmsetup table`` output loads back;
* the loop device is read-only (BLKROSET) exactly while the device's live
  table is (``--readonly``), so writes to it fail with EPERM and ``mount``
  falls back to read-only, as on a kernel dm device;
* :meth:`LoopDevices.freeze` freezes (FIFREEZE) the file systems mounted on
  the loop device before a suspend stops I/O, and :meth:`LoopDevices.thaw`
  thaws them after the resume: the kernel's lockfs.  Both write through the
  device (the freeze its dirty data, ext4's thaw its superblock), so the
  freeze runs before the device closes its door, the thaw only once it is
  open again, and both in a worker thread.  A watcher process thaws them if
  the daemon dies in between (``thaw_watch.py``);
* ``remove`` refuses while the loop device is open (an ``O_EXCL`` open of it
  fails with EBUSY: mounted, or held by another process) unless forced, and
  then detaches it and removes the link;
* every call into the kernel runs outside the trio thread: ``losetup`` is a
  child process awaited with ``trio.run_process``, the ``O_EXCL`` probe runs
  in a worker thread.  The loop driver's I/O goes through the daemon's own
  FUSE file, so the trio loop must keep serving while the kernel works;
* a suspend keeps udev from probing the loop device until the resume
  (:meth:`LoopDevices.suspending`, ``udev_quiet.py``), as the kernel's udev
  rules skip suspended dm devices: a plain ``remove`` of a suspended device
  is not held up by a probe stuck on it;
* a resume of a suspended device sends one ``change`` uevent for its loop
  device once the new table is live, the read-only state updated, the file
  system thawed and udev let back in (:meth:`LoopDevices.resumed`), as the
  kernel's ``dm_resume`` does for a dm device: udev and its rules see the new
  contents.  If the size changed, that event is the loop driver's own (with
  ``RESIZE=1``, as dm's): the capacity change waits until udev is let back in;
* :func:`cleanup_stale` (run at start, before the stale mount is unmounted)
  detaches the loop devices a killed daemon left on its dead mount, removes
  the links to them and its udev rule.

The daemon itself never does I/O through these loop devices: the manager
resolves ``/dev/mapper/NAME``, ``/dev/loopN`` and ``MAJ:MIN`` of one of them
to the mapped device in process (``resolve.py``).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import subprocess

import trio

from dmuser.core.errors import DeviceBusyError, DeviceExistsError, DmError
from dmuser.core.hostdev import (
    Mount,
    mounts_of,
    openers,
    send_change_uevent,
    set_read_only,
)
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.mapper_links import (
    MAPPER_DIR,
    backing_file,
    link_path,
    loop_of_link,
    make_link,
)
from dmuser.core.thaw_watch import ThawWatcher
from dmuser.core.udev_quiet import UdevQuiet, remove_stale

log = logging.getLogger(__name__)

#: how long the O_EXCL probe retries EBUSY (udev's blkid probe opens new devices briefly)
BUSY_RETRY_SECONDS = 1.0


async def _losetup(*args: str) -> str:
    res = await trio.run_process(["losetup", *args], capture_stdout=True, capture_stderr=True,
                                 check=False)
    if res.returncode != 0:
        raise DmError(f"losetup {' '.join(args)}: {res.stderr.decode().strip()}", errno.EIO)
    return str(res.stdout.decode().strip())


def _open_exclusive(dev: str) -> None:
    fd = os.open(dev, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    os.close(fd)


class LoopDevices:
    """Attaches, resizes and detaches the loop devices of one daemon's devices."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = mountpoint
        self._sectors: dict[str, int] = {}
        self._read_only: dict[str, bool] = {}
        #: devices whose new size :meth:`update` left to :meth:`resumed`
        self._resize_pending: set[str] = set()
        #: device name -> the file systems this daemon froze (thawed at resume),
        #: with their ids in the watcher
        self._frozen: dict[str, list[tuple[int, Mount]]] = {}
        #: thaws them if the daemon dies first (``thaw_watch.py``)
        self._watcher = ThawWatcher()
        #: keeps udev from probing the loop devices of suspended devices
        self.udev = UdevQuiet(mountpoint)

    async def attach(self, md: MappedDevice) -> None:
        """Give ``md`` (in the namespace, with a live table) its loop device and link."""
        link = link_path(md.name)
        if os.path.lexists(link):
            raise DeviceExistsError(f"{link} already exists (a kernel dm device of that name?)")
        await self.udev.install()
        dev = await _losetup("--find", "--show", "--direct-io=on", md.path)
        try:
            make_link(md.name, dev)
        except OSError as exc:
            await _losetup("-d", dev)
            raise DmError(f"{link}: {exc.strerror}", exc.errno or errno.EIO) from None
        rdev = os.stat(dev).st_rdev
        md.block_device = dev
        md.block_devno = f"{os.major(rdev)}:{os.minor(rdev)}"
        md.status_name = md.block_devno  # tables over it print it as the kernel: MAJ:MIN
        self._sectors[md.name] = md.nr_sectors
        self._read_only[md.name] = False
        log.info("%s: block device %s (%s), %s", md.name, dev, md.block_devno, link)
        await self.update(md)

    async def update(self, md: MappedDevice, defer_resize: bool = False) -> None:
        """After a table swap: tell the loop driver a new size (with ``defer_resize``,
        in the resume's :meth:`resumed` instead), and make the loop device
        read-only or writable as the live table is."""
        if not md.block_device:
            return
        if self._sectors.get(md.name) != md.nr_sectors:
            if defer_resize:
                self._resize_pending.add(md.name)
            else:
                await self._resize(md)
        if self._read_only.get(md.name) != md.read_only:
            try:
                await trio.to_thread.run_sync(set_read_only, md.block_device, md.read_only)
            except OSError as exc:
                raise DmError(f"{md.block_device}: cannot set read-only: {exc.strerror}",
                              exc.errno or errno.EIO) from None
            self._read_only[md.name] = md.read_only

    async def suspending(self, md: MappedDevice, lockfs: bool) -> None:
        """Before ``md``'s suspend closes the door: keep udev off its loop device
        (``udev_quiet.py``), then, with ``lockfs``, :meth:`freeze`."""
        if md.block_device:
            await self.udev.quiet(md.block_device, md.block_devno)
        if lockfs:
            await self.freeze(md)

    async def _resize(self, md: MappedDevice) -> None:
        """``losetup -c``: the loop driver reads the new size and sends a ``change``
        uevent with ``RESIZE=1``."""
        self._resize_pending.discard(md.name)
        await _losetup("-c", md.block_device)
        self._sectors[md.name] = md.nr_sectors
        log.info("%s: %s resized to %d sectors", md.name, md.block_device, md.nr_sectors)

    async def resumed(self, md: MappedDevice, *, uevent: bool = False) -> None:
        """After ``md``'s door opened again: undo :meth:`suspending` (thaw, then let
        udev probe the loop device again).  With ``uevent`` (a resume of a
        suspended device, after the new table is live and the loop device's
        read-only state is updated) then make the kernel send one ``change``
        uevent for the loop device, as ``dm_resume`` does for a dm device; only
        after the unquiet, so that udev's rules run in full on it.  A size change
        :meth:`update` deferred happens here and its event (``RESIZE=1``, as
        dm's on a resize) is that one; its failure raises.  A failure to send a
        plain one is logged: the resume has happened."""
        await self.thaw(md)
        if not md.block_device:
            return
        self.udev.unquiet(md.block_device)
        if md.name in self._resize_pending:
            await self._resize(md)
        elif uevent:
            try:
                await trio.to_thread.run_sync(send_change_uevent, md.block_device)
            except OSError as exc:
                log.error("%s: cannot send a change uevent for %s: %s", md.name,
                          md.block_device, exc)

    async def close(self) -> None:
        """At shutdown, after every loop device is detached and every thaw: remove
        the udev rule, and stop the thaw watcher."""
        await self.udev.close()
        await trio.to_thread.run_sync(self._watcher.close)

    async def freeze(self, md: MappedDevice) -> None:
        """FIFREEZE every file system mounted on ``md``'s block device (none: nothing),
        each announced to the :class:`ThawWatcher` first (``thaw_watch.py``: thawed
        even if the daemon dies).  One already frozen by someone else stays theirs
        to thaw.  A failure thaws what was frozen and raises DmError."""
        if not md.block_devno or md.name in self._frozen:
            return
        frozen: list[tuple[int, Mount]] = []
        try:
            for m in mounts_of(md.block_devno, md.block_device):
                ident = await trio.to_thread.run_sync(self._watcher.freeze, m, md.block_device)
                if ident is not None:
                    frozen.append((ident, m))
                    log.info("%s: froze %s", md.name, m.path)
        except OSError as exc:
            await self._thaw(md.name, frozen)
            raise DmError(f"{md.name}: cannot freeze the file system on {md.block_device}: "
                          f"{exc.strerror or exc}", exc.errno or errno.EIO) from None
        if frozen:
            self._frozen[md.name] = frozen

    async def thaw(self, md: MappedDevice) -> None:
        """FITHAW what :meth:`freeze` froze, also when it was unmounted meanwhile
        (``hostdev.thaw_fs``); errors are logged (the device runs).  Call it only
        when ``md`` is not suspended: a thaw may write."""
        await self._thaw(md.name, self._frozen.pop(md.name, []))

    async def _thaw(self, name: str, frozen: list[tuple[int, Mount]]) -> None:
        for ident, m in frozen:
            try:
                await trio.to_thread.run_sync(self._watcher.thaw, ident)
                log.info("%s: thawed %s", name, m.path)
            except (OSError, subprocess.SubprocessError) as exc:
                log.error("%s: cannot thaw %s: %s", name, m.path, exc)

    async def is_open(self, md: MappedDevice) -> bool:
        """True if the loop device is open: held exclusively (an ``O_EXCL`` probe
        fails with EBUSY: mounted, swap, a holder) or counted by :meth:`open_counts`."""
        if not md.block_device:
            return False
        try:
            await trio.to_thread.run_sync(_open_exclusive, md.block_device)
        except OSError as exc:
            return exc.errno == errno.EBUSY
        return (await self.open_counts([md])).get(md.name, 0) > 0

    async def open_counts(self, devices: list[MappedDevice]) -> dict[str, int]:
        """Opens of the block devices of ``devices`` (by name; those with one), as the
        kernel counts a dm device's (``hostdev.openers``: one ``/proc`` scan)."""
        devnos = {md.block_devno: md.name for md in devices if md.block_devno}
        if not devnos:
            return {}
        try:
            counts = await trio.to_thread.run_sync(openers, list(devnos))
        except OSError as exc:
            log.error("cannot count the openers of %s: %s", ", ".join(devnos), exc)
            return {}
        return {devnos[devno]: n for devno, n in counts.items()}

    async def check_unused(self, md: MappedDevice) -> None:
        """Raise DeviceBusyError if the loop device is open (mounted or held), after
        retrying for :data:`BUSY_RETRY_SECONDS`."""
        with trio.move_on_after(BUSY_RETRY_SECONDS):
            while await self.is_open(md):
                await trio.sleep(0.1)
            return
        raise DeviceBusyError(f"Device {md.name} is busy: its block device {md.block_device} "
                              f"({link_path(md.name)}) is open (mounted or held). Unmount it, "
                              "or use --force to remove the device anyway.")

    async def detach(self, md: MappedDevice) -> None:
        """Detach the loop device (lazily if it is still open) and remove the link."""
        if not md.block_device:
            return
        dev, link = md.block_device, link_path(md.name)
        if loop_of_link(link) == os.path.basename(dev):
            with contextlib.suppress(OSError):
                os.unlink(link)
        try:
            await _losetup("-d", dev)
        except DmError as exc:
            log.error("%s: %s", md.name, exc)
        self.udev.unquiet(dev)
        md.block_device = md.block_devno = ""
        md.status_name = md.path or md.name
        self._sectors.pop(md.name, None)
        self._read_only.pop(md.name, None)
        self._resize_pending.discard(md.name)


def cleanup_stale(mountpoint: str) -> list[str]:
    """Detach loop devices backed by files under ``mountpoint`` (left by a killed
    daemon) and remove /dev/mapper links to them or to unattached loop devices.
    Returns the loop devices detached.  Blocking: call before the trio loop runs."""
    prefix = os.path.abspath(mountpoint).rstrip("/") + "/"
    remove_stale(mountpoint)
    detached = []
    for entry in sorted(glob.glob("/sys/block/loop*/loop/backing_file")):
        loop = entry.split("/")[3]
        backing = backing_file(loop)
        if backing is None or not backing.startswith(prefix):
            continue
        dev = "/dev/" + loop
        res = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True)
        if res.returncode == 0:
            log.warning("detached %s, left on %s by a dead daemon", dev, backing)
            detached.append(dev)
        else:
            log.error("cannot detach stale %s (%s): %s", dev, backing, res.stderr.strip())
    for link in glob.glob(os.path.join(MAPPER_DIR, "*")):
        target = loop_of_link(link)
        if target is None:
            continue
        if "/dev/" + target in detached or not os.path.exists(f"/sys/block/{target}/loop"):
            log.warning("removing stale link %s -> ../%s", link, target)
            os.unlink(link)
    return detached
