"""Backing devices: the only module that makes I/O syscalls.

A :class:`BlockDevice` is anything a table line can name: an image file, a real
block device, or (see ``mapped_device.py``) another dmuser device resolved in
process.  All of them take a :class:`~dmuser.core.bio.Bio` through ``submit()``,
which returns when the request is complete and raises :class:`DmIOError` (or a
subclass) when it failed.  A failed READ leaves its buffer zero-filled, as
dm-io does.

Where each call runs (inline in the trio thread or in a worker thread) is the
file's :class:`~dmuser.core.io_policy.IoPolicy` (``io_policy.py``).  A thread
that has started a write is never abandoned on cancellation, so a write is
either not started or finished.  ``os.pread``/``os.pwrite`` are used, never
``lseek`` + ``read``, because worker threads share the file offset.

Durability: PREFLUSH runs ``fdatasync`` before the bio's data is written; FUA
writes the data with ``RWF_DSYNC`` (that range and the metadata to reach it
are durable when the write returns: the kernel's FUA), falling back to
``fdatasync`` after the write where RWF_DSYNC is refused; an empty flush is
just ``fdatasync``.  A read or write carrying PREFLUSH or FUA runs as one
call (flush, I/O and sync together): inline while the daemon is idle, like an
empty flush (:meth:`IoPolicy.sync`), else one worker-thread call (one
hand-off, not three).

Write-behind (``docs/io-policy.md``): after ``IoPolicy.write_behind_bytes`` of
plain writes to a file since its last flush, a worker thread nobody waits for
starts the file's writeback (``sync_file_range``).  No guarantee changes (only a
flush makes writes durable); the next flush just has less left to write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import logging
import os
import stat
import struct
from typing import Any, ClassVar

import trio

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.errors import DeviceBusyError, DmIOError, NoSuchDeviceError, NotSupportedError
from dmuser.core.io_policy import DEFAULT_POLICY, IoPolicy
from dmuser.core.units import SECTOR_SHIFT

log = logging.getLogger(__name__)

_BLKGETSIZE64 = 0x80081272
_BLKDISCARD = 0x1277
_BLKZEROOUT = 0x127F
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2
_NEVER = 1 << 62  # write_behind_bytes 0: no amount of writes reaches it


class BlockDevice:
    """Base of everything a table can point at.

    Attributes:
        status_name: how ``table``/``status`` print the device: ``MAJ:MIN`` for a real
            block device, the absolute path for a regular file; for another dmuser
            device its block device's ``MAJ:MIN`` when it has one (``loopdev.py``),
            else its path on the mount.
    """

    status_name: str
    supports_discard: ClassVar[bool] = True
    supports_write_zeroes: ClassVar[bool] = True

    @property
    def nr_sectors(self) -> int:
        raise NotImplementedError

    async def submit(self, bio: Bio) -> None:
        raise NotImplementedError

    def runs_inline(self, bio: Bio) -> bool:
        """True if :meth:`submit` of ``bio`` never waits for anything: it runs
        in the calling task and is at most a cancellation point (with an
        occasional yield).  dm-io then submits such bios one after the other
        instead of spawning a task for each (a task costs ~30-70 us here)."""
        return False

    async def read(self, sector: int, nr_sectors: int) -> bytearray:
        """Convenience: read ``nr_sectors`` into a new buffer."""
        buf = bytearray(nr_sectors << SECTOR_SHIFT)
        await self.submit(Bio.read(sector, buf))
        return buf

    async def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        await self.submit(Bio.write(sector, data))

    async def flush(self) -> None:
        await self.submit(Bio.flush())


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    done = os.preadv(fd, [view], offset)
    if done == 0 and len(view):
        raise DmIOError(f"read past end of device at byte {offset}")
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise DmIOError(f"read past end of device at byte {offset + done}")
        done += n


def _pwrite_full(fd: int, view: memoryview, offset: int) -> None:
    done = os.pwrite(fd, view, offset)
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _pwrite_durable(fd: int, view: memoryview, offset: int) -> None:
    """Write ``view`` and make exactly that durable (FUA): ``RWF_DSYNC``, or
    a plain write and ``fdatasync`` where the file refuses the flag."""
    try:
        done = os.pwritev(fd, [view], offset, os.RWF_DSYNC)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        done = 0
    if done < len(view):
        _pwrite_full(fd, view[done:], offset + done)
        os.fdatasync(fd)


def _start_writeback(fd: int) -> None:
    """Start the writeback of every dirty page of ``fd``'s file, then close ``fd``
    (a duplicate).  No wait for that I/O, no durability; the kernel reports a
    failed writeback to the next ``fdatasync``."""
    try:
        _libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
    finally:
        os.close(fd)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class FileDevice(BlockDevice):
    """An image file or a real block device, opened read-write.

    With ``exclusive`` (for a block device) it is opened with ``O_EXCL``: while
    it is open, ``mount`` and every other exclusive open of it fail with EBUSY.
    Close it with :meth:`close` once nothing submits to it any more.
    """

    def __init__(self, path: str, policy: IoPolicy = DEFAULT_POLICY,
                 exclusive: bool = False) -> None:
        self.policy = policy
        self.path = os.path.abspath(path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC
                              | (os.O_EXCL if exclusive else 0))
        except FileNotFoundError:
            raise NoSuchDeviceError(f"{path}: no such file or block device") from None
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise DeviceBusyError(f"{path}: the block device is in use (mounted, or "
                                      "claimed by another program)") from None
            raise NoSuchDeviceError(f"{path}: cannot open: {exc.strerror}", exc.errno) from None
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            raise NoSuchDeviceError(f"{path}: not a regular file or block device")
        self.key = (st.st_rdev,) if self.is_block else (st.st_dev, st.st_ino)
        self.status_name = (f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" if self.is_block
                            else self.path)
        self._write_behind = policy.write_behind_bytes or _NEVER
        self._unflushed = 0  # bytes of plain writes since the last flush or write-behind
        self._write_behind_running = False

    def __repr__(self) -> str:
        return f"FileDevice({self.path!r})"

    @property
    def nr_sectors(self) -> int:
        if self.is_block:
            buf = fcntl.ioctl(self.fd, _BLKGETSIZE64, b"\0" * 8)
            return int(struct.unpack("Q", buf)[0]) >> SECTOR_SHIFT
        return os.fstat(self.fd).st_size >> SECTOR_SHIFT

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def submit(self, bio: Bio) -> None:
        try:
            data = bio.data
            flags = bio.flags
            if flags and data is not None and (bio.op is Op.READ or bio.op is Op.WRITE) \
                    and flags & (ReqFlag.PREFLUSH | ReqFlag.FUA):
                await self.policy.sync(self._submit_blocking, bio, nbytes=len(data))
            elif flags or data is None or len(data) > self.policy.inline_max_bytes or self.fd < 0:
                await self._submit(bio)
            elif bio.op is Op.READ:  # the hot path: a plain read or write run inline
                await self.policy.inline_turn()
                _pread_full(self.fd, data, bio.sector << SECTOR_SHIFT)
            elif bio.op is Op.WRITE:
                await self.policy.inline_turn()
                _pwrite_full(self.fd, data, bio.sector << SECTOR_SHIFT)
                self._wrote(len(data))
            else:
                await self._submit(bio)
        except OSError as exc:
            raise self._failed(bio, exc) from exc

    def _failed(self, bio: Bio, exc: OSError) -> DmIOError:
        """Log a failed syscall, zero-fill a failed read, and return the DmIOError to raise."""
        if bio.op is Op.READ and bio.data is not None:
            bio.data[:] = bytes(len(bio.data))
        log.warning("%s: %s of %d sectors at %d failed: %s",
                    self.status_name, bio.op.name, bio.nr_sectors, bio.sector, exc)
        return DmIOError(f"{self.status_name}: {exc.strerror or exc}", exc.errno)

    def serves_inline(self, nbytes: int) -> bool:
        """A plain read or write of ``nbytes`` runs in the trio thread (the policy's
        ``inline_max_bytes``; the file is open): :meth:`pread_inline` and
        :meth:`pwrite_inline` may be used for it."""
        return self.fd >= 0 and nbytes <= self.policy.inline_max_bytes

    def runs_inline(self, bio: Bio) -> bool:
        """A READ/WRITE the file :meth:`serves_inline`, without PREFLUSH/FUA."""
        flags = bio.flags
        return ((bio.op is Op.READ or bio.op is Op.WRITE)
                and self.serves_inline(bio.nr_sectors << SECTOR_SHIFT)
                and not (flags and flags & (ReqFlag.PREFLUSH | ReqFlag.FUA)))

    def _submit_blocking(self, bio: Bio) -> None:
        """:meth:`_submit` for a READ/WRITE with data, every syscall in the calling thread."""
        fd = self.fd
        if fd < 0:
            raise DmIOError(f"{self.status_name}: device closed", errno.EBADF)
        data = bio.data
        assert data is not None, "only READ/WRITE bios with data come here"
        flags = bio.flags
        if flags and flags & ReqFlag.PREFLUSH:
            self._unflushed = 0
            os.fdatasync(fd)
        offset = bio.sector << SECTOR_SHIFT
        if bio.op is Op.READ:
            _pread_full(fd, data, offset)
        elif flags and flags & ReqFlag.FUA:
            _pwrite_durable(fd, data, offset)
        else:
            _pwrite_full(fd, data, offset)

    # Plain reads and writes now, in the calling thread, for callers that checked
    # serves_inline() and want no scheduling at all (MappedDevice's direct
    # path).  They raise OSError and report nothing: the caller owns the error path.

    def pread_inline(self, sector: int, nbytes: int) -> bytes:
        """Up to ``nbytes`` from ``sector`` (fewer only at the end of the file)."""
        return os.pread(self.fd, nbytes, sector << SECTOR_SHIFT)

    def pwrite_inline(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        _pwrite_full(self.fd, data, sector << SECTOR_SHIFT)  # type: ignore[arg-type]
        self._wrote(len(data))

    def _wrote(self, nbytes: int) -> None:
        """Count a plain write; past ``write_behind_bytes`` since the last flush, start
        the file's writeback in a worker thread nobody waits for (one at a time, on a
        duplicate descriptor, so a :meth:`close` meanwhile is harmless)."""
        self._unflushed += nbytes
        if self._unflushed < self._write_behind or self._write_behind_running:
            return
        try:
            fd = os.dup(self.fd)
        except OSError:
            return  # closed, or out of descriptors: the next flush writes it all anyway
        self._unflushed = 0
        self._write_behind_running = True
        trio.lowlevel.start_thread_soon(functools.partial(_start_writeback, fd),
                                        self._write_behind_done)

    def _write_behind_done(self, result: Any) -> None:
        """Called in the worker thread when the write-behind call returned."""
        self._write_behind_running = False

    async def _submit(self, bio: Bio) -> None:
        fd = self.fd
        if fd < 0:
            raise DmIOError(f"{self.status_name}: device closed", errno.EBADF)
        flags = bio.flags  # tested for truth first: IntFlag '&' costs ~1 us
        if flags and flags & ReqFlag.PREFLUSH:
            self._unflushed = 0
            await self.policy.sync(os.fdatasync, fd)
        offset = bio.sector << SECTOR_SHIFT
        length = bio.nr_sectors << SECTOR_SHIFT
        op = bio.op
        if op is Op.READ:
            assert bio.data is not None
            await self.policy.run(_pread_full, fd, bio.data, offset, nbytes=length)
        elif op is Op.WRITE:
            if length:
                assert bio.data is not None
                await self.policy.run(_pwrite_full, fd, bio.data, offset, nbytes=length)
                self._wrote(length)
        elif op is Op.DISCARD:
            await self._discard(offset, length)
        elif op is Op.WRITE_ZEROES:
            await self._write_zeroes(offset, length)
        elif op is not Op.FLUSH:
            raise NotSupportedError(f"{self.status_name}: operation {op.name} not supported")
        if flags and flags & ReqFlag.FUA and length:
            await self.policy.sync(os.fdatasync, fd)

    async def _discard(self, offset: int, length: int) -> None:
        if self.is_block:
            arg = struct.pack("QQ", offset, length)
            await self.policy.run(fcntl.ioctl, self.fd, _BLKDISCARD, arg)
        else:
            await self.policy.run(_fallocate, self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                       offset, length)

    async def _write_zeroes(self, offset: int, length: int) -> None:
        if self.is_block:
            arg = struct.pack("QQ", offset, length)
            await self.policy.run(fcntl.ioctl, self.fd, _BLKZEROOUT, arg)
            return
        try:
            await self.policy.run(_fallocate, self.fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE,
                       offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            zeros = memoryview(bytes(min(length, 1 << 20)))
            for pos in range(offset, offset + length, len(zeros)):
                chunk = zeros[: min(len(zeros), offset + length - pos)]
                await self.policy.run(_pwrite_full, self.fd, chunk, pos)
