"""Tables and managers for in-process tests: the daemon's built-in target types plus a
probe (:data:`TYPES`), :func:`make_manager`, :class:`DictResolver` (tables over a
dict of devices, with reference counts), :func:`remove_all_checked`, and a persistent
snapshot exception store on in-memory devices (:func:`new_store`, :func:`commit_one`).

``unit-probe`` is a test-only target:

    unit-probe <max_io_len> [<dev> <offset>] [failopen]

It records every piece it receives in ``seen`` and every life-cycle call in
``events``.  With a device it remaps like linear; without one it completes
reads with a per-sector pattern and drops writes.  ``failopen`` makes
``open()`` fail with a DmIOError, to test that a table undoes itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from dmuser.control import Reply, dispatch
from dmuser.core.args import parse_sector, parse_uint
from dmuser.core.bio import Bio, Op
from dmuser.core.blockdev import BlockDevice
from dmuser.core.config import Config
from dmuser.core.errors import DmIOError, TargetArgError
from dmuser.core.manager import DeviceManager
from dmuser.core.table import Table, parse_table
from dmuser.core.target import DeviceRange, StatusType, Target, TargetContext, TargetRegistry
from dmuser.daemon import builtin_targets
from dmuser.nbd_server import NbdServer
from dmuser.targets.snapshot.store import create_store
from dmuser.targets.snapshot.store.persistent import PersistentStore

from .fakes import MemDevice

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


async def run_verb(mgr: DeviceManager, verb: str, **req: Any) -> Reply:
    """A control verb, in process (``control.dispatch``), as the daemon runs it."""
    return await dispatch(mgr, {"verb": verb, **req})


async def nbd_manager(nursery: trio.Nursery) -> DeviceManager:
    """A DeviceManager with its NBD server running in ``nursery``."""
    mgr = make_manager()
    mgr.service_nursery = nursery
    await nursery.start(NbdServer(mgr).run)
    return mgr


class DictResolver:
    """get_device / release_device over a dict of devices, counting references."""

    def __init__(self, devices: dict[str, BlockDevice]) -> None:
        self.devices = devices
        self.refs: dict[str, int] = {}
        self.released: list[BlockDevice] = []

    def get(self, word: str) -> BlockDevice:
        dev = self.devices[word]  # KeyError -> "Device lookup failed"
        self.refs[word] = self.refs.get(word, 0) + 1
        return dev

    def release(self, dev: BlockDevice) -> None:
        word = next(w for w, d in self.devices.items() if d is dev)
        self.refs[word] -= 1
        assert self.refs[word] >= 0, f"{word} released more often than acquired"
        self.released.append(dev)

    def outstanding(self) -> int:
        return sum(self.refs.values())

    async def build(self, text: str, md_name: str = "t") -> Table:
        return await Table.build(md_name, parse_table(text), self.get, self.release, types=TYPES)


async def remove_all_checked(manager: DeviceManager) -> None:
    """Remove every device, users first, and check nothing is left open.

    Unlike ``DeviceManager.remove_all`` this cannot spin forever when holder
    counts leaked: it fails instead.
    """
    for _ in range(len(manager.devices) + 1):
        free = [md.name for md in manager if not md.holders]
        if not free:
            break
        for name in free:
            manager.get(name).open_count = 0
            await manager.remove(name, force=True)
    left = {md.name: md.holders for md in manager}
    assert not left, f"devices left with holders (leaked holder counts?): {left}"
    assert manager._backing == {}, f"backing devices left open: {manager._backing}"


async def new_store(cow_sectors: int = 4096, cs: int = 8, word: str = "P",
                    cow: MemDevice | None = None,
                    ) -> tuple[PersistentStore, MemDevice, dict[int, int]]:
    """A persistent store (``word``, chunk size ``cs``) on ``cow`` (or a new zeroed COW
    device of ``cow_sectors``), activated: (store, COW device, the exceptions loaded)."""
    cow = cow or MemDevice(cow_sectors, "cow")
    origin = MemDevice(1 << 16, "origin")
    store = create_store([word, str(cs)], cow, origin)
    assert isinstance(store, PersistentStore)
    loaded: dict[int, int] = {}
    store.loaded_valid = await store.read_metadata(loaded.__setitem__)  # type: ignore[attr-defined]
    return store, cow, loaded


async def commit_one(store: PersistentStore, old: int) -> int:
    """Allocate and commit one exception for origin chunk ``old``; its COW chunk."""
    new = store.prepare_exception()
    done = await store.commit_exception(old, new, True, old)
    assert done == [(old, True)]
    return new
