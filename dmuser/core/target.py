"""The target interface, modelled on the kernel's ``struct target_type``.

A target class names its kernel type in ``name``; a :class:`TargetRegistry`
maps names to classes (the daemon builds one with every built-in target, see
``dmuser/daemon.py``), and a table instantiates one target per table line.
Life cycle, driven by ``table.py`` and ``mapped_device.py``:

1. ``__init__(ti, args)`` — the constructor.  Validates every argument first,
   raising :class:`TargetArgError` with the kernel's ``ti->error`` text, and
   acquires devices (``ti.get_device``) last.  Synchronous: no I/O.
2. ``await open()`` — the asynchronous half of the constructor (metadata I/O,
   such as reading a COW header).  If it raises, the table is not loaded.
3. ``map(bio)`` for every bio, and ``end_io(bio, error)`` after it completes.
   The core guarantees a bio never crosses the end of the target nor a
   multiple of ``ti.max_io_len`` counted from ``ti.begin``.
4. ``presuspend``/``postsuspend`` around a suspend (I/O is drained between
   them), ``preresume`` (may refuse) and ``resume`` when I/O restarts.
5. ``await close()`` — the destructor, after the table is no longer live.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import trio

from dmuser.core.bio import Bio
from dmuser.core.blockdev import BlockDevice
from dmuser.core.config import Config
from dmuser.core.errors import DmIOError, TargetArgError

log = logging.getLogger(__name__)


class StatusType(enum.Enum):
    INFO = "status"
    TABLE = "table"


class Feature(enum.IntFlag):
    NONE = 0
    SINGLETON = 1
    ALWAYS_WRITEABLE = 2
    IMMUTABLE = 4


class DeviceRange(NamedTuple):
    """A range of a device a target uses (the kernel's ``iterate_devices``)."""

    dev: BlockDevice
    start: int
    nr_sectors: int


#: Resolves a table word naming a device to a device handle; see ``resolve.py``.
DeviceGetter = Callable[[str], BlockDevice]


@dataclass
class TargetContext:
    """Per-instance frame of a target (the kernel's ``struct dm_target``).

    Attributes:
        begin: first sector of the target in the mapped device.
        len: number of sectors it covers.
        md_name: the mapped device's name, for messages.
        max_io_len: set by the constructor; 0 means no limit.
        nursery: where a target runs background work (resync, merge) that must
            outlive the request that loaded the table; the daemon's service
            nursery.  The target cancels its own tasks in ``close()``.
        table_event: ``dm_table_event``: bumps the device's event number and
            wakes ``MappedDevice.wait_event`` waiters.
        noflush_suspending: ``dm_noflush_suspending``: true while the device is
            being suspended with ``--noflush``, when a target may finish held
            bios with :class:`RequeueError` instead of failing them.
        config: the daemon's tunables.
        shared: state a target type shares between all its instances in one
            daemon (the kernel's module-level statics, such as dm-raid1's
            resync throttle); keys are prefixed with the target type's name.
    """

    begin: int
    len: int
    md_name: str
    get_device_fn: DeviceGetter
    max_io_len: int = 0
    devices: list[BlockDevice] = field(default_factory=list)
    nursery: trio.Nursery | None = None
    table_event: Callable[[], None] | None = None
    noflush_suspending: Callable[[], bool] | None = None
    config: Config = field(default_factory=Config)
    shared: dict[str, Any] = field(default_factory=dict)

    def get_device(self, word: str, error: str | None = None) -> BlockDevice:
        """``dm_get_device``: resolve ``word``, or raise TargetArgError.

        The error text is ``error`` when given (the cause is logged, as the
        kernel's targets print it and set their own ``ti->error``), else
        "Device lookup failed (<cause>)".
        """
        try:
            dev = self.get_device_fn(word)
        except DmIOError:
            raise
        except Exception as exc:
            if error is None:
                raise TargetArgError(f"Device lookup failed ({exc})") from exc
            log.error("%s: %s: %s", self.md_name, error, exc)
            raise TargetArgError(error) from None
        self.devices.append(dev)
        return dev


class Target:
    """Base class of all targets.  Subclasses set the class attributes below."""

    name: ClassVar[str]
    version: ClassVar[tuple[int, int, int]]
    features: ClassVar[Feature] = Feature.NONE
    #: how many copies of an empty flush / discard / write-zeroes the core sends
    #: (dm-spec §1.3).  0 flush bios: flushes succeed without reaching map();
    #: 0 discard bios: discards fail as unsupported.
    num_flush_bios: ClassVar[int] = 0
    num_discard_bios: ClassVar[int] = 0
    num_write_zeroes_bios: ClassVar[int] = 0

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        self.ti = ti

    async def open(self) -> None:
        """Asynchronous part of construction (metadata reads)."""

    async def close(self) -> None:
        """Destructor; the table releases the devices afterwards."""

    async def map(self, bio: Bio) -> BlockDevice | None:
        """Route one bio.

        Return a device to have the core submit the (remapped: ``bio.sector``
        updated in place) bio to it — the kernel's DM_MAPIO_REMAPPED — or None
        once the target has completed the bio itself (DM_MAPIO_SUBMITTED).
        Raise :class:`DmIOError` to fail it (DM_MAPIO_KILL).
        """
        raise NotImplementedError

    async def end_io(self, bio: Bio, error: DmIOError | None) -> DmIOError | None:
        """Called after a bio completed; may change the outcome."""
        return error

    def status(self, kind: StatusType) -> str:
        """The parameter string of ``dmsetup status`` / ``dmsetup table``."""
        return ""

    async def message(self, args: Sequence[str]) -> str | None:
        raise TargetArgError("Target type does not support messages")

    def iterate_devices(self) -> list[DeviceRange]:
        """Device ranges this target uses; the table checks they fit."""
        return []

    def direct_remap(self, write: bool, sector: int,
                     nr_sectors: int) -> tuple[BlockDevice, int] | None:
        """``(device, delta)`` if a plain read (``write`` False) or write of these
        sectors may skip map() right now: map() would only send it, at
        ``sector + delta``, to ``device``, with no end_io; None otherwise.

        Must not yield or change any state.  The core asks just before it does
        the I/O without yielding (``MappedDevice.read_direct``/``write_direct``),
        so the answer cannot go stale in between.  Linear always says yes,
        snapshot-origin for reads and for writes no snapshot needs a copy of;
        every other target keeps the default.
        """
        return None

    def absorb_write(self, sector: int, data: bytes | bytearray | memoryview) -> bool:
        """Complete a plain write that :meth:`direct_remap` declined, now, without
        yielding, if map() would complete it without sending it on (snapshot-origin
        holding it); False (nothing done) otherwise.  Asked only by
        ``MappedDevice.write_direct``, under the same conditions as direct_remap."""
        return False

    async def presuspend(self) -> None:
        pass

    async def postsuspend(self) -> None:
        pass

    async def preresume(self) -> None:
        pass

    async def resume(self) -> None:
        pass

    #: set on classes whose end_io is overridden, so the core skips the call otherwise
    has_end_io: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.has_end_io = cls.end_io is not Target.end_io


class TargetRegistry:
    """Target types by kernel name (the kernel's ``dm_register_target`` list).

    Registering a name twice is an error; a lookup miss returns None and the
    table reports "unknown target type".  Nothing registers itself on import:
    whoever builds tables decides which types exist.
    """

    def __init__(self, *types: type[Target]) -> None:
        self._types: dict[str, type[Target]] = {}
        for cls in types:
            self.register(cls)

    def register(self, cls: type[Target]) -> type[Target]:
        if cls.name in self._types:
            raise ValueError(f"target type {cls.name!r} registered twice")
        self._types[cls.name] = cls
        return cls

    def get(self, name: str) -> type[Target] | None:
        return self._types.get(name)

    def items(self) -> list[tuple[str, type[Target]]]:
        return sorted(self._types.items())
