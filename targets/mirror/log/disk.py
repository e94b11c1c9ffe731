"""The ``disk`` dirty log: clean bits persisted on a log device (dm-spec §5.5, dm-log.c disk_*).

Table arguments: ``<log_dev> <region_size> [sync|nosync]``.

The on-disk format is :mod:`dmuser.formats.disklog` (byte-compatible with the
kernel's).  The device must hold ``buf_size`` bytes.

Guarantees:

* Construction reads nothing.  :meth:`DiskLog.resume` (every resume) reads the
  buffer exactly as the kernel does: a ``sync``/``nosync`` table or a bad magic
  starts a new log; regions the header does not know (the device grew) come up
  dirty (clean with ``nosync``); padding bits are cleared; sync bits := clean
  bits; then the header is rewritten and the log device flushed.
* :meth:`DiskLog.flush` writes the buffer only when something changed.  When a
  region was *cleaned* it first flushes every mirror leg (the flush callback),
  so the data is durable before the log calls it clean; if that fails, every
  region becomes dirty until reload.  When a region was *dirtied* it flushes
  the log device after the write, so the dirty mark is durable before the data
  writes it guards are issued.
* Status character: ``F`` the last flush of the log device failed, else ``D``
  the log device failed (read or write), else ``A``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dmuser.core.bio import Op, ReqFlag
from dmuser.core.errors import DmError, DmIOError
from dmuser.core.target import StatusType, TargetContext
from dmuser.core.units import SECTOR_SHIFT, SECTOR_SIZE
from dmuser.formats.disklog import (
    BITSET_OFFSET,
    MIRROR_DISK_VERSION,
    MIRROR_MAGIC,
    LogHeader,
    buffer_bytes,
    decode_header,
    encode_header,
)
from dmuser.services.dm_io import BufferMem, DmIoClient, IoRequest, Region, dm_io
from dmuser.targets.mirror.log.base import Bitset, DirtyLogError, EventFn, FlushCallback
from dmuser.targets.mirror.log.core import CoreLog, SyncMode

log = logging.getLogger(__name__)



class DiskLog(CoreLog):
    name = "disk"

    def __init__(self, ti: TargetContext, args: Sequence[str], *,
                 flush_callback: FlushCallback | None = None,
                 table_event: EventFn | None = None) -> None:
        if not 2 <= len(args) <= 3:
            raise DirtyLogError("wrong number of arguments to disk dirty region log")
        self.ti = ti
        try:
            self.log_dev = ti.get_device(args[0])
        except DmError as exc:
            raise DirtyLogError(exc.message) from exc
        self.log_dev_failed = False
        self.log_dev_flush_failed = False
        # The in-memory header starts zeroed, as the kernel's kzalloc'ed one: a first
        # resume whose read fails writes magic 0, version 0 back.
        self.header_magic = self.header_version = self.header_nr_regions = 0
        self._io = DmIoClient()
        super().__init__(ti, args[1:], flush_callback=flush_callback, table_event=table_event)

    def _alloc_clean_bits(self) -> None:
        block = int(getattr(self.log_dev, "logical_block_size", SECTOR_SIZE))
        self.buf_size = buffer_bytes(self.region_count, block)
        if self.buf_size > self.log_dev.nr_sectors << SECTOR_SHIFT:
            raise DirtyLogError(f"log device {self.log_dev.status_name} too small: "
                                f"need {self.buf_size} bytes")
        self.buffer = bytearray(self.buf_size)
        start = BITSET_OFFSET
        self.clean_bits = Bitset(memoryview(self.buffer)[start : start + self.bitset_size], self)

    # -- device I/O -----------------------------------------------------------------------

    @property
    def _location(self) -> Region:
        return Region(self.log_dev, 0, self.buf_size >> SECTOR_SHIFT)

    async def _rw_header(self, op: Op) -> None:
        mem = BufferMem(self.buffer if op is Op.READ else bytes(self.buffer))
        if await dm_io(self._io, IoRequest(op, ReqFlag.NONE, mem), [self._location]):
            raise DmIOError(f"{self.log_dev.status_name}: dirty log {op.name.lower()} failed")

    async def _flush_header(self) -> None:
        req = IoRequest(Op.WRITE, ReqFlag.PREFLUSH, None)
        if await dm_io(self._io, req, [Region(self.log_dev, 0, 0)]):
            raise DmIOError(f"{self.log_dev.status_name}: dirty log flush failed")

    def _fail_log_device(self) -> None:
        if not self.log_dev_failed:
            self.log_dev_failed = True
            self.table_event()

    async def _read_header(self) -> None:
        """``read_header``: read the buffer and decode (or re-initialise) the header."""
        await self._rw_header(Op.READ)
        header = decode_header(self.buffer)
        magic = header.magic
        self.header_magic, self.header_version, self.header_nr_regions = \
            header.magic, header.version, header.nr_regions
        if self.sync is not SyncMode.DEFAULT or magic != MIRROR_MAGIC:
            self.header_magic = MIRROR_MAGIC
            self.header_version = MIRROR_DISK_VERSION
            self.header_nr_regions = 0
        if self.header_version == 1:
            self.header_version = 2
        if self.header_version != MIRROR_DISK_VERSION:
            log.warning("incompatible disk log version")
            raise DmIOError("incompatible disk log version")

    # -- resume / flush -------------------------------------------------------------------

    async def resume(self) -> None:
        """``disk_resume``: load the clean bits, rewrite the header, flush the log device."""
        name = self.log_dev.status_name
        try:
            await self._read_header()
        except DmIOError:
            log.warning("%s: Failed to read header on dirty region log device", name)
            self._fail_log_device()
            self.header_nr_regions = 0
        grown = range(self.header_nr_regions, self.region_count)
        for region in grown:
            if self.sync is SyncMode.NOSYNC:
                self.clean_bits.set(region)
            else:
                self.clean_bits.clear(region)
        for bit in range(self.region_count, self.bitset_size * 8):
            self.clean_bits.clear(bit)
        self.sync_bits.buf[:] = self.clean_bits.buf
        self.sync_count = self.clean_bits.weight()
        self.sync_search = 0
        self.header_nr_regions = self.region_count
        encode_header(self.buffer, LogHeader(self.header_magic, self.header_version,
                                             self.header_nr_regions))
        try:
            await self._rw_header(Op.WRITE)
            try:
                await self._flush_header()
            except DmIOError:
                self.log_dev_flush_failed = True
                raise
        except DmIOError:
            log.warning("%s: Failed to write header on dirty region log device", name)
            self._fail_log_device()
            raise

    async def flush(self) -> None:
        """``disk_flush``; raises DmIOError when the log could not be made durable."""
        if not self.touched_cleaned and not self.touched_dirtied:
            return
        if self.touched_cleaned and self.flush_callback is not None:
            try:
                await self.flush_callback()
            except DmIOError:
                # No leg is known to hold the cleaned data: everything is dirty until reload.
                self.flush_failed = True
                for region in range(self.region_count):
                    self.clean_bits.clear(region)
        try:
            await self._rw_header(Op.WRITE)
        except DmIOError:
            self._fail_log_device()
            raise
        if self.touched_dirtied:
            try:
                await self._flush_header()
            except DmIOError:
                self.log_dev_flush_failed = True
                self._fail_log_device()
                raise
            self.touched_dirtied = False
        self.touched_cleaned = False

    def mark_is_durable(self, region: int) -> bool:
        """The clean bit is 0 and no bit went dirty since the last completed
        flush, so the 0 is on the log device (a flush resets touched_dirtied
        only once the log device has been flushed)."""
        return not self.touched_dirtied and not self.clean_bits.test(region)

    async def postsuspend(self) -> None:
        await self.flush()

    def status(self, kind: StatusType) -> str:
        dev = self.log_dev.status_name
        if kind is StatusType.INFO:
            state = "F" if self.log_dev_flush_failed else "D" if self.log_dev_failed else "A"
            return f"3 disk {dev} {state}"
        nargs = 2 if self.sync is SyncMode.DEFAULT else 3
        return f"disk {nargs} {dev} {self.region_size} {self._sync_word()}"
