"""Model-based test: an origin and several snapshots under concurrent random I/O.

Reference model: one bytearray per device.  A snapshot starts as a copy of the
origin at creation and afterwards changes only by writes to the snapshot.
Each round runs a batch of random reads and writes concurrently; within a
round the ranges used on one device are disjoint, so every read has exactly
one right answer (the model before the round), while origin writes and
snapshot reads of the same chunks race freely -- that race is what copy-out
and tracked reads must win.  Snapshots are created between rounds (origin
suspended, as LVM does), persistent ones are reloaded now and then, and at
the end every persistent COW is activated again from a raw copy of its bytes.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import trio
from support.fakes import DelayedDevice, MemDevice
from support.targets import TYPES

from dmuser.core.bio import Bio, Op
from dmuser.core.blockdev import BlockDevice
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.table import Table, parse_table
from dmuser.targets.snapshot.registry import ORIGINS

SIZE = 2048
ROUNDS = 25
OPS_PER_ROUND = 10
MAX_SNAPSHOTS = 3


def jitter(rng: random.Random) -> Callable[[Bio], int]:
    """Scheduler turns a request takes (a :class:`DelayedDevice` ``turns``).

    Without it every in-memory request completes one turn after it starts,
    and the races the snapshot protocol guards against never happen.  Reads
    are sometimes very slow: a snapshot read that went to the origin is then
    still in flight when the copy-out of its chunk commits.
    """
    def turns(bio: Bio) -> int:
        slow = bio.op is Op.READ and rng.random() < 0.2
        return rng.randrange(50, 150) if slow else rng.randrange(8)

    return turns


class Model:
    def __init__(self, rng: random.Random, store: str, cs: int) -> None:
        self.rng, self.store, self.cs = rng, store, cs
        self.base = DelayedDevice(SIZE, "base", turns=jitter(rng))
        self.base.buf[:] = rng.randbytes(SIZE * 512)
        self.devs: dict[str, BlockDevice] = {"base": self.base}
        self.mds: dict[str, MappedDevice] = {}
        self.want: dict[str, bytearray] = {}
        self.cow_size = 2 * SIZE + 8 * cs

    def get(self, word: str) -> BlockDevice:
        return self.devs[word]

    async def create(self, name: str, line: str) -> MappedDevice:
        md = MappedDevice(name)
        await md.load(await Table.build(name, parse_table(line), self.get, lambda d: None,
                                        types=TYPES))
        await md.resume()
        self.mds[name] = md
        return md

    async def start(self) -> None:
        await self.create("origin", f"0 {SIZE} snapshot-origin base")
        self.want["origin"] = bytearray(self.base.buf)

    async def add_snapshot(self) -> None:
        name = f"s{len(self.want)}"
        self.devs[f"cow-{name}"] = DelayedDevice(self.cow_size, f"cow-{name}",
                                                 turns=jitter(self.rng))
        origin = self.mds["origin"]
        await origin.suspend()
        await self.create(name, self._snap_line(name))
        await origin.resume()
        self.want[name] = bytearray(self.want["origin"])

    def _snap_line(self, name: str) -> str:
        return f"0 {SIZE} snapshot base cow-{name} {self.store} {self.cs}"

    async def reload(self, name: str) -> None:
        await self.mds.pop(name).close()
        await self.create(name, self._snap_line(name))

    def plan_round(self) -> list[tuple[str, str, int, int, bytes]]:
        used: dict[str, list[tuple[int, int]]] = {}
        ops = []
        for _ in range(OPS_PER_ROUND):
            name = self.rng.choice(list(self.want))
            nr = self.rng.randint(1, 3 * self.cs)
            # half of the requests go to a small hot spot, so they race on the same chunks
            hot = SIZE - nr if self.rng.random() < 0.5 else min(SIZE - nr, 4 * self.cs)
            sector = self.rng.randrange(0, hot)
            if any(s < sector + nr and sector < e for s, e in used.get(name, [])):
                continue
            used.setdefault(name, []).append((sector, sector + nr))
            kind = self.rng.choice(["read", "write", "write"])
            payload = self.rng.randbytes(nr * 512) if kind == "write" else b""
            ops.append((name, kind, sector, nr, payload))
        return ops

    async def run_round(self) -> None:
        ops = self.plan_round()
        failures: list[str] = []

        async def one(name: str, kind: str, sector: int, nr: int, payload: bytes) -> None:
            md = self.mds[name]
            if kind == "write":
                await md.write(sector, payload)
                return
            expect = bytes(self.want[name][sector * 512:(sector + nr) * 512])  # before the round
            got = bytes(await md.read(sector, nr))
            if got != expect:
                failures.append(f"{name}: read {sector}+{nr} returned wrong data")

        async with trio.open_nursery() as nursery:
            for op in ops:
                nursery.start_soon(one, *op)
        assert not failures, failures
        for name, kind, sector, nr, payload in ops:
            if kind == "write":
                self.want[name][sector * 512:(sector + nr) * 512] = payload

    async def verify_all(self) -> None:
        for name, want in self.want.items():
            got = bytes(await self.mds[name].read(0, SIZE))
            assert got == bytes(want), f"{name} differs from the model"

    async def verify_raw_copies(self) -> None:
        """Activate each persistent COW again from its raw bytes, without any clean shutdown."""
        for name in self.want:
            if name == "origin":
                continue
            origin = MemDevice(SIZE, "base2")
            origin.buf[:] = self.base.buf
            cow = MemDevice(self.cow_size, "cow2")
            cow.buf[:] = self.devs[f"cow-{name}"].buf  # type: ignore[attr-defined]
            devs = {"base2": origin, "cow2": cow}
            table = await Table.build("copy", parse_table(
                f"0 {SIZE} snapshot base2 cow2 P {self.cs}"), devs.__getitem__, lambda d: None,
                types=TYPES)
            md = MappedDevice("copy")
            await md.load(table)
            await md.resume()
            try:
                assert bytes(await md.read(0, SIZE)) == bytes(self.want[name]), name
            finally:
                await md.close()

    async def close(self) -> None:
        for md in reversed(list(self.mds.values())):
            await md.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("cs", [8, 128])
@pytest.mark.parametrize("store", ["P", "N"])
async def test_snapshots_match_model(store: str, cs: int, seed: int) -> None:
    rng = random.Random(f"{store}{cs}{seed}")
    model = Model(rng, store, cs)
    try:
        await model.start()
        await model.add_snapshot()
        for round_no in range(ROUNDS):
            await model.run_round()
            if len(model.want) <= MAX_SNAPSHOTS and rng.random() < 0.15:
                await model.add_snapshot()
            if store == "P" and rng.random() < 0.1:
                await model.reload(rng.choice([n for n in model.want if n != "origin"]))
            if round_no % 10 == 9:
                await model.verify_all()
        await model.verify_all()
        if store == "P":
            await model.verify_raw_copies()
    finally:
        await model.close()
    assert not ORIGINS
