"""The persistent exception store "P": the kernel's ``dm-snap-persistent.c`` format.

The on-disk format and the walk of the metadata areas are
:mod:`dmuser.formats.cow` (dm-spec §3.2).

Guarantees:

* COW chunks are handed out in increasing order and never name the header or
  a metadata area (the "metadata skip").
* **Commit ordering** (§3.5): before :meth:`commit_exception` reports success,
  the next area has been zeroed if this one filled up, and the area holding the
  record was written with PREFLUSH|FUA: every earlier COW write (the copied
  data) is durable before the record that names it, and the record is durable
  before the caller releases anything.  A record is therefore never on disk
  without its data; a copy whose record was not yet written is forgotten after
  a crash and its chunk handed out again.
* Commits are batched while other exceptions are prepared but not committed and
  the area is not full (group commit): one flush then covers the whole batch.
  A commit with ``hold`` keeps the batch open until :meth:`commit_held` (the
  snapshot's deferred group commit, ``docs/snapshot-protocol.md``); a full
  area is written at once either way.
* Any failed write makes the store invalid for good: later commits report
  failure and :meth:`drop_snapshot` rewrites the header with ``valid = 0``.
* The header is written only for a new store and by :meth:`drop_snapshot`.

Concurrency: the snapshot serialises commits (one at a time: the commit loop
of ``snap.Snapshot``) and merge steps (``merge.py``), see ``base.py``;
``prepare_exception`` may run while a commit is waiting for I/O because it
only touches ``next_free`` and ``pending_count``.
"""

from __future__ import annotations

import logging
from typing import Any

from dmuser.core.bio import Bio, ReqFlag
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError
from dmuser.core.units import SECTOR_SHIFT
from dmuser.formats.cow import (
    DM_CHUNK_SIZE_DEFAULT_SECTORS,
    SNAP_MAGIC,
    SNAPSHOT_DISK_VERSION,
    MetadataWalk,
    area_location,
    decode_header,
    encode_header,
    exceptions_per_area,
    pack_record,
    skip_metadata,
    unpack_record,
)
from dmuser.targets.snapshot.store.base import (
    AddExceptionFn,
    CowFullError,
    ExceptionStore,
    StoreArgError,
    StoreError,
    check_chunk_size,
    logical_block_sectors,
)

log = logging.getLogger(__name__)

ENXIO = 6


class PersistentStore(ExceptionStore):
    """Kernel-compatible on-disk store.  Fields change only between checkpoints
    or inside the (serialised) commit and merge calls."""

    type_name = "P"
    supports_merge = True

    def __init__(self, cow: BlockDevice, origin: BlockDevice, chunk_size: int,
                 options: str) -> None:
        super().__init__(cow, origin, chunk_size, options)
        if options and options[0].upper() != "O":
            log.error("Unsupported persistent store option: %s", options)
            raise StoreArgError("Exception store type constructor failed")
        #: "userspace supports overflow": a full COW fails snapshot writes, not the snapshot.
        self.overflow_ok = bool(options)
        self.chunk_size_supplied = chunk_size != 0
        self.valid = True
        self.version = SNAPSHOT_DISK_VERSION
        self.next_free = 2  # the header and area 0 come first
        self.current_area = 0
        self.current_committed = 0
        self.pending_count = 0
        self._area = bytearray()
        self._waiting: list[Any] = []
        self._busy = False

    def table_fragment(self) -> str:
        return f" {'PO' if self.overflow_ok else 'P'} {self.chunk_size}"

    @property
    def exceptions_per_area(self) -> int:
        return exceptions_per_area(self.chunk_size)

    def area_location(self, area: int) -> int:
        return area_location(self.chunk_size, area)

    # -- chunk I/O ---------------------------------------------------------------------

    async def _read_chunk(self, chunk: int) -> bytearray:
        buf = bytearray(self.chunk_size << SECTOR_SHIFT)
        await self.cow.submit(Bio.read(chunk * self.chunk_size, buf))
        return buf

    async def _write_chunk(self, chunk: int, buf: bytes | bytearray,
                           flags: ReqFlag = ReqFlag.NONE) -> None:
        await self.cow.submit(Bio.write(chunk * self.chunk_size, buf, flags))

    async def _write_header(self) -> None:
        await self._write_chunk(0, encode_header(self.valid, self.chunk_size))

    async def _zero_disk_area(self, area: int) -> None:
        await self._write_chunk(self.area_location(area), bytes(self.chunk_size << SECTOR_SHIFT))

    def _zero_memory_area(self) -> None:
        self._area = bytearray(self.chunk_size << SECTOR_SHIFT)

    def _skip_metadata(self) -> None:
        self.next_free = skip_metadata(self.chunk_size, self.next_free)

    # -- activation --------------------------------------------------------------------

    async def read_metadata(self, add_exception: AddExceptionFn) -> bool:
        """Activate (dm-spec §3.4): new store, invalid store, or load every record."""
        if not self.chunk_size:
            self.chunk_size = max(DM_CHUNK_SIZE_DEFAULT_SECTORS, logical_block_sectors(self.cow))
        try:
            header = decode_header(await self._read_chunk(0))
        except DmIOError as exc:
            raise StoreError(f"cannot read the snapshot header: {exc}") from exc
        if header.magic == 0:
            return await self._new_snapshot()
        if header.magic != SNAP_MAGIC:
            log.warning("Invalid or corrupt snapshot")
            raise StoreError("Invalid or corrupt snapshot", ENXIO)
        self.valid, self.version = bool(header.valid), header.version
        if header.chunk_size != self.chunk_size:
            if self.chunk_size_supplied:
                log.warning("chunk size %u in device metadata overrides table chunk size of %u.",
                            header.chunk_size, self.chunk_size)
            try:
                check_chunk_size(header.chunk_size, self.cow, self.origin)
            except StoreArgError as exc:
                log.error("invalid on-disk chunk size %u: %s.", header.chunk_size, exc.message)
                raise StoreError(f"invalid on-disk chunk size {header.chunk_size}") from None
            self.chunk_size = header.chunk_size
        if self.version != SNAPSHOT_DISK_VERSION:
            log.warning("unable to handle snapshot disk version %d", self.version)
            raise StoreError(f"unable to handle snapshot disk version {self.version}")
        if not self.valid:
            return False
        await self._read_exceptions(add_exception)
        return True

    async def _new_snapshot(self) -> bool:
        self.valid = True
        try:
            await self._write_header()
            self.current_area = 0
            self._zero_memory_area()
            await self._zero_disk_area(0)
        except DmIOError as exc:
            raise StoreError(f"cannot initialise the snapshot metadata: {exc}") from exc
        return True

    async def _read_exceptions(self, add_exception: AddExceptionFn) -> None:
        """Walk the areas until one holds a terminator; it becomes the current area.

        Records after the terminator (a torn write's leftovers) are dropped; the
        kernel keeps them in memory, so a later commit that reaches their index
        would bring them back to life pointing at reused chunks.

        dmuser, unlike the kernel, refuses metadata it cannot trust: a record
        naming a chunk past the device, the header or a metadata area, an origin
        chunk or a COW chunk named twice, or an area past the device
        (:class:`~dmuser.formats.cow.MetadataWalk`, the check ``dmuser cow
        check`` runs too).  Nothing is added before the whole walk passed.
        """
        walk = MetadataWalk(self.chunk_size, self.cow.nr_sectors)
        while (chunk := walk.next_area()) is not None:
            if (chunk + 1) * self.chunk_size > self.cow.nr_sectors:
                walk.feed(b"")  # past the end: the walk records the problem
                continue
            try:
                walk.feed(await self._read_chunk(chunk))
            except DmIOError as exc:
                raise StoreError(f"cannot read metadata area {len(walk.area_chunks)}: "
                                 f"{exc}") from exc
        if walk.problems:
            more = len(walk.problems) - 1
            raise StoreError("damaged metadata: " + walk.problems[0]
                             + (f" (and {more} more problem{'s' * (more > 1)}; "
                                "'dmuser cow check' lists them)" if more else ""))
        for old, new in walk.records:
            add_exception(old, new)
        self._area = walk.last_area
        self.current_area, self.current_committed = walk.current_area, walk.current_committed
        self.next_free = walk.next_free

    # -- exceptions --------------------------------------------------------------------

    def prepare_exception(self) -> int:
        if self.cow.nr_sectors < (self.next_free + 1) * self.chunk_size:
            raise CowFullError("snapshot COW device is full")
        new_chunk = self.next_free
        self.next_free += 1
        self._skip_metadata()
        self.pending_count += 1
        return new_chunk

    def _put_record(self, index: int, old_chunk: int, new_chunk: int) -> None:
        pack_record(self._area, index, old_chunk, new_chunk)

    def _get_record(self, index: int) -> tuple[int, int]:
        return unpack_record(self._area, index)

    def _enter(self) -> None:
        if self._busy:
            raise RuntimeError("persistent store: overlapping commit/merge calls")
        self._busy = True

    @property
    def held(self) -> int:
        """Records in the in-memory area not yet written, when :meth:`commit_held` may
        write them: 0 while other exceptions are prepared but not committed (the
        last of those commits ends the batch, as without ``hold``)."""
        return 0 if self.pending_count else len(self._waiting)

    async def commit_exception(self, old_chunk: int, new_chunk: int, valid: bool,
                               context: Any, hold: bool = False) -> list[tuple[Any, bool]]:
        """Record one exception; write the area when the batch ends or the area fills.

        With ``hold`` the batch does not end here: the record waits in memory
        for :meth:`commit_held` (or for the area to fill)."""
        self._enter()
        try:
            if not valid:
                self.valid = False
            self._record(old_chunk, new_chunk, context)
            full = self.current_committed == self.exceptions_per_area
            if (self.pending_count or hold) and not full:
                return []
            return await self._write_area(full)
        finally:
            self._busy = False

    def hold_nowait(self, old_chunk: int, new_chunk: int, context: Any) -> bool:
        """The record stays in memory unless it fills the area (which must be written)."""
        if self._busy or not self.valid \
                or self.current_committed + 1 == self.exceptions_per_area:
            return False
        self._record(old_chunk, new_chunk, context)
        return True

    def _record(self, old_chunk: int, new_chunk: int, context: Any) -> None:
        self._put_record(self.current_committed, old_chunk, new_chunk)
        self.current_committed += 1
        self._waiting.append(context)
        self.pending_count -= 1

    async def commit_held(self) -> list[tuple[Any, bool]]:
        """End the batch now: write the area holding the held records (if any)."""
        self._enter()
        try:
            return await self._write_area(False) if self._waiting else []
        finally:
            self._busy = False

    async def _write_area(self, full: bool) -> list[tuple[Any, bool]]:
        """Zero the next area if this one is full, then write this one with
        PREFLUSH|FUA; hand back every waiting context with the outcome."""
        if full:
            try:
                await self._zero_disk_area(self.current_area + 1)
            except DmIOError:
                self.valid = False
        if self.valid:
            try:
                await self._write_chunk(self.area_location(self.current_area), self._area,
                                        ReqFlag.PREFLUSH | ReqFlag.FUA | ReqFlag.SYNC)
            except DmIOError:
                self.valid = False
        if full:
            self.current_committed = 0
            self.current_area += 1
            self._zero_memory_area()
        done, self._waiting = self._waiting, []
        return [(ctx, self.valid) for ctx in done]

    # -- merge -------------------------------------------------------------------------

    async def prepare_merge(self) -> tuple[int, int, int]:
        """The longest run of consecutive records at the end of the list (§3.8)."""
        self._enter()
        try:
            if not self.current_committed:
                if not self.current_area:
                    return 0, 0, 0
                self.current_area -= 1
                try:
                    self._area = await self._read_chunk(self.area_location(self.current_area))
                except DmIOError as exc:
                    raise StoreError(f"cannot read metadata area {self.current_area}") from exc
                self.current_committed = self.exceptions_per_area
            last_old, last_new = self._get_record(self.current_committed - 1)
            n = 1
            while n < self.current_committed:
                old, new = self._get_record(self.current_committed - 1 - n)
                if old != last_old - n or new != last_new - n:
                    break
                n += 1
            return n, last_old, last_new
        finally:
            self._busy = False

    async def commit_merge(self, nr_merged: int) -> None:
        """Clear the last ``nr_merged`` records and write the area with PREFLUSH|FUA."""
        self._enter()
        try:
            for i in range(nr_merged):
                self._put_record(self.current_committed - 1 - i, 0, 0)
            try:
                await self._write_chunk(self.area_location(self.current_area), self._area,
                                        ReqFlag.PREFLUSH | ReqFlag.FUA)
            except DmIOError as exc:
                raise StoreError(f"cannot write metadata area {self.current_area}") from exc
            self.current_committed -= nr_merged
            self.next_free = self.area_location(self.current_area) + self.current_committed + 1
        finally:
            self._busy = False

    # -- invalidation and usage --------------------------------------------------------

    async def drop_snapshot(self) -> None:
        """Mark invalid in memory and in the header; failure is only logged.

        The header goes with FUA (the kernel's is a plain write): origin writes the
        invalidation releases (held ones, and those that no longer copy out) are sent
        only after this returns, so a crash can never leave them on disk under a header
        that still says valid, a snapshot that would load with pre-crash data silently
        overwritten."""
        self.valid = False
        try:
            await self._write_chunk(0, encode_header(self.valid, self.chunk_size), ReqFlag.FUA)
        except DmIOError:
            log.error("write header failed")

    def usage(self) -> tuple[int, int, int]:
        return (self.next_free * self.chunk_size, self.cow.nr_sectors,
                (self.current_area + 2) * self.chunk_size)
