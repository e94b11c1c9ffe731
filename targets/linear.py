"""linear: map a range of the mapped device onto a range of another device.

Table: ``<dev> <offset>`` (dm-spec §2.1).  Status INFO is empty; TABLE is
``<dev> <offset>``.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmuser.core.args import parse_sector
from dmuser.core.bio import Bio
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import TargetArgError
from dmuser.core.target import DeviceRange, StatusType, Target, TargetContext


class LinearTarget(Target):
    name = "linear"
    version = (1, 5, 0)
    num_flush_bios = 1
    num_discard_bios = 1
    num_write_zeroes_bios = 1

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        super().__init__(ti, args)
        if len(args) != 2:
            raise TargetArgError("Invalid argument count")
        self.offset = parse_sector(args[1], "Invalid device sector")
        self.dev = ti.get_device(args[0])

    async def map(self, bio: Bio) -> BlockDevice:
        if bio.nr_sectors:
            bio.sector = self.offset + bio.sector - self.ti.begin
        return self.dev

    def status(self, kind: StatusType) -> str:
        if kind is StatusType.TABLE:
            return f"{self.dev.status_name} {self.offset}"
        return ""

    def direct_remap(self, write: bool, sector: int, nr_sectors: int) -> tuple[BlockDevice, int]:
        return self.dev, self.offset - self.ti.begin

    def iterate_devices(self) -> list[DeviceRange]:
        return [DeviceRange(self.dev, self.offset, self.ti.len)]
