"""Backing devices: the only module that makes I/O syscalls.

A :class:`BlockDevice` is anything a table line can name: an image file, a real
block device, or (see ``mapped_device.py``) another dmuser device resolved in
process.  All of them take a :class:`~dmuser.bio.Bio` through ``submit()``,
which returns when the request is complete and raises :class:`DmIOError` (or a
subclass) when it failed.  A failed READ leaves its buffer zero-filled, as
dm-io does.

I/O policy (measured by ``tools/bench_inline.py``, written down in
``docs/io-policy.md``): ``pread``/``pwrite`` of at most
:data:`IoPolicy.inline_max_bytes` (default 1 MiB, the largest request FUSE
sends; ``$DMUSER_INLINE_MAX_BYTES`` overrides it) run inline in the trio
thread, larger ones and every ``fdatasync``, discard and zero-out run in a
worker thread under one process-wide limiter.  An inline call is a
cancellation point but yields to the scheduler only once every
:data:`IoPolicy.yield_every` calls, so a loop of inline I/O cannot starve the
other tasks.  A thread that has started a write is never abandoned on
cancellation, so a write is either not started or finished.
``os.pread``/``os.pwrite`` are used, never ``lseek`` + ``read``, because
worker threads share the file offset.

Durability: PREFLUSH runs ``fdatasync`` before the bio's data is written; FUA
writes the data with ``RWF_DSYNC`` (that range and the metadata to reach it
are durable when the write returns: the kernel's FUA), falling back to
``fdatasync`` after the write where RWF_DSYNC is refused; an empty flush is
just ``fdatasync``.  A read or write carrying PREFLUSH or FUA runs as one
worker-thread call (flush, I/O and sync together: one hand-off, not three).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import stat
import struct
from dataclasses import dataclass
from typing import ClassVar

import outcome
import trio

from .bio import Bio, Op, ReqFlag
from .errors import DmIOError, NoSuchDeviceError, NotSupportedError
from .units import SECTOR_SHIFT

log = logging.getLogger(__name__)

_BLKGETSIZE64 = 0x80081272
_BLKDISCARD = 0x1277
_BLKZEROOUT = 0x127F
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@dataclass(slots=True)
class IoPolicy:
    """Where blocking syscalls run.  Process-wide; see the module docstring."""

    inline_max_bytes: int
    limiter: trio.CapacityLimiter
    #: an inline call yields to the trio scheduler once every this many calls
    yield_every: int = 16
    #: smallest READ/WRITE that :meth:`FileDevice.start_submit` moves to a worker
    #: thread, so that several bios of one request (a mirror write to every leg)
    #: overlap; 0 (the default) turns this off: measured on the 2-vCPU machine,
    #: the hand-off and wake-up cost more than the overlap gains
    #: (``docs/io-policy.md``, "Parallel bios")
    parallel_min_bytes: int = 0


POLICY = IoPolicy(
    inline_max_bytes=int(os.environ.get("DMUSER_INLINE_MAX_BYTES", str(1 << 20))),
    limiter=trio.CapacityLimiter(16),
    parallel_min_bytes=int(os.environ.get("DMUSER_PARALLEL_MIN_BYTES", "0")),
)

_inline_calls = 0


async def _inline_turn() -> None:
    """The scheduling part of one inline syscall: a cancellation point, and a
    full checkpoint (a scheduler round trip, ~10 us) every ``POLICY.yield_every``
    calls only."""
    global _inline_calls
    _inline_calls += 1
    if _inline_calls >= POLICY.yield_every:
        _inline_calls = 0
        await trio.lowlevel.checkpoint()
    else:
        await trio.lowlevel.checkpoint_if_cancelled()


async def _run(fn, *args, nbytes: int = 1 << 30):  # type: ignore[no-untyped-def]
    """Run a blocking syscall inline or in a worker thread according to POLICY."""
    if nbytes <= POLICY.inline_max_bytes:
        await _inline_turn()
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args, limiter=POLICY.limiter)


class BlockDevice:
    """Base of everything a table can point at.

    Attributes:
        status_name: how ``table``/``status`` print the device: ``MAJ:MIN`` for a real
            block device, the absolute path for a regular file, the device's
            path on the mount for another dmuser device.
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

    def start_submit(self, bio: Bio) -> ThreadedBio | None:
        """Start ``bio`` in a worker thread at once, without a checkpoint, or return None.

        The caller must await :meth:`ThreadedBio.wait` (it raises as
        :meth:`submit` would).  None means this device does not offload this
        bio (the default): use :meth:`submit`.  Used by dm-io to run the bios of
        one request concurrently (``docs/io-policy.md``, "Parallel bios").
        """
        return None

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


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class ThreadedBio:
    """A bio running in a worker thread (see :meth:`BlockDevice.start_submit`).

    The thread is never abandoned: :meth:`wait` is shielded from cancellation
    (a cancelled caller gets ``Cancelled`` at its next checkpoint), so a started
    write is always finished before the caller goes on or frees the buffer.
    """

    __slots__ = ("_dev", "_bio", "_done", "_outcome")

    def __init__(self, dev: FileDevice, bio: Bio) -> None:
        self._dev, self._bio = dev, bio
        self._done = trio.Event()
        self._outcome: outcome.Outcome[None] | None = None

    def _start(self) -> None:
        token = trio.lowlevel.current_trio_token()
        dev, bio = self._dev, self._bio

        def deliver(result: outcome.Outcome[None]) -> None:  # in the worker thread
            token.run_sync_soon(self._finish, result)

        trio.lowlevel.start_thread_soon(lambda: dev._submit_blocking(bio), deliver)

    def _finish(self, result: outcome.Outcome[None]) -> None:
        POLICY.limiter.release_on_behalf_of(self)
        self._outcome = result
        self._done.set()

    async def wait(self) -> None:
        """Wait for the bio; raises DmIOError (or a subclass) if it failed."""
        with trio.CancelScope(shield=True):
            await self._done.wait()
        assert self._outcome is not None
        try:
            self._outcome.unwrap()
        except OSError as exc:
            raise self._dev._failed(self._bio, exc) from exc


class FileDevice(BlockDevice):
    """An image file or a real block device, opened read-write.

    Close it with :meth:`close` once nothing submits to it any more.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchDeviceError(f"{path}: no such file or block device") from None
        except OSError as exc:
            raise NoSuchDeviceError(f"{path}: cannot open: {exc.strerror}", exc.errno) from None
        st = os.fstat(self.fd)
        self.is_block = stat.S_ISBLK(st.st_mode)
        if not (self.is_block or stat.S_ISREG(st.st_mode)):
            os.close(self.fd)
            raise NoSuchDeviceError(f"{path}: not a regular file or block device")
        self.key = (st.st_rdev,) if self.is_block else (st.st_dev, st.st_ino)
        self.status_name = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" if self.is_block else self.path

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
                # Never abandoned on cancellation: a started write is finished.
                await trio.to_thread.run_sync(self._submit_blocking, bio, limiter=POLICY.limiter)
            elif flags or data is None or len(data) > POLICY.inline_max_bytes or self.fd < 0:
                await self._submit(bio)
            elif bio.op is Op.READ:  # the hot path: a plain read or write run inline
                await _inline_turn()
                _pread_full(self.fd, data, bio.sector << SECTOR_SHIFT)
            elif bio.op is Op.WRITE:
                await _inline_turn()
                _pwrite_full(self.fd, data, bio.sector << SECTOR_SHIFT)
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

    def runs_inline(self, bio: Bio) -> bool:
        """A READ/WRITE of at most ``POLICY.inline_max_bytes`` without PREFLUSH/FUA."""
        flags = bio.flags
        return ((bio.op is Op.READ or bio.op is Op.WRITE) and self.fd >= 0
                and (bio.nr_sectors << SECTOR_SHIFT) <= POLICY.inline_max_bytes
                and not (flags and flags & (ReqFlag.PREFLUSH | ReqFlag.FUA)))

    def start_submit(self, bio: Bio) -> ThreadedBio | None:
        """Offload a READ/WRITE of at least ``POLICY.parallel_min_bytes`` (if not 0)
        to a worker thread (PREFLUSH/FUA included, in the same order as
        :meth:`submit`); None for anything else, or when the limiter has no free
        thread."""
        if bio.op is not Op.READ and bio.op is not Op.WRITE or self.fd < 0:
            return None
        least = POLICY.parallel_min_bytes
        if not least or (bio.nr_sectors << SECTOR_SHIFT) < least:
            return None
        handle = ThreadedBio(self, bio)
        try:
            POLICY.limiter.acquire_on_behalf_of_nowait(handle)
        except trio.WouldBlock:
            return None
        handle._start()
        return handle

    def _submit_blocking(self, bio: Bio) -> None:
        """:meth:`_submit` for a READ/WRITE, every syscall in the calling thread."""
        fd = self.fd
        if fd < 0:
            raise DmIOError(f"{self.status_name}: device closed", errno.EBADF)
        flags = bio.flags
        if flags and flags & ReqFlag.PREFLUSH:
            os.fdatasync(fd)
        offset = bio.sector << SECTOR_SHIFT
        assert bio.data is not None or not bio.nr_sectors
        if bio.op is Op.READ:
            _pread_full(fd, bio.data, offset)
        elif bio.nr_sectors:
            if flags and flags & ReqFlag.FUA:
                _pwrite_durable(fd, bio.data, offset)
                return
            _pwrite_full(fd, bio.data, offset)
        if flags and flags & ReqFlag.FUA and bio.nr_sectors:
            os.fdatasync(fd)

    # Plain reads and writes now, in the calling thread, for callers that checked
    # POLICY.inline_max_bytes and want no scheduling at all (MappedDevice's direct
    # path).  They raise OSError and report nothing: the caller owns the error path.

    def pread_inline(self, sector: int, nbytes: int) -> bytes:
        """Up to ``nbytes`` from ``sector`` (fewer only at the end of the file)."""
        return os.pread(self.fd, nbytes, sector << SECTOR_SHIFT)

    def pwrite_inline(self, sector: int, data: bytes | memoryview) -> None:
        _pwrite_full(self.fd, data, sector << SECTOR_SHIFT)  # type: ignore[arg-type]

    async def _submit(self, bio: Bio) -> None:
        fd = self.fd
        if fd < 0:
            raise DmIOError(f"{self.status_name}: device closed", errno.EBADF)
        flags = bio.flags  # tested for truth first: IntFlag '&' costs ~1 us
        if flags and flags & ReqFlag.PREFLUSH:
            await _run(os.fdatasync, fd)
        offset = bio.sector << SECTOR_SHIFT
        length = bio.nr_sectors << SECTOR_SHIFT
        op = bio.op
        if op is Op.READ:
            assert bio.data is not None
            await _run(_pread_full, fd, bio.data, offset, nbytes=length)
        elif op is Op.WRITE:
            if length:
                assert bio.data is not None
                await _run(_pwrite_full, fd, bio.data, offset, nbytes=length)
        elif op is Op.DISCARD:
            await self._discard(offset, length)
        elif op is Op.WRITE_ZEROES:
            await self._write_zeroes(offset, length)
        elif op is not Op.FLUSH:
            raise NotSupportedError(f"{self.status_name}: operation {op.name} not supported")
        if flags and flags & ReqFlag.FUA and length:
            await _run(os.fdatasync, fd)

    async def _discard(self, offset: int, length: int) -> None:
        if self.is_block:
            arg = struct.pack("QQ", offset, length)
            await _run(fcntl.ioctl, self.fd, _BLKDISCARD, arg)
        else:
            await _run(_fallocate, self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                       offset, length)

    async def _write_zeroes(self, offset: int, length: int) -> None:
        if self.is_block:
            arg = struct.pack("QQ", offset, length)
            await _run(fcntl.ioctl, self.fd, _BLKZEROOUT, arg)
            return
        try:
            await _run(_fallocate, self.fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE,
                       offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            zeros = memoryview(bytes(min(length, 1 << 20)))
            for pos in range(offset, offset + length, len(zeros)):
                chunk = zeros[: min(len(zeros), offset + length - pos)]
                await _run(_pwrite_full, self.fd, chunk, pos)


class MemDevice(BlockDevice):
    """A device held in memory, for tests and transient scratch space.

    ``fail_sectors`` makes every bio touching one of those sectors fail with EIO,
    the simplest failing device for dm-io and kcopyd tests.
    """

    def __init__(self, nr_sectors: int, name: str = "mem") -> None:
        self.buf = bytearray(nr_sectors << SECTOR_SHIFT)
        self.status_name = name
        self.fail_sectors: set[int] = set()
        self.fail_all = False
        self.flushes = 0

    @property
    def nr_sectors(self) -> int:
        return len(self.buf) >> SECTOR_SHIFT

    def _fails(self, bio: Bio) -> bool:
        if self.fail_all:
            return True
        return any(s in self.fail_sectors for s in range(bio.sector, bio.end_sector))

    async def submit(self, bio: Bio) -> None:
        await trio.lowlevel.checkpoint()
        if bio.end_sector > self.nr_sectors:
            raise DmIOError(f"{self.status_name}: access beyond end of device")
        if self._fails(bio):
            if bio.op is Op.READ and bio.data is not None:
                bio.data[:] = bytes(len(bio.data))
            raise DmIOError(f"{self.status_name}: injected I/O error at sector {bio.sector}")
        start, end = bio.sector << SECTOR_SHIFT, bio.end_sector << SECTOR_SHIFT
        if bio.flags & ReqFlag.PREFLUSH:
            self.flushes += 1
        if bio.op is Op.READ:
            assert bio.data is not None
            bio.data[:] = self.buf[start:end]
        elif bio.op is Op.WRITE:
            if bio.data is not None:
                self.buf[start:end] = bio.data
        elif bio.op in (Op.DISCARD, Op.WRITE_ZEROES):
            self.buf[start:end] = bytes(end - start)
        elif bio.op is not Op.FLUSH:
            raise NotSupportedError(f"{self.status_name}: operation {bio.op.name} not supported")
