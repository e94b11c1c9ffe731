"""The target types tests build tables with: the daemon's built-in list, plus a probe.

``unit-probe`` is a test-only target:

    unit-probe <max_io_len> [<dev> <offset>] [failopen]

It records every piece it receives in ``seen`` and every life-cycle call in
``events``.  With a device it remaps like linear; without one it completes
reads with a per-sector pattern and drops writes.  ``failopen`` makes
``open()`` fail with a DmIOError, to test that a table undoes itself.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmuser.core.args import parse_sector, parse_uint
from dmuser.core.bio import Bio, Op
from dmuser.core.blockdev import BlockDevice
from dmuser.core.config import Config
from dmuser.core.errors import DmIOError, TargetArgError
from dmuser.core.manager import DeviceManager
from dmuser.core.target import DeviceRange, StatusType, Target, TargetContext, TargetRegistry
from dmuser.daemon import builtin_targets

SECTOR = 512
PROBE = "unit-probe"


class ProbeTarget(Target):
    name = PROBE
    version = (0, 0, 1)
    num_flush_bios = 1
    num_discard_bios = 1
    num_write_zeroes_bios = 1
    instances: list[ProbeTarget] = []

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        super().__init__(ti, args)
        words = list(args)
        self.fail_open = "failopen" in words
        words = [w for w in words if w != "failopen"]
        if not words:
            raise TargetArgError("Missing max_io_len")
        max_io_len = parse_uint(words[0])
        if max_io_len is None:
            raise TargetArgError("Invalid max_io_len")
        ti.max_io_len = max_io_len
        self.seen: list[tuple[Op, int, int]] = []
        self.events: list[str] = []
        self.closed = False
        self.dev: BlockDevice | None = None
        self.offset = 0
        if len(words) == 3:
            self.offset = parse_sector(words[2], "Invalid device sector")
            self.dev = ti.get_device(words[1])
        ProbeTarget.instances.append(self)

    async def open(self) -> None:
        self.events.append("open")
        if self.fail_open:
            raise DmIOError("probe: open failed")

    async def close(self) -> None:
        self.events.append("close")
        self.closed = True

    async def map(self, bio: Bio) -> BlockDevice | None:
        self.seen.append((bio.op, bio.sector, bio.nr_sectors))
        if self.dev is not None:
            if bio.nr_sectors:
                bio.sector = self.offset + bio.sector - self.ti.begin
            return self.dev
        if bio.op is Op.READ:
            assert bio.data is not None
            for i in range(bio.nr_sectors):
                bio.data[i * SECTOR : (i + 1) * SECTOR] = bytes([(bio.sector + i) & 0xFF]) * SECTOR
        return None

    def status(self, kind: StatusType) -> str:
        return f"{self.ti.max_io_len}" if kind is StatusType.TABLE else "probe-ok"

    def iterate_devices(self) -> list[DeviceRange]:
        return [DeviceRange(self.dev, self.offset, self.ti.len)] if self.dev else []

    async def presuspend(self) -> None:
        self.events.append("presuspend")

    async def postsuspend(self) -> None:
        self.events.append("postsuspend")

    async def preresume(self) -> None:
        self.events.append("preresume")

    async def resume(self) -> None:
        self.events.append("resume")




def target_types(*extra: type[Target]) -> TargetRegistry:
    """Every built-in target type, and ``extra`` (test-only targets)."""
    types = builtin_targets()
    for cls in extra:
        types.register(cls)
    return types


#: The built-in target types and the probe.
TYPES = target_types(ProbeTarget)


def make_manager(mountpoint: str = "", config: Config | None = None,
                 types: TargetRegistry | None = None) -> DeviceManager:
    """A DeviceManager over the built-in types (or ``types``) and ``config``."""
    return DeviceManager(mountpoint, types=types or TYPES, config=config)
