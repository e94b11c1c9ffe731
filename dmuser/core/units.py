"""Units and alignment helpers.

Every size and offset inside dmuser is in 512-byte sectors unless its name says
``_bytes``.  Tables, status lines and the on-disk formats all count in sectors,
as the kernel does.
"""

from __future__ import annotations

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT
PAGE_SIZE = 4096
PAGE_SECTORS = PAGE_SIZE // SECTOR_SIZE
#: Largest value a sector_t (u64) can hold; offsets beyond it are rejected.
MAX_SECTOR = (1 << 64) - 1
#: Largest mapped device: dmuser shows each device as a file, and a file's size
#: is an off_t (signed 64-bit), so at most 2^63 - 1 bytes: 2^54 - 1 whole sectors.
MAX_DEVICE_SECTORS = ((1 << 63) - 1) >> SECTOR_SHIFT


def to_bytes(nr_sectors: int) -> int:
    """Sectors -> bytes."""
    return nr_sectors << SECTOR_SHIFT


def to_sectors(nr_bytes: int) -> int:
    """Bytes -> whole sectors (the byte count must be sector aligned)."""
    if nr_bytes & (SECTOR_SIZE - 1):
        raise ValueError(f"{nr_bytes} bytes is not a whole number of sectors")
    return nr_bytes >> SECTOR_SHIFT


def pages_for(nr_sectors: int) -> int:
    """How many 4 KiB pages hold ``nr_sectors`` sectors (rounded up)."""
    return -(-nr_sectors // PAGE_SECTORS)
