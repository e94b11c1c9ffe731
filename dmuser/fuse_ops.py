"""The FUSE face of the daemon: one directory, one regular file per mapped device.

This is the only place where exceptions become ``pyfuse3.FUSEError``
(:func:`_translate`): a :class:`DmError` keeps its errno, an ``OSError`` its
errno, anything else is logged with its traceback and becomes EIO, so a bug
fails one request instead of stopping the file system.

Files are opened with ``direct_io``: the kernel page cache never hides what the
targets do, and every read and write reaches us.  Byte ranges that do not start
or end on a sector boundary are widened to whole sectors: reads read the whole
sectors and return the slice; writes read the partial edge sectors, merge, and
write whole sectors, all under the device's range lock on the sectors touched,
so concurrent writes to the same sector cannot undo each other.  Writes past the
end of the device fail with ENOSPC, reads past it return nothing (EOF), as for a
block device.  The byte-range work is :mod:`dmuser.byte_io`, shared with the
NBD exports: one range lock per device for both.  Aligned reads and writes on
a device whose live table is one
target that remaps them straight onto a file (linear; snapshot-origin when no
copy-out is needed) take the direct path (``MappedDevice.read_direct``,
``write_direct``: one inline ``pread``/``pwrite``, no bio; a write only when no
read-modify-write holds an overlapping range); everything else, and anything
the direct path declines, goes through ``MappedDevice.submit``.
``fsync`` and ``flush`` (close) send an empty flush through the
table, which reaches every backing file as ``fdatasync`` before they return.
A close while the device is suspended does not flush (it would wait for the
resume, and every fork+exec of a process holding the file open closes it).
A handle still open on a device removed with ``--force`` fails reads, writes
and fsync with ENXIO; closing it succeeds.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from dmuser.byte_io import read_bytes, write_bytes
from dmuser.core.errors import DmError
from dmuser.core.manager import DeviceManager
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.units import MAX_DEVICE_SECTORS, SECTOR_SHIFT, SECTOR_SIZE

log = logging.getLogger(__name__)

ROOT_INODE = pyfuse3.ROOT_INODE
#: At most this many FUSE requests are in the handlers at once (``pyfuse3.main``'s
#: ``max_tasks``; the kernel keeps the others queued).  Each holds at most ~3 MiB
#: (its task's receive buffer, the payload copy, and for an unaligned write the
#: merged sectors, for a request of at most 1 MiB), so FUSE requests hold at most
#: ~144 MiB of the daemon (``docs/io-policy.md``, "Memory").
MAX_REQUESTS = 48
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _translate(fn: F) -> F:
    """Run a handler; turn every failure into FUSEError (the one error boundary)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except DmError as exc:
            log.debug("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            log.warning("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("unexpected error in FUSE handler %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class _Node:
    """The FUSE inode of one mapped device."""

    def __init__(self, inode: int, md: MappedDevice) -> None:
        self.inode = inode
        self.md = md
        self.mtime_ns = time.time_ns()


class DeviceFS(pyfuse3.Operations):
    """pyfuse3 operations over a :class:`DeviceManager`."""

    enable_writeback_cache = False

    def __init__(self, manager: DeviceManager) -> None:
        super().__init__()
        self.manager = manager
        self._by_name: dict[str, _Node] = {}
        self._by_inode: dict[int, _Node] = {}
        self._handles: dict[int, _Node] = {}
        self._next_inode = ROOT_INODE + 1
        self._next_fh = 1
        self._uid, self._gid = os.getuid(), os.getgid()
        self._start_ns = time.time_ns()
        manager.on_change = self.sync_names

    def sync_names(self) -> None:
        """Mirror the manager's device set into the directory."""
        for name in list(self._by_name):
            node = self._by_name[name]
            if self.manager.devices.get(name) is not node.md:
                del self._by_name[name]
                del self._by_inode[node.inode]
        for name, md in self.manager.devices.items():
            if name not in self._by_name:
                node = _Node(self._next_inode, md)
                self._next_inode += 1
                self._by_name[name] = self._by_inode[node.inode] = node

    # -- metadata -----------------------------------------------------------------------

    def _attrs(self, node: _Node | None) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        if node is None:
            entry.st_ino = ROOT_INODE
            entry.st_mode = stat.S_IFDIR | 0o755
            entry.st_nlink = 2
            entry.st_size = 0
            mtime = self._start_ns
        else:
            entry.st_ino = node.inode
            entry.st_mode = stat.S_IFREG | 0o600
            entry.st_nlink = 1
            # Never more than a file can hold (tables are refused beyond it, see
            # manager.build_table): one bad size must not fail the listing.
            entry.st_size = min(node.md.nr_sectors, MAX_DEVICE_SECTORS) << SECTOR_SHIFT
            mtime = node.mtime_ns
        entry.st_uid, entry.st_gid = self._uid, self._gid
        entry.st_blksize = 4096
        entry.st_blocks = entry.st_size // 512
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = mtime
        # Sizes change on table swaps: never let the kernel cache them.
        entry.attr_timeout = 0
        entry.entry_timeout = 0
        entry.generation = 0
        return entry

    def _node(self, inode: int) -> _Node:
        node = self._by_inode.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    @_translate
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if name in (b".", b".."):
            return self._attrs(None)
        node = self._by_name.get(os.fsdecode(name))
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(node)

    @_translate
    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attrs(None if inode == ROOT_INODE else self._node(inode))

    @_translate
    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        node = self._node(inode)
        if fields.update_size and attr.st_size != node.md.nr_sectors << SECTOR_SHIFT:
            # A device's size comes from its table.  Truncation is ignored, as it
            # has no effect on a block device: 'dd of=DEV seek=N' truncates a
            # regular output file to N blocks and must not fail here.
            log.debug("%s: ignoring truncate to %d bytes", node.md.name, attr.st_size)
        return self._attrs(node)

    @_translate
    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ROOT_INODE

    @_translate
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        """List the devices; an entry that cannot be described is logged and left
        out, so one bad device never hides the others."""
        nodes = sorted(self._by_name.items())
        for i, (name, node) in enumerate(nodes[start_id:], start_id + 1):
            try:
                attrs = self._attrs(node)
                encoded = os.fsencode(name)
            except Exception:
                log.exception("readdir: leaving out device %r", name)
                continue
            if not pyfuse3.readdir_reply(token, encoded, attrs, i):
                break

    @_translate
    async def statfs(self, ctx: Any) -> Any:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = SECTOR_SIZE
        total = sum(md.nr_sectors for md in self.manager.devices.values())
        st.f_blocks = min(total, (1 << 64) - 1)  # a fsblkcnt_t
        st.f_files = len(self._by_name)
        st.f_namemax = 127
        return st

    # -- data ---------------------------------------------------------------------------

    @_translate
    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        node = self._node(inode)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = node
        node.md.open_count += 1
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=False)

    @_translate
    async def release(self, fh: int) -> None:
        node = self._handles.pop(fh)
        node.md.open_count -= 1

    def _open_node(self, fh: int) -> _Node:
        """The node of an open handle; ENXIO once its device was removed (``--force``)."""
        node = self._handles[fh]
        if self._by_inode.get(node.inode) is not node:
            raise pyfuse3.FUSEError(errno.ENXIO)
        return node

    @_translate
    async def flush(self, fh: int) -> None:
        node = self._handles[fh]
        if self._by_inode.get(node.inode) is not node:
            return  # removed with --force: nothing left to flush
        if node.md.suspended:
            # FUSE sends FLUSH on *every* close of a descriptor, including the
            # close-on-exec of an inherited one in a forked child.  Waiting for
            # resume here would hang any process that holds the device open and
            # runs a program (such as 'dmuser resume') while it is suspended.
            # Close promises no durability (fsync does), as for a block device.
            return
        await node.md.flush()

    @_translate
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._open_node(fh).md.flush()

    @_translate
    # pyfuse3 takes any contiguous buffer (its stub says bytes): replies are not copied
    async def read(  # type: ignore[override]
            self, fh: int, off: int, size: int) -> bytes | bytearray | memoryview:
        md = self._open_node(fh).md
        end = min(off + size, md.nr_sectors << SECTOR_SHIFT)
        if off >= end:
            return b""
        first = off >> SECTOR_SHIFT
        if (off | end) & (SECTOR_SIZE - 1) == 0:
            data = md.read_direct(first, end - off)
            if data is not None:
                return data
        # pyfuse3 takes any contiguous buffer: an aligned reply is not copied
        return await read_bytes(md, off, end - off)

    @_translate
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        node = self._open_node(fh)
        md = node.md
        dev_bytes = md.nr_sectors << SECTOR_SHIFT
        if off >= dev_bytes and buf:
            raise pyfuse3.FUSEError(errno.ENOSPC)
        data = buf if off + len(buf) <= dev_bytes else memoryview(buf)[: dev_bytes - off]
        await write_bytes(md, off, data, direct=True)
        node.mtime_ns = time.time_ns()
        return len(data)
