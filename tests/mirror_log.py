"""An independent reader of the mirror's disk dirty log, written from dm-spec §5.5.

The tests decode log devices with this, not with ``targets/dirtylog`` (and
this module must never import it): a log that dmuser writes is then checked
against a second reading of the spec, and one the kernel writes is read
without trusting the code under test.

On-disk layout (dm-spec §5.5): le32 magic ``0x4D695272`` ("rRiM" on disk),
le32 version, le64 nr_regions; the clean bitset starts at byte 1024, bit r =
byte r/8 bit r%8 (LSB first), 1 = clean.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

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


def read_disk_log(path: str | os.PathLike[str], regions: int) -> DiskLog:
    """Decode the header of the log at ``path`` and the clean bits of its first
    ``regions`` regions (the count the test expects, not the header's)."""
    with open(path, "rb") as f:
        raw = f.read(BITSET_OFFSET + (regions + 7) // 8)
    magic, version, nr = struct.unpack_from("<IIQ", raw)
    bits = raw[BITSET_OFFSET:]
    return DiskLog(magic, version, nr,
                   [bool(bits[r // 8] >> (r % 8) & 1) for r in range(regions)])


def differing_regions(a: str | os.PathLike[str], b: str | os.PathLike[str], region_bytes: int,
                      nr_regions: int) -> list[int]:
    """The regions (of ``region_bytes`` each, the first ``nr_regions``) where the files
    ``a`` and ``b`` differ, e.g. two mirror legs."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return [r for r in range(nr_regions) if fa.read(region_bytes) != fb.read(region_bytes)]
