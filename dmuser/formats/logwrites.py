"""The log device format of the kernel's ``dm-log-writes.c`` (write log version 1).

Pure encode/decode: no I/O, no dmuser imports.  The ``log-writes`` target
(``dmuser.targets.log_writes``) writes it, the tests decode and replay it, and
fstests' ``replay-log`` reads the same bytes.  Every field, size and padding
below is the kernel's (``struct log_write_super``, ``struct log_write_entry``,
``log_one_block``, ``log_super``, ``write_metadata``), all integers
little-endian.  ``sectorsize`` is the log's sector size: the data device's
logical block size (512 for every dmuser device); ``sector`` and
``nr_sectors`` of an entry count in it, not in 512-byte sectors.

* **Super block**, at byte 0, one sector: ``le64 magic = 0x6a736677736872``,
  ``le64 version = 1``, ``le64 nr_entries``, ``le32 sectorsize``.  The C
  struct is 32 bytes (4 bytes of tail padding, which the kernel copies from an
  uninitialised stack variable: :func:`decode_super` ignores them,
  :func:`encode_super` writes zeros); the rest of the sector is zero.  The
  kernel writes the super only after logging a FUA or a mark entry, so a log
  without either has an all-zero sector 0 (:func:`decode_super` then reports
  a bad magic).
* **Records**, one after the other from sector 1: a header sector
  (``le64 sector, le64 nr_sectors, le64 flags, le64 data_len``; for a mark,
  ``data_len`` bytes of its text follow; zeros to the end of the sector), then
  ``nr_sectors`` sectors of the data written -- except for a discard, whose
  record is the header alone.  Flush and mark records have ``nr_sectors = 0``.
  Only the first ``nr_entries`` records count; the area after them is
  whatever the device held.

``replay-log`` rejects a header whose flags and ``nr_sectors`` are both zero,
and one (other than a pure mark) whose byte 32 is not zero; :func:`decode_log`
applies the same checks, so a log it accepts is one ``replay-log`` accepts.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

SECTOR_SHIFT = 9
LOG_FLUSH_FLAG = 1 << 0
LOG_FUA_FLAG = 1 << 1
LOG_DISCARD_FLAG = 1 << 2
LOG_MARK_FLAG = 1 << 3
LOG_METADATA_FLAG = 1 << 4
WRITE_LOG_VERSION = 1
WRITE_LOG_MAGIC = 0x6A736677736872
WRITE_LOG_SUPER_SECTOR = 0
SUPER = struct.Struct("<QQQI")
#: sizeof(struct log_write_super) in C: SUPER plus 4 bytes of tail padding
SUPER_SIZE = 32
ENTRY = struct.Struct("<QQQQ")
#: The mark text's room: the sector after the header, minus the kernel's NUL.
MARK_MAX = 512 - ENTRY.size - 1
END_MARK = b"dm-log-writes-end"

_FLAG_NAMES = ((LOG_FLUSH_FLAG, "FLUSH"), (LOG_FUA_FLAG, "FUA"), (LOG_DISCARD_FLAG, "DISCARD"),
               (LOG_MARK_FLAG, "MARK"), (LOG_METADATA_FLAG, "METADATA"))


class LogFormatError(ValueError):
    """The bytes are not a valid write log (the text says what replay-log would say)."""


@dataclass(frozen=True, slots=True)
class Super:
    magic: int
    version: int
    nr_entries: int
    sectorsize: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One record.  ``offset``: byte offset of its header sector in the log."""

    index: int
    offset: int
    sector: int
    nr_sectors: int
    flags: int
    data_len: int
    mark: bytes | None = None
    data: bytes | None = None

    @property
    def kind(self) -> str:
        """The flags as replay-log prints them: ``FLUSH|FUA``, ``NONE``."""
        return "|".join(name for bit, name in _FLAG_NAMES if self.flags & bit) or "NONE"


def encode_super(nr_entries: int, sectorsize: int = 512) -> bytes:
    """The super block sector as ``log_super`` writes it (padding zeroed)."""
    buf = bytearray(sectorsize)
    SUPER.pack_into(buf, 0, WRITE_LOG_MAGIC, WRITE_LOG_VERSION, nr_entries, sectorsize)
    return bytes(buf)


def decode_super(buf: bytes | bytearray | memoryview) -> Super:
    """The super block's fields; :class:`LogFormatError` unless magic and version match."""
    sup = Super(*SUPER.unpack_from(buf, 0))
    if sup.magic != WRITE_LOG_MAGIC:
        raise LogFormatError("Magic doesn't match")
    if sup.version != WRITE_LOG_VERSION:
        raise LogFormatError(f"Version mismatch, wanted {WRITE_LOG_VERSION}, have {sup.version}")
    if sup.sectorsize < 512 or sup.sectorsize & (sup.sectorsize - 1):
        raise LogFormatError(f"Bad sectorsize {sup.sectorsize}")
    return sup


def encode_header(sector: int, nr_sectors: int, flags: int, mark: bytes = b"",
                  sectorsize: int = 512) -> bytes:
    """One header sector: the entry, the mark text (if any), zeros."""
    if len(mark) > sectorsize - ENTRY.size - 1:
        raise ValueError("mark text longer than the header sector allows")
    buf = bytearray(sectorsize)
    ENTRY.pack_into(buf, 0, sector, nr_sectors, flags, len(mark))
    buf[ENTRY.size:ENTRY.size + len(mark)] = mark
    return bytes(buf)


def record_size(flags: int, nr_sectors: int, sectorsize: int = 512) -> int:
    """Bytes a record takes in the log: the header sector, plus the data unless a discard."""
    data = 0 if flags & LOG_DISCARD_FLAG else nr_sectors * sectorsize
    return sectorsize + data


def encode_record(sector: int, nr_sectors: int, flags: int, data: bytes | memoryview = b"",
                  mark: bytes = b"", sectorsize: int = 512) -> bytes:
    """A whole record: header sector and (for a write) its data, as ``log_one_block``."""
    if not flags & LOG_DISCARD_FLAG and len(data) != nr_sectors * sectorsize:
        raise ValueError(f"{len(data)} data bytes for {nr_sectors} sectors")
    head = encode_header(sector, nr_sectors, flags, mark, sectorsize)
    return head if flags & LOG_DISCARD_FLAG else head + bytes(data)


def iter_entries(buf: bytes | bytearray | memoryview, sup: Super | None = None,
                 with_data: bool = True) -> Iterator[Entry]:
    """The first ``nr_entries`` records of the log in ``buf`` (the whole log device, or
    at least its used part), in log order.  Raises :class:`LogFormatError` on a record
    replay-log would call malformed, or one that runs past ``buf``."""
    view = memoryview(buf)
    sup = sup or decode_super(view)
    size = sup.sectorsize
    offset = size
    for index in range(sup.nr_entries):
        if offset + size > len(view):
            raise LogFormatError(f"Error reading entry {index}: log ends at {len(view)}")
        sector, nr_sectors, flags, data_len = ENTRY.unpack_from(view, offset)
        if not flags and not nr_sectors:
            raise LogFormatError(f"Malformed entry @{offset // size}")
        if flags != LOG_MARK_FLAG and view[offset + ENTRY.size] != 0:
            raise LogFormatError(f"Malformed entry @{offset // size}")
        mark = None
        if flags & LOG_MARK_FLAG:
            mark = bytes(view[offset + ENTRY.size:offset + ENTRY.size + data_len])
        end = offset + record_size(flags, nr_sectors, size)
        if end > len(view):
            raise LogFormatError(f"Error reading data of entry {index}")
        data = None
        if with_data and not flags & LOG_DISCARD_FLAG and nr_sectors:
            data = bytes(view[offset + size:end])
        yield Entry(index, offset, sector, nr_sectors, flags, data_len, mark, data)
        offset = end


def decode_log(buf: bytes | bytearray | memoryview) -> tuple[Super, list[Entry]]:
    """The super block and every logged entry."""
    sup = decode_super(buf)
    return sup, list(iter_entries(buf, sup))


def replay(entries: list[Entry], device: bytearray, sectorsize: int = 512,
           end_mark: bytes | None = None, limit: int | None = None) -> int:
    """Apply ``entries`` in order to ``device`` (a bytearray) as ``replay-log`` does on
    a device without discard support: writes copy their data, discards write zeros in
    pieces of at most 1 GiB, skipping a piece over 128 MiB (replay-log's ``max_chunk``
    and ``max_zero_size``), flushes and marks do nothing.  Stops after ``limit``
    entries, or after the mark ``end_mark`` (inclusive, as ``--end-mark``).  Returns
    the number of entries applied."""
    done = 0
    for entry in entries:
        if limit is not None and done >= limit:
            break
        done += 1
        start, size = entry.sector * sectorsize, entry.nr_sectors * sectorsize
        if entry.flags & LOG_DISCARD_FLAG:
            while size:
                piece = min(size, 1 << 30)
                if piece <= 128 << 20:
                    device[start:start + piece] = bytes(piece)
                start, size = start + piece, size - piece
        elif entry.data is not None:
            device[start:start + size] = entry.data
        if end_mark is not None and entry.mark == end_mark:
            break
    return done
