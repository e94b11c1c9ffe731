"""error: every bio that reaches the target fails with EIO (dm-spec §2.3).

Any number of arguments is accepted; exactly two are validated as
``<dev> <offset>`` like linear.  Empty flushes succeed (0 flush bios).  Status
and table parameters are empty, whatever was given.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmuser.core.args import parse_sector
from dmuser.core.bio import Bio
from dmuser.core.errors import DmIOError
from dmuser.core.target import DeviceRange, Target, TargetContext


class ErrorTarget(Target):
    name = "error"
    version = (1, 7, 0)
    num_discard_bios = 1

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        super().__init__(ti, args)
        self.dev_range: DeviceRange | None = None
        if len(args) == 2:
            offset = parse_sector(args[1], "Invalid device sector")
            self.dev_range = DeviceRange(ti.get_device(args[0]), offset, ti.len)

    async def map(self, bio: Bio) -> None:
        raise DmIOError(f"{self.ti.md_name}: error target at sector {bio.sector}")

    def iterate_devices(self) -> list[DeviceRange]:
        return [self.dev_range] if self.dev_range else []
