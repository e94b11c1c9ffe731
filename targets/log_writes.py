"""log-writes: pass I/O through and log every write, in flush order (dm-log-writes.c).

Table: ``<dev> <log_dev>`` (more words are ignored, as the kernel does).  Every
bio goes to ``<dev>`` at the *same* sector: the kernel's ``normal_map_bio``
does not subtract ``ti->begin``, and neither does dmuser, so a log-writes
target that does not start at sector 0 addresses ``<dev>`` with the mapped
device's sector numbers.  The log on ``<log_dev>`` has the kernel's format
(``dmuser.formats.logwrites``), byte for byte, so fstests' ``replay-log``
replays it; the log's sector size is 512 (dmuser devices' logical block size).

Guarantees -- the kernel's ordering rule (``log_writes_map``, ``normal_end_io``):

* **What is logged.**  Writes with data (their bytes as they were when the bio
  was mapped: the target copies them), discards (``LOG_DISCARD_FLAG``, no
  data) and empty flushes (``LOG_FLUSH_FLAG``, no data); FUA and META bios add
  ``LOG_FUA_FLAG`` / ``LOG_METADATA_FLAG``.  Reads and bios that arrive while
  logging is disabled are not logged.  A bio is logged whether it succeeded
  or failed, as the kernel does.
* **When.**  A completed write or discard waits on the *unflushed* list.  An
  empty flush takes the unflushed list when it is *mapped*; when it completes,
  the lists taken by flushes mapped before it and still in flight, then its
  own, then the flush entry are appended to the log.  A write that completes
  while a flush is in flight waits for the next flush.  A FUA write is
  appended when it completes; ``mark <text>`` at once.  The flush or FUA bio
  (and the message) returns only once its entries are on the log device (the
  kernel logs in a kthread and does not wait).
* **Replay order** (two deviations from the kernel, which the kernel's log can
  break when writes overlap): the log holds completed writes in completion
  order -- the kernel appends only a flush's own list, so when concurrent
  flushes complete out of order an older write lands after a newer one to the
  same sectors; and a completed FUA write cuts the sectors it wrote out of the
  older writes still waiting for a flush (a write may become two entries, or
  none) -- the kernel logs them whole after it, so a replay could end with the
  older data.  Every prefix ending at a flush or FUA entry is still a state a
  crash could leave.  Without concurrent flushes or overlapping FUA writes the
  log is the kernel's, byte for byte.
* **Records.**  Appended in that order, each at the log's next free sector
  (``next_sector``, starting at 1).  If a record would reach the log
  device's last sector (``next_sector >= size``) logging stops for good:
  "Ran out of space on the logdev", status gains ``logging_disabled``; as in
  the kernel, ``next_sector`` has already advanced.  A failed log write also
  disables logging.  After a FUA or a mark entry the super block is
  rewritten with the number of entries logged so far.
* **Close** (table removal or replacement): the unflushed entries are logged
  without a flush, then a mark ``dm-log-writes-end``, and the super block
  rewritten (``log_writes_dtr``).
* **Status.**  INFO: ``<logged entries> <next_sector - 1>`` (plus
  `` logging_disabled``); TABLE: ``<dev> <log_dev>``.
* **Messages.**  ``mark <text>`` (keyword case-insensitive; the text is cut to
  479 bytes, as ``kstrndup``); any other word count or keyword fails with
  EINVAL and the kernel's log text.
* **Errors.**  "Invalid argument count" (< 2 words), "Device lookup failed",
  "Log device lookup failed".

Supports flushes and discards (1 bio each); a discard to a device without
discard support is completed without reaching it (and logged), as the kernel
does.  Write-zeroes is not supported (the kernel sets no
``num_write_zeroes_bios``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError, TargetArgError
from dmuser.core.target import DeviceRange, StatusType, Target, TargetContext
from dmuser.core.units import SECTOR_SHIFT
from dmuser.formats.logwrites import (
    END_MARK,
    ENTRY,
    LOG_DISCARD_FLAG,
    LOG_FLUSH_FLAG,
    LOG_FUA_FLAG,
    LOG_MARK_FLAG,
    LOG_METADATA_FLAG,
    encode_record,
    encode_super,
)

log = logging.getLogger(__name__)

#: The log's sector size: the data device's logical block size, 512 for every dmuser device.
SECTORSIZE = 512


@dataclass(eq=False)
class _Block:
    """An entry waiting to be logged (the kernel's ``struct pending_block``)."""

    flags: int
    sector: int = 0
    nr_sectors: int = 0
    data: bytes = b""
    mark: bytes = b""
    #: for a flush: the unflushed entries it took when it was mapped
    flushed: list[_Block] = field(default_factory=list)


def _cut(blocks: list[_Block], lo: int, hi: int) -> list[_Block]:
    """``blocks`` without sectors ``lo..hi-1``: a block overlapping them keeps the
    parts before and after (data sliced to match), or goes."""
    out: list[_Block] = []
    for b in blocks:
        end = b.sector + b.nr_sectors
        if end <= lo or b.sector >= hi:
            out.append(b)
            continue
        for start, stop in ((b.sector, min(end, lo)), (max(b.sector, hi), end)):
            if start < stop:
                data = b.data[(start - b.sector) << SECTOR_SHIFT:(stop - b.sector) << SECTOR_SHIFT]
                out.append(_Block(b.flags, start, stop - start, data))
    return out


class LogWritesTarget(Target):
    name = "log-writes"
    version = (1, 1, 0)
    num_flush_bios = 1
    num_discard_bios = 1

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        super().__init__(ti, args)
        if len(args) < 2:
            raise TargetArgError("Invalid argument count")
        self.dev = ti.get_device(args[0], "Device lookup failed")
        self.logdev = ti.get_device(args[1], "Log device lookup failed")
        self.sectorsize = SECTORSIZE
        self.next_sector = self.sectorsize >> SECTOR_SHIFT
        self.end_sector = self.logdev.nr_sectors
        self.logged_entries = 0
        self.logging_enabled = True
        self.device_supports_discard = bool(self.dev.supports_discard)
        self._unflushed: list[_Block] = []
        #: flushes mapped and not completed, in map order (each holds the list it took)
        self._flushing: list[_Block] = []
        self._logging: deque[_Block] = deque()
        self._lock = trio.Lock()

    # -- I/O ------------------------------------------------------------------------------

    async def map(self, bio: Bio) -> BlockDevice | None:
        bio.target_ctx = None
        flush = bool(bio.flags & ReqFlag.PREFLUSH)
        if not self.logging_enabled or not bio.is_write or (not bio.nr_sectors and not flush):
            return self.dev
        flags = 0
        if flush:
            flags |= LOG_FLUSH_FLAG
        if bio.flags & ReqFlag.FUA:
            flags |= LOG_FUA_FLAG
        if bio.op is Op.DISCARD:
            flags |= LOG_DISCARD_FLAG
        if bio.flags & ReqFlag.META:
            flags |= LOG_METADATA_FLAG
        block = _Block(flags, bio.sector, bio.nr_sectors)
        bio.target_ctx = block
        if bio.op is Op.DISCARD:
            return self.dev if self.device_supports_discard else None
        if bio.data is not None:
            block.data = bytes(bio.data)
        if flush:
            block.flushed, self._unflushed = self._unflushed, []
            self._flushing.append(block)
        return self.dev

    async def end_io(self, bio: Bio, error: DmIOError | None) -> DmIOError | None:
        block = bio.target_ctx
        if not isinstance(block, _Block) or not bio.is_write:
            return error
        bio.target_ctx = None
        if block.flags & LOG_FLUSH_FLAG:
            # this flush also covers what earlier flushes still in flight took (it
            # completed before this one was mapped): logged first, in map order
            if block in self._flushing:  # not if close() already logged its list
                i = self._flushing.index(block)
                for earlier in self._flushing[:i + 1]:  # its own list last
                    self._logging.extend(earlier.flushed)
                    earlier.flushed = []
                del self._flushing[i]
            self._logging.append(block)
            await self._drain()
        elif block.flags & LOG_FUA_FLAG:
            lo, hi = block.sector, block.sector + block.nr_sectors
            self._unflushed = _cut(self._unflushed, lo, hi)
            for earlier in self._flushing:
                earlier.flushed = _cut(earlier.flushed, lo, hi)
            self._logging.append(block)
            await self._drain()
        else:
            self._unflushed.append(block)
        return error

    # -- the log (the kernel's log_writes_kthread) ----------------------------------------

    async def _drain(self) -> None:
        """Log every queued entry, in queue order; returns once those queued before the
        call are on the log device.  One task logs at a time (the lock is FIFO), and it
        is shielded, so a cancelled caller never leaves a record half written."""
        async with self._lock:
            with trio.CancelScope(shield=True):
                while self._logging:
                    await self._log_one(self._logging.popleft())

    async def _log_one(self, block: _Block) -> None:
        if not self.logging_enabled:
            return
        sector = self.next_sector
        if not block.flags & LOG_DISCARD_FLAG:
            self.next_sector += block.nr_sectors
        self.next_sector += self.sectorsize >> SECTOR_SHIFT
        if self.end_sector and self.next_sector >= self.end_sector:
            log.error("%s: log-writes: Ran out of space on the logdev", self.ti.md_name)
            self.logging_enabled = False
            return
        self.logged_entries += 1
        record = encode_record(block.sector, block.nr_sectors, block.flags, block.data,
                               block.mark, self.sectorsize)
        try:
            await self.logdev.submit(Bio.write(sector, record))
            if block.flags & (LOG_FUA_FLAG | LOG_MARK_FLAG):
                await self.logdev.submit(Bio.write(
                    0, encode_super(self.logged_entries, self.sectorsize)))
        except DmIOError as exc:
            log.error("%s: log-writes: Error writing log block: %s", self.ti.md_name, exc)
            self.logging_enabled = False

    async def _mark(self, text: bytes) -> None:
        """``log_mark``: queue a mark entry (text cut as ``kstrndup``) and log it."""
        maxsize = self.sectorsize - ENTRY.size
        text = text.split(b"\0", 1)[0][:maxsize - 1]
        self._logging.append(_Block(LOG_MARK_FLAG, mark=text))
        await self._drain()

    async def message(self, args: Sequence[str]) -> str | None:
        if len(args) != 2:
            raise self._warn("Invalid log-writes message arguments, expect 2 arguments, "
                             f"got {len(args)}")
        if args[0].lower() != "mark":
            raise self._warn(f"Unrecognised log writes target message received: {args[0]}")
        await self._mark(args[1].encode())
        return None

    def _warn(self, text: str) -> TargetArgError:
        log.warning("%s: log-writes: %s", self.ti.md_name, text)
        return TargetArgError(text)

    async def close(self) -> None:
        """``log_writes_dtr``: log the unflushed entries, then the end mark."""
        for earlier in self._flushing:  # flushes that never completed (cancelled)
            self._logging.extend(earlier.flushed)
            earlier.flushed = []
        self._flushing = []
        self._logging.extend(self._unflushed)
        self._unflushed = []
        await self._mark(END_MARK)

    # -- reporting ------------------------------------------------------------------------

    def status(self, kind: StatusType) -> str:
        if kind is StatusType.INFO:
            out = f"{self.logged_entries} {self.next_sector - 1}"
            return out if self.logging_enabled else out + " logging_disabled"
        return f"{self.dev.status_name} {self.logdev.status_name}"

    def iterate_devices(self) -> list[DeviceRange]:
        return [DeviceRange(self.dev, 0, self.ti.len)]
