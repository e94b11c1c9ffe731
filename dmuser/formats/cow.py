"""The persistent snapshot COW format: the kernel's ``dm-snap-persistent.c`` "SnAp" v1.

Pure encode/decode: no I/O, no dmuser imports.  The persistent exception store
(``dmuser.targets.snapshot.store.persistent``), ``dmuser cow`` and the tests all
use it, so there is one walk of a COW device.

On-disk format (dm-spec §3.2), all integers little-endian.  The COW device is an
array of chunks of ``chunk_size`` sectors.

* **Chunk 0, the header**: ``le32 magic = 0x70416E53`` (bytes "SnAp"),
  ``le32 valid`` (non-zero = valid), ``le32 version = 1``, ``le32 chunk_size``
  (sectors); the rest of the chunk is zero.
* **Metadata areas**: one chunk each, an array of ``chunk_size * 32`` records
  ``(le64 old_chunk, le64 new_chunk)``; no header, no checksum.  The first
  record with ``new_chunk == 0`` ends the list; an area without one is full
  and the list continues in the next area.
* **Layout**: area k at chunk ``1 + k * (exceptions_per_area + 1)``, followed by
  its ``exceptions_per_area`` data chunks, each a raw copy of an origin chunk.

:class:`MetadataWalk` follows the areas as an activation does, fed one area at
a time by its caller, and notes every record an activation could not trust.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

SECTOR_SHIFT = 9
SNAP_MAGIC = 0x70416E53
SNAPSHOT_DISK_VERSION = 1
NUM_SNAPSHOT_HDR_CHUNKS = 1
DM_CHUNK_SIZE_DEFAULT_SECTORS = 32
#: INT_MAX >> SECTOR_SHIFT: the largest chunk size the kernel accepts.
MAX_CHUNK_SECTORS = ((1 << 31) - 1) >> SECTOR_SHIFT
HEADER = struct.Struct("<IIII")
RECORD = struct.Struct("<QQ")


@dataclass(frozen=True, slots=True)
class Header:
    magic: int
    valid: int
    version: int
    chunk_size: int


def decode_header(buf: bytes | bytearray | memoryview) -> Header:
    """The four header fields from the first 16 bytes of chunk 0."""
    return Header(*HEADER.unpack_from(buf, 0))


def encode_header(valid: bool, chunk_size: int) -> bytearray:
    """A whole header chunk: magic, valid, version 1, chunk size, zero padding."""
    buf = bytearray(chunk_size << SECTOR_SHIFT)
    HEADER.pack_into(buf, 0, SNAP_MAGIC, int(valid), SNAPSHOT_DISK_VERSION, chunk_size)
    return buf


def chunk_size_problem(chunk_size: int) -> str | None:
    """Why ``chunk_size`` (sectors) is not one the kernel accepts, or None."""
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        return "Chunk size is not a power of 2"
    if chunk_size > MAX_CHUNK_SECTORS:
        return "Chunk size is too high"
    return None


def exceptions_per_area(chunk_size: int) -> int:
    return (chunk_size << SECTOR_SHIFT) // RECORD.size


def area_location(chunk_size: int, area: int) -> int:
    """COW chunk holding metadata area ``area``."""
    return NUM_SNAPSHOT_HDR_CHUNKS + area * (exceptions_per_area(chunk_size) + 1)


def is_metadata_chunk(chunk_size: int, chunk: int) -> bool:
    """True for the header chunk and every metadata area's chunk."""
    return chunk < NUM_SNAPSHOT_HDR_CHUNKS or \
        chunk % (exceptions_per_area(chunk_size) + 1) == NUM_SNAPSHOT_HDR_CHUNKS


def skip_metadata(chunk_size: int, next_free: int) -> int:
    """``next_free`` moved past a metadata area it points at (the kernel's skip_metadata)."""
    if next_free % (exceptions_per_area(chunk_size) + 1) == NUM_SNAPSHOT_HDR_CHUNKS:
        return next_free + 1
    return next_free


def iter_records(area: bytes | bytearray | memoryview) -> Iterator[tuple[int, int]]:
    """Every record of an area, terminator and stale records included."""
    for i in range(len(area) // RECORD.size):
        yield RECORD.unpack_from(area, i * RECORD.size)


def pack_record(area: bytearray, index: int, old_chunk: int, new_chunk: int) -> None:
    RECORD.pack_into(area, index * RECORD.size, old_chunk, new_chunk)


def unpack_record(area: bytes | bytearray | memoryview, index: int) -> tuple[int, int]:
    old, new = RECORD.unpack_from(area, index * RECORD.size)
    return int(old), int(new)


@dataclass
class MetadataWalk:
    """The walk of the metadata areas of a valid "SnAp" COW (dm-spec §3.4).

    Feed it the areas it asks for, in order::

        walk = MetadataWalk(chunk_size, device_sectors)
        while (chunk := walk.next_area()) is not None:
            walk.feed(read_chunk(chunk))   # b"" if the chunk lies past the device

    Afterwards ``records`` holds every exception in on-disk order,
    ``current_area``/``current_committed`` say where the next record goes,
    ``last_area`` is the buffer of the current area with any record after the
    terminator zeroed (a torn write's leftovers), ``next_free`` is the next COW
    chunk to hand out, and ``problems`` names each record an activation must
    not trust, with its area and index.
    """

    chunk_size: int
    device_sectors: int
    records: list[tuple[int, int]] = field(default_factory=list)
    #: chunk numbers of the areas read, in order
    area_chunks: list[int] = field(default_factory=list)
    current_area: int = 0
    current_committed: int = 0
    last_area: bytearray = field(default_factory=bytearray)
    next_free: int = NUM_SNAPSHOT_HDR_CHUNKS + 1
    problems: list[str] = field(default_factory=list)
    _done: bool = False
    _by_old: dict[int, tuple[int, int]] = field(default_factory=dict)
    _by_new: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def device_chunks(self) -> int:
        return self.device_sectors // self.chunk_size

    def next_area(self) -> int | None:
        """The chunk of the next area to read, or None once the walk is over."""
        if self._done:
            return None
        return area_location(self.chunk_size, len(self.area_chunks))

    def feed(self, buf: bytes | bytearray | memoryview) -> None:
        """Take the content of the area :meth:`next_area` named (short: past the end)."""
        area = len(self.area_chunks)
        loc = area_location(self.chunk_size, area)
        self.area_chunks.append(loc)
        self.current_area = area
        if len(buf) < self.chunk_size << SECTOR_SHIFT:
            self.problems.append(f"metadata area {area} (chunk {loc}) lies beyond the end of "
                                 "the device")
            self._done = True
            return
        for i, (old, new) in enumerate(iter_records(buf)):
            if new == 0:
                self.current_committed = i
                keep = i * RECORD.size
                self.last_area = bytearray(buf[:keep]) + bytearray(len(buf) - keep)
                self._done = True
                break
            self._check(area, i, old, new)
            self.records.append((old, new))
            self.next_free = max(self.next_free, new + 1)
        self.next_free = skip_metadata(self.chunk_size, self.next_free)

    def _check(self, area: int, index: int, old: int, new: int) -> None:
        where = f"metadata area {area} record {index}"
        if new >= self.device_chunks:
            self.problems.append(f"{where}: COW chunk {new} lies beyond the end of the device "
                                 f"({self.device_chunks} chunks)")
        elif is_metadata_chunk(self.chunk_size, new):
            what = "the header" if new < NUM_SNAPSHOT_HDR_CHUNKS else "a metadata area"
            self.problems.append(f"{where}: COW chunk {new} is {what}, not a data chunk")
        first = self._by_old.setdefault(old, (area, index))
        if first != (area, index):
            self.problems.append(f"{where}: origin chunk {old} already has an exception "
                                 f"(metadata area {first[0]} record {first[1]})")
        first = self._by_new.setdefault(new, (area, index))
        if first != (area, index):
            self.problems.append(f"{where}: COW chunk {new} is already used by metadata area "
                                 f"{first[0]} record {first[1]}")

    def usage(self) -> tuple[int, int, int]:
        """What ``dmsetup status`` shows once activated: allocated, total, metadata sectors."""
        cs = self.chunk_size
        return self.next_free * cs, self.device_sectors, (self.current_area + 2) * cs
