"""Block I/O requests (the kernel's ``struct bio``, reduced to what dmuser needs).

A :class:`Bio` names an operation on a run of sectors of one device.  Data bios
(READ, WRITE) carry a writable ``memoryview`` of exactly ``nr_sectors`` sectors:
a READ fills it, a WRITE reads from it.  Splitting a bio (at target boundaries,
at ``max_io_len``) slices that view, so data is never copied on the way down.

Op numbers and flag bits are the kernel 6.x ``bi_opf`` values (dm-spec §1.5):
flakey compares flag masks from tables against them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from dmuser.core.units import SECTOR_SHIFT


class Op(enum.IntEnum):
    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    SECURE_ERASE = 5
    WRITE_ZEROES = 9

    @property
    def is_write(self) -> bool:
        """Kernel rule: an op is in the write direction exactly when its number is odd.

        FLUSH (2) is even, but an empty flush is sent as WRITE|PREFLUSH, see
        :meth:`Bio.is_write`.
        """
        return bool(self.value & 1)

    @property
    def has_data(self) -> bool:
        return self in (Op.READ, Op.WRITE)


class ReqFlag(enum.IntFlag):
    NONE = 0
    FAILFAST_DEV = 1 << 8
    FAILFAST_TRANSPORT = 1 << 9
    FAILFAST_DRIVER = 1 << 10
    SYNC = 1 << 11
    META = 1 << 12
    PRIO = 1 << 13
    NOMERGE = 1 << 14
    IDLE = 1 << 15
    INTEGRITY = 1 << 16
    FUA = 1 << 17
    PREFLUSH = 1 << 18
    RAHEAD = 1 << 19
    BACKGROUND = 1 << 20


@dataclass(slots=True)
class Bio:
    """One I/O request.

    ``data`` is None for DISCARD / WRITE_ZEROES and for empty flushes (a WRITE
    of 0 sectors with PREFLUSH).  ``target_ctx`` is per-target scratch space
    (the kernel's ``per_io_data``): map() may stash state there for end_io().
    """

    op: Op
    sector: int
    nr_sectors: int
    data: memoryview | None = None
    flags: ReqFlag = ReqFlag.NONE
    target_ctx: Any = field(default=None, repr=False)

    @classmethod
    def read(cls, sector: int, buf: memoryview | bytearray, flags: ReqFlag = ReqFlag.NONE) -> Bio:
        view = memoryview(buf).cast("B")
        return cls(Op.READ, sector, len(view) >> SECTOR_SHIFT, view, flags)

    @classmethod
    def write(
        cls, sector: int, buf: memoryview | bytes | bytearray, flags: ReqFlag = ReqFlag.NONE
    ) -> Bio:
        view = memoryview(buf).cast("B")
        return cls(Op.WRITE, sector, len(view) >> SECTOR_SHIFT, view, flags)

    @classmethod
    def flush(cls) -> Bio:
        """An empty flush: write nothing, make everything written before durable."""
        return cls(Op.WRITE, 0, 0, None, ReqFlag.PREFLUSH)

    @property
    def opf(self) -> int:
        """``bi_opf`` as the kernel has it: op number in the low byte, flags above."""
        return int(self.op) | int(self.flags)

    @property
    def is_write(self) -> bool:
        return self.op.is_write

    @property
    def is_empty_flush(self) -> bool:
        return self.nr_sectors == 0 and bool(self.flags & ReqFlag.PREFLUSH)

    @property
    def end_sector(self) -> int:
        return self.sector + self.nr_sectors

    def clone(self, sector: int, nr_sectors: int) -> Bio:
        """A bio for ``nr_sectors`` sectors starting at absolute ``sector`` of this bio.

        The clone shares this bio's data buffer (a slice of the same view), so a
        READ into the clone fills this bio's buffer in place.
        """
        offset = sector - self.sector
        if offset < 0 or offset + nr_sectors > self.nr_sectors:
            raise ValueError(f"clone {sector}+{nr_sectors} outside bio "
                             f"{self.sector}+{self.nr_sectors}")
        data = None
        if self.data is not None:
            data = self.data[offset << SECTOR_SHIFT : (offset + nr_sectors) << SECTOR_SHIFT]
        return Bio(self.op, sector, nr_sectors, data, self.flags)
