"""Fixtures for the in-process unit tests (no FUSE mount, no root).

Test-only helpers are exposed as fixtures (``probe_cls``, ``gate_device_cls``,
``h``) so test modules never import this file by name.  ``mgr`` is a fresh
DeviceManager whose devices are removed (and checked: nothing left held or
open) at teardown.

``unit-probe`` is a test-only target (``support.targets.ProbeTarget``).
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace

import pytest
import trio
from support.fakes import MemDevice
from support.targets import TYPES, ProbeTarget, make_manager

from dmuser.core.bio import Bio
from dmuser.core.blockdev import BlockDevice
from dmuser.core.manager import DeviceManager
from dmuser.core.table import Table, parse_table

SECTOR = 512


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
        return await Table.build(md_name, parse_table(text), self.get, self.release, types=TYPES)


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
    manager = make_manager()
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
