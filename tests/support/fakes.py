"""Fake block devices for in-process tests: one family, all built on :class:`MemDevice`."""

from __future__ import annotations

import trio

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError, NotSupportedError
from dmuser.core.units import SECTOR_SHIFT


class MemDevice(BlockDevice):
    """A device held in memory, for tests and transient scratch space.

    ``fail_sectors`` makes every bio touching one of those sectors fail with EIO,
    the simplest failing device for dm-io and kcopyd tests.
    """

    def __init__(self, nr_sectors: int, name: str = "mem") -> None:
        self.buf = bytearray(nr_sectors << SECTOR_SHIFT)
        self.status_name = name
        self.fail_sectors: set[int] = set()
        self.fail_all = False
        self.flushes = 0

    @property
    def nr_sectors(self) -> int:
        return len(self.buf) >> SECTOR_SHIFT

    def _fails(self, bio: Bio) -> bool:
        if self.fail_all:
            return True
        return any(s in self.fail_sectors for s in range(bio.sector, bio.end_sector))

    async def submit(self, bio: Bio) -> None:
        await trio.lowlevel.checkpoint()
        if bio.end_sector > self.nr_sectors:
            raise DmIOError(f"{self.status_name}: access beyond end of device")
        if self._fails(bio):
            if bio.op is Op.READ and bio.data is not None:
                bio.data[:] = bytes(len(bio.data))
            raise DmIOError(f"{self.status_name}: injected I/O error at sector {bio.sector}")
        start, end = bio.sector << SECTOR_SHIFT, bio.end_sector << SECTOR_SHIFT
        if bio.flags & ReqFlag.PREFLUSH:
            self.flushes += 1
        if bio.op is Op.READ:
            assert bio.data is not None
            bio.data[:] = self.buf[start:end]
        elif bio.op is Op.WRITE:
            if bio.data is not None:
                self.buf[start:end] = bio.data
        elif bio.op in (Op.DISCARD, Op.WRITE_ZEROES):
            self.buf[start:end] = bytes(end - start)
        elif bio.op is not Op.FLUSH:
            raise NotSupportedError(f"{self.status_name}: operation {bio.op.name} not supported")
