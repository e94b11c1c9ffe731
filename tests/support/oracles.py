"""Independent readers of the on-disk formats, written from the spec alone.

THIS MODULE IMPORTS NOTHING FROM ``dmuser`` -- in particular nothing from
``dmuser.targets`` (the exception stores, the dirty logs) nor ``dmuser.formats``
(the encoders they share with ``dmuser cow``): these readers exist to check that
code, so a format bug there cannot hide behind a shared bug here.
(``tests/unit/test_layering.py`` enforces it.)

The persistent snapshot COW (dm-spec §3.2)
    Chunk 0 is the header: le32 magic ``0x70416E53`` ("SnAp" on disk), le32
    valid, le32 version 1, le32 chunk size (sectors), the rest zero.  Metadata
    areas of ``chunk_size * 32`` records ``(le64 old, le64 new)`` sit at chunk
    ``1 + k * (per_area + 1)``, each followed by its data chunks; the first
    record with ``new == 0`` ends the list, an area without one is full and the
    list goes on in the next area.  :func:`read_cow`, :func:`cow_exceptions`,
    :func:`first_data_chunks`.

The mirror's disk dirty log (dm-spec §5.5)
    le32 magic ``0x4D695272`` ("rRiM" on disk), le32 version, le64 nr_regions;
    the clean bitset starts at byte 1024, bit r = byte r/8 bit r%8 (LSB first),
    1 = clean.  :func:`decode_disk_log`, :func:`read_disk_log`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

SECTOR = 512

# -- the persistent snapshot COW (dm-spec §3.2) ---------------------------------------------

#: le32 at byte 0 of a COW device
COW_MAGIC = 0x70416E53
COW_VERSION = 1


@dataclass
class Cow:
    magic: int
    valid: int
    version: int
    chunk_size: int
    header_rest_zero: bool
    per_area: int = 0
    #: (area index, area chunk, records before the terminator, terminator index or None)
    areas: list[tuple[int, int, list[tuple[int, int]], int | None]] = field(default_factory=list)
    #: records after the terminator that are not all zero (area, index, old, new)
    stale: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def records(self) -> list[tuple[int, int]]:
        """Every (old chunk, new chunk) exception record, in order."""
        return [r for _, _, recs, _ in self.areas for r in recs]

    def chunk(self, raw: bytes, c: int) -> bytes:
        size = self.chunk_size * SECTOR
        return raw[c * size:(c + 1) * size]


def area_chunk(per_area: int, k: int) -> int:
    """The chunk holding metadata area ``k``."""
    return 1 + k * (per_area + 1)


def read_cow(raw: bytes) -> Cow:
    """Decode a whole COW device image; only the header when it is not a COW."""
    magic, valid, version, cs = struct.unpack_from("<IIII", raw, 0)
    cow = Cow(magic, valid, version, cs, False)
    if magic != COW_MAGIC or not cs:
        return cow
    chunk_bytes = cs * SECTOR
    cow.header_rest_zero = raw[16:chunk_bytes] == bytes(chunk_bytes - 16)
    cow.per_area = per_area = chunk_bytes // 16
    k = 0
    while True:
        loc = area_chunk(per_area, k)
        area = raw[loc * chunk_bytes:(loc + 1) * chunk_bytes]
        assert len(area) == chunk_bytes, f"area {k} at chunk {loc} is past the end of the COW"
        recs: list[tuple[int, int]] = []
        end = None
        for i in range(per_area):
            old, new = struct.unpack_from("<QQ", area, i * 16)
            if end is None:
                if new == 0:
                    end = i
                else:
                    recs.append((old, new))
            elif old or new:
                cow.stale.append((k, i, old, new))
        cow.areas.append((k, loc, recs, end))
        if end is not None:
            return cow
        k += 1


def cow_exceptions(raw: bytes) -> dict[int, int]:
    """old chunk -> new chunk of every exception the COW image records."""
    return dict(read_cow(raw).records)


def first_data_chunks(n: int, chunk_size: int) -> list[int]:
    """The first ``n`` data chunks a fresh store hands out: 0 (the header) and every
    metadata area chunk skipped."""
    stride = chunk_size * 32 + 1
    out, c = [], 2
    while len(out) < n:
        if c % stride != 1:
            out.append(c)
        c += 1
    return out


# -- the mirror's disk dirty log (dm-spec §5.5) --------------------------------------------

#: le32 at byte 0 of a disk log
MAGIC = 0x4D695272
#: where the clean bitset starts
BITSET_OFFSET = 1024


@dataclass(frozen=True)
class DiskLog:
    magic: int
    version: int
    nr_regions: int
    #: one flag a region: True = clean
    clean: list[bool]

    @property
    def dirty(self) -> list[int]:
        """The indexes of the dirty regions, ascending."""
        return [r for r, c in enumerate(self.clean) if not c]


def decode_disk_log(raw: bytes, regions: int) -> DiskLog:
    """Decode the header of the log image ``raw`` and the clean bits of its first
    ``regions`` regions (the count the test expects, not the header's)."""
    magic, version, nr = struct.unpack_from("<IIQ", raw)
    bits = raw[BITSET_OFFSET:]
    return DiskLog(magic, version, nr,
                   [bool(bits[r // 8] >> (r % 8) & 1) for r in range(regions)])


def read_disk_log(path: str | os.PathLike[str], regions: int) -> DiskLog:
    """:func:`decode_disk_log` of the log device (or image file) at ``path``."""
    with open(path, "rb") as f:
        raw = f.read(BITSET_OFFSET + (regions + 7) // 8)
    return decode_disk_log(raw, regions)


def differing_regions(a: str | os.PathLike[str], b: str | os.PathLike[str], region_bytes: int,
                      nr_regions: int) -> list[int]:
    """The regions (of ``region_bytes`` each, the first ``nr_regions``) where the files
    ``a`` and ``b`` differ, e.g. two mirror legs."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return [r for r in range(nr_regions) if fa.read(region_bytes) != fb.read(region_bytes)]
