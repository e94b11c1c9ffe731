"""The mirror's disk dirty log: the kernel's ``dm-log.c`` on-disk format (dm-spec §5.5).

Pure encode/decode: no I/O, no dmuser imports.  All integers little-endian.
The log is read and written as one buffer of ``buf_size`` bytes from sector 0:

====================  =============  ================================================
byte offset           size           content
====================  =============  ================================================
0                     4              magic 0x4D695272 (bytes ``72 52 69 4D``, "rRiM")
4                     4              version, 2 (1 is read as 2)
8                     8              nr_regions (u64)
16                    1008           not interpreted: read, kept, written back
1024 (LOG_OFFSET=2)   bitset_size    clean bitset: bit i = byte i/8, bit i%8; 1 = clean
1024 + bitset_size    to buf_size    not interpreted, round-trips like bytes 16-1023
====================  =============  ================================================

``bitset_size`` = round_up(region_count, 64) / 8 (whole ``unsigned long``
words), ``buf_size`` = round_up(1024 + bitset_size, logical block size).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SECTOR_SHIFT = 9
MIRROR_MAGIC = 0x4D695272
MIRROR_DISK_VERSION = 2
#: the clean bitset starts at this sector
LOG_OFFSET = 2
BITSET_OFFSET = LOG_OFFSET << SECTOR_SHIFT
HEADER = struct.Struct("<IIQ")
#: bitsets are whole ``unsigned long`` words
BITS_PER_LONG = 64


@dataclass(frozen=True, slots=True)
class LogHeader:
    magic: int
    version: int
    nr_regions: int


def bitset_bytes(region_count: int) -> int:
    """round_up(region_count, BITS_PER_LONG) / 8."""
    return -(-region_count // BITS_PER_LONG) * BITS_PER_LONG // 8


def buffer_bytes(region_count: int, logical_block_bytes: int = 1 << SECTOR_SHIFT) -> int:
    """``buf_size``: header and bitset, rounded up to the log device's block size."""
    want = BITSET_OFFSET + bitset_bytes(region_count)
    return -(-want // logical_block_bytes) * logical_block_bytes


def decode_header(buf: bytes | bytearray | memoryview) -> LogHeader:
    return LogHeader(*HEADER.unpack_from(buf, 0))


def encode_header(buf: bytearray, header: LogHeader) -> None:
    """Write the 16 header bytes into ``buf``; the rest of the buffer is kept."""
    HEADER.pack_into(buf, 0, header.magic & 0xFFFFFFFF, header.version & 0xFFFFFFFF,
                     header.nr_regions)


def clean_bit(buf: bytes | bytearray | memoryview, region: int) -> bool:
    """Region ``region``'s clean bit in a whole log buffer."""
    return bool(buf[BITSET_OFFSET + (region >> 3)] >> (region & 7) & 1)
