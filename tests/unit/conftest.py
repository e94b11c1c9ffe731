"""Fixtures for the in-process unit tests (no FUSE mount, no root).

Test-only helpers are exposed as fixtures (``probe_cls``, ``gate_device_cls``,
``h``) so test modules never import this file by name.  ``mgr`` is a fresh
DeviceManager whose devices are removed (and checked: nothing left held or
open) at teardown.

``unit-probe`` is a test-only target, registered once at import:

    unit-probe <max_io_len> [<dev> <offset>] [failopen]

It records every piece it receives in ``seen`` and every life-cycle call in
``events``.  With a device it remaps like linear; without one it completes
reads with a per-sector pattern and drops writes.  ``failopen`` makes
``open()`` fail with a DmIOError, to test that a table undoes itself.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Callable, Sequence
from types import SimpleNamespace

import pytest
import trio

import targets  # noqa: F401  (registers linear, zero, error)
from dmuser.args import parse_sector, parse_uint
from dmuser.bio import Bio, Op
from dmuser.blockdev import BlockDevice, MemDevice
from dmuser.errors import DmIOError, TargetArgError
from dmuser.manager import DeviceManager
from dmuser.table import Table, parse_table
from dmuser.target import TARGETS, DeviceRange, StatusType, Target, TargetContext

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


if TARGETS.get(PROBE) is None:
    TARGETS.register(PROBE)(ProbeTarget)
else:  # pragma: no cover - conftest imported twice under another name
    ProbeTarget = TARGETS.get(PROBE)  # type: ignore[assignment,misc]


class GateDevice(MemDevice):
    """A MemDevice whose submits wait on ``gate`` (a trio.Event) before doing I/O.

    ``entered`` counts submits that reached the device, ``done`` those that finished.
    """

    def __init__(self, nr_sectors: int, name: str = "gate") -> None:
        super().__init__(nr_sectors, name)
        self.gate = trio.Event()
        self.entered = 0
        self.done = 0

    async def submit(self, bio: Bio) -> None:
        self.entered += 1
        await self.gate.wait()
        await super().submit(bio)
        self.done += 1


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
        return await Table.build(md_name, parse_table(text), self.get, self.release)


def make_file(path: os.PathLike[str] | str, nr_sectors: int, seed: int | None = 0) -> bytes:
    """Create an image file of ``nr_sectors`` with seeded random content (zeros if seed None)."""
    if seed is None:
        data = bytes(nr_sectors * SECTOR)
    else:
        data = random.Random(seed).randbytes(nr_sectors * SECTOR)
    with open(path, "wb") as f:
        f.write(data)
    return data


def read_file(path: os.PathLike[str] | str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def fds_open_on(path: os.PathLike[str] | str) -> int:
    """How many of this process's file descriptors point at ``path``."""
    target = os.path.realpath(path)
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                n += 1
        except OSError:
            pass
    return n


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


def pattern(nr_sectors: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(nr_sectors * SECTOR)


@pytest.fixture
async def mgr() -> AsyncIterator[DeviceManager]:
    """A DeviceManager; at teardown every device is removed, users first, and nothing
    may be left held or open (:func:`remove_all_checked`)."""
    manager = DeviceManager()
    yield manager
    await remove_all_checked(manager)


@pytest.fixture
def probe_cls() -> type[ProbeTarget]:
    ProbeTarget.instances.clear()
    return ProbeTarget


@pytest.fixture
def gate_device_cls() -> type[GateDevice]:
    return GateDevice


@pytest.fixture(scope="session")
def h() -> SimpleNamespace:
    """Helper functions and classes for tests."""
    helpers: dict[str, Callable[..., object] | type | int] = {
        "SECTOR": SECTOR,
        "DictResolver": DictResolver,
        "GateDevice": GateDevice,
        "MemDevice": MemDevice,
        "ProbeTarget": ProbeTarget,
        "make_file": make_file,
        "read_file": read_file,
        "fds_open_on": fds_open_on,
        "pattern": pattern,
        "remove_all_checked": remove_all_checked,
    }
    return SimpleNamespace(**helpers)
