"""error: every bio that reaches the target fails with EIO (dm-spec §2.3, dm-target.c).

Arguments are those of the kernel's ``io_err_ctr`` (error target 1.7): exactly
two words are ``<dev> <start>`` as for linear (the newer kernels' form, which
lets an error target stand in for a zoned device), checked in the kernel's
order: the start ("Invalid device sector"), then the device ("Device lookup
failed"); the device range must fit the device like linear's.  Any other
number of words, none included, is accepted and ignored.  (Kernel 6.1, error
1.5, ignores every argument, so it also loads ``error /dev/vda x``.)

Empty flushes succeed (0 flush bios); discards reach the target and fail
(1 discard bio).  Status and table parameters are empty, whatever was given:
the kernel's error target has no status method.
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
            dev = ti.get_device(args[0], "Device lookup failed")
            self.dev_range = DeviceRange(dev, offset, ti.len)

    async def map(self, bio: Bio) -> None:
        raise DmIOError(f"{self.ti.md_name}: error target at sector {bio.sector}")

    def iterate_devices(self) -> list[DeviceRange]:
        return [self.dev_range] if self.dev_range else []
