"""Held origin writes and the deferred group commit (``targets/snapshot/held.py``).

An origin write that needs copy-outs is acknowledged once they started; its
data waits in memory until the exceptions are durable.  These tests check the
order of what reaches the devices (copy, then one PREFLUSH|FUA area write for
many exceptions, then the origin), that reads see held data, the memory bound,
every drain trigger (flush, FUA, full buffer, timer, suspend, snapshot
activation, snapshot write, invalidation), and crash images of a disk with a
volatile cache: (a) every image activates to the snapshot-time view, (b) what
was acknowledged before a completed flush is durable.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pyfuse3
import pytest
import trio
from support.data import make_image
from support.fakes import DelayedDevice, Entry, MemDevice, RecordingDevice
from support.targets import TYPES, make_manager, remove_all_checked

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.blockdev import BlockDevice
from dmuser.core.config import Config
from dmuser.core.errors import DmIOError
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.table import Table, TargetServices, parse_table
from dmuser.core.target import StatusType
from dmuser.fuse_ops import DeviceFS
from dmuser.targets.snapshot.registry import ORIGINS

SIZE = 2048  # origin sectors
KiB = 1024


class Env:
    """Mapped devices over named in-memory devices (holding on, 1 h timer)."""

    def __init__(self, **config: int) -> None:
        self.log: list[Entry] = []
        self.devs: dict[str, BlockDevice] = {}
        self.mds: dict[str, MappedDevice] = {}
        self.config = Config(**{"snapshot_hold_ms": 3600_000, **config})

    def mem(self, name: str, nr_sectors: int, seed: int | None = None) -> RecordingDevice:
        dev = RecordingDevice(nr_sectors, name, journal=self.log, seed=seed)
        self.devs[name] = dev
        return dev

    async def create(self, name: str, text: str) -> MappedDevice:
        table = await Table.build(name, parse_table(text),
                                  lambda w: self.mds.get(w) or self.devs[w], lambda d: None,
                                  TargetServices(config=self.config), types=TYPES)
        md = MappedDevice(name)
        await md.load(table)
        await md.resume()
        self.mds[name] = md
        return md

    async def snapshot(self, name: str, args: str) -> MappedDevice:
        await self.mds["origin"].suspend()
        md = await self.create(name, f"0 {SIZE} snapshot {args}")
        await self.mds["origin"].resume()
        return md

    async def close(self) -> None:
        for md in reversed(list(self.mds.values())):
            await md.close()
        self.mds.clear()
        assert not ORIGINS, "origin registry not emptied"


async def setup(env: Env) -> tuple[MappedDevice, MappedDevice]:
    env.mem("base", SIZE, seed=1)
    env.mem("cow", 1024)
    origin = await env.create("origin", f"0 {SIZE} snapshot-origin base")
    return origin, await env.snapshot("snap", "base cow P 8")


def data(byte: int, nr: int) -> bytes:
    return bytes([byte]) * (nr * 512)


def writes(env: Env) -> list[tuple[str, int, int, bool]]:
    """(device, sector, nr_sectors, PREFLUSH|FUA) of every data write since the last clear."""
    return [(e.dev, e.sector, e.nr_sectors, bool(e.flags & ReqFlag.FUA))
            for e in env.log if e.op is Op.WRITE and e.nr_sectors]


async def settle() -> None:
    for _ in range(50):
        await trio.lowlevel.checkpoint()


def held_bytes() -> int:
    return sum(o.held.bytes for o in ORIGINS.values())


async def test_first_writes_share_one_commit_and_reach_the_origin_after_it() -> None:
    env = Env()
    origin, snap = await setup(env)
    try:
        before = bytes(await snap.read(0, SIZE))
        env.log.clear()
        for chunk in (7, 3, 11):
            await origin.write(chunk * 8 + 1, data(chunk, 2))
        await settle()
        # copies done, nothing else: no metadata, no origin write
        assert sorted(writes(env)) == [("cow", 16, 8, False), ("cow", 24, 8, False),
                                       ("cow", 32, 8, False)]
        assert bytes(await origin.read(0, SIZE))[(3 * 8 + 1) * 512:(3 * 8 + 3) * 512] \
            == data(3, 2)
        assert bytes(await snap.read(0, SIZE)) == before
        assert env.devs["base"].buf[(7 * 8 + 1) * 512] != 7  # type: ignore[attr-defined]
        env.log.clear()
        await origin.flush()
        assert writes(env) == [("cow", 8, 8, True), ("base", 57, 2, False),
                               ("base", 25, 2, False), ("base", 89, 2, False)]
        assert [e.kind for e in env.log][-1] == "flush"
        assert bytes(await snap.read(0, SIZE)) == before
        assert held_bytes() == 0
    finally:
        await env.close()


async def test_reads_see_held_writes_in_order() -> None:
    env = Env()
    origin, snap = await setup(env)
    try:
        await origin.write(8, data(1, 8))
        await origin.write(10, data(2, 2))        # overlaps a held write: held behind it
        await origin.write(100 * 8, data(3, 1))   # another chunk
        got = bytes(await origin.read(8, 8))
        assert got == data(1, 2) + data(2, 2) + data(1, 4)
        await origin.flush()
        assert bytes(env.devs["base"].buf[8 * 512:16 * 512]) == got  # type: ignore[attr-defined]
    finally:
        await env.close()


async def test_memory_bound_drains_before_holding_more() -> None:
    env = Env(snapshot_hold_bytes=8 * KiB)
    origin, snap = await setup(env)
    try:
        peak = 0
        for chunk in range(10):
            await origin.write(chunk * 8, data(chunk + 1, 8))   # 4 KiB each
            peak = max(peak, held_bytes())
        assert peak == 8 * KiB
        assert sum(1 for w in writes(env) if w[3]) == 4   # a drain (one commit) per 2 writes
        big = data(9, 40)                               # > the bound: the kernel's way
        env.log.clear()
        await origin.write(400, big)
        assert ("base", 400, 40, False) in writes(env)
    finally:
        await env.close()


async def test_fua_write_and_snapshot_write_commit_now() -> None:
    env = Env()
    origin, snap = await setup(env)
    try:
        await origin.write(0, data(1, 1))
        env.log.clear()
        await origin.submit(Bio.write(64, bytearray(data(2, 1)), ReqFlag.FUA))
        w = writes(env)
        assert ("cow", 8, 8, True) in w and w[-1] == ("base", 64, 1, True)
        env.log.clear()
        await origin.write(200, data(3, 1))              # held again
        await snap.write(300, data(4, 1))               # a snapshot write waits for its commit
        assert any(d == "cow" and fua for d, _, _, fua in writes(env))
        assert bytes(await snap.read(300, 1)) == data(4, 1)
    finally:
        await env.close()


async def test_timer_drains_without_a_flush() -> None:
    env = Env(snapshot_hold_ms=20)
    origin, snap = await setup(env)
    try:
        await origin.write(8, data(5, 1))
        with trio.fail_after(5):
            while env.devs["base"].buf[8 * 512] != 5:  # type: ignore[attr-defined]
                await trio.sleep(0.005)
        assert held_bytes() == 0
    finally:
        await env.close()


async def test_suspend_and_new_snapshot_see_held_writes() -> None:
    env = Env()
    origin, snap = await setup(env)
    try:
        await origin.write(16, data(6, 8))
        env.mem("cow2", 1024)
        snap2 = await env.snapshot("snap2", "base cow2 P 8")  # suspends the origin: drained
        assert bytes(env.devs["base"].buf[16 * 512:24 * 512]) == data(6, 8)  # type: ignore[attr-defined]
        assert bytes(await snap2.read(16, 8)) == data(6, 8)
        assert bytes(await snap.read(16, 8)) != data(6, 8)
    finally:
        await env.close()


async def test_invalidation_releases_held_writes() -> None:
    env = Env()
    env.mem("base", SIZE, seed=1)
    env.mem("cow", 48)                      # header, area, 4 chunks
    origin = await env.create("origin", f"0 {SIZE} snapshot-origin base")
    snap = await env.snapshot("snap", "base cow P 8")
    try:
        for chunk in range(6):                 # the 5th needs a chunk the COW lacks
            await origin.write(chunk * 8, data(chunk + 1, 8))
        await origin.flush()
        for chunk in range(6):
            assert bytes(await origin.read(chunk * 8, 8)) == data(chunk + 1, 8)
            assert env.devs["base"].buf[chunk * 8 * 512] == chunk + 1  # type: ignore[attr-defined]
        with pytest.raises(DmIOError):
            await snap.read(0, 8)
        # the header saying invalid is durable (FUA) before any released write reaches
        # the origin: a crash cannot leave them under a header that still says valid
        w = writes(env)
        header = w.index(("cow", 0, 8, True))
        assert header < min(i for i, e in enumerate(w) if e[0] == "base")
    finally:
        await env.close()


async def test_snapshot_removal_with_held_writes() -> None:
    env = Env()
    origin, snap = await setup(env)
    with trio.fail_after(20):  # a held record left behind would never be done: no hang
        try:
            await origin.write(8, data(7, 8))
            await origin.write(24, data(8, 8))
            await env.mds.pop("snap").close()        # commits what it holds, then goes
            assert len(next(iter(ORIGINS.values())).snapshots) == 0
            await origin.flush()
            base = env.devs["base"].buf  # type: ignore[attr-defined]
            assert bytes(base[8 * 512:16 * 512]) == data(7, 8)
            assert bytes(base[24 * 512:32 * 512]) == data(8, 8)
        finally:
            await env.close()


async def test_merge_handover_with_held_writes() -> None:
    """lvconvert --merge while origin writes are held: the origin's suspend drains them
    (after their commits), and the merge restores the snapshot's view."""
    env = Env()
    origin, snap = await setup(env)
    try:
        want = bytes(await snap.read(0, SIZE))
        for chunk in (5, 2, 9):
            await origin.write(chunk * 8, data(chunk, 8))
        await snap.suspend()
        await origin.suspend()
        assert not next(iter(ORIGINS.values())).held
        table = await Table.build("origin", parse_table(f"0 {SIZE} snapshot-merge base cow P 8"),
                                  lambda w: env.devs[w], lambda d: None,
                                  TargetServices(config=env.config), types=TYPES)
        await origin.load(table)
        await origin.resume()
        with trio.fail_after(10):
            while origin.table_lines(StatusType.INFO)[0].split(" ", 3)[3] != "16/1024 16":
                await trio.sleep(0.005)
        assert bytes(env.devs["base"].buf) == want  # type: ignore[attr-defined]
        await env.mds.pop("snap").close()
    finally:
        await env.close()


async def test_failed_held_write_fails_the_next_flush() -> None:
    env = Env()
    origin, snap = await setup(env)
    try:
        await origin.write(8, data(1, 1))
        env.devs["base"].fail_write = True  # type: ignore[attr-defined]
        with pytest.raises(DmIOError):
            await origin.flush()
        env.devs["base"].fail_write = False  # type: ignore[attr-defined]
        await origin.flush()                 # reported once
    finally:
        await env.close()


async def test_fuse_reads_and_direct_path_see_held_writes(tmp_path: Path) -> None:
    """Through DeviceFS on image files: the direct path must not bypass held data."""
    mgr = make_manager(config=Config(snapshot_hold_ms=3600_000))
    fs = DeviceFS(mgr)
    before = make_image(tmp_path / "base.img", 64 * 512, seed=9)
    make_image(tmp_path / "cow.img", 64 * 512)
    await mgr.create("snap", "0 64 snapshot base.img cow.img P 8", str(tmp_path))
    await mgr.create("o", "0 64 snapshot-origin base.img", str(tmp_path))
    fhs = []
    try:
        for name in (b"o", b"snap"):
            inode = (await fs.lookup(pyfuse3.ROOT_INODE, name, None)).st_ino
            fhs.append((await fs.open(inode, os.O_RDWR, None)).fh)
        new = os.urandom(1024)
        await fs.write(fhs[0], 9 * 512, new)                 # chunk 1: held
        assert (tmp_path / "base.img").read_bytes()[9 * 512:11 * 512] == before[9 * 512:11 * 512]
        assert await fs.read(fhs[0], 8 * 512, 4 * 512) == \
            before[8 * 512:9 * 512] + new + before[11 * 512:12 * 512]
        await fs.write(fhs[0], 10 * 512, new[:512])          # overlaps: held behind it
        assert await fs.read(fhs[0], 9 * 512, 2 * 512) == new[:512] * 2
        assert await fs.read(fhs[1], 8 * 512, 8 * 512) == before[8 * 512:16 * 512]
        await fs.fsync(fhs[0], True)
        assert (tmp_path / "base.img").read_bytes()[9 * 512:11 * 512] == new[:512] * 2
    finally:
        for fh in fhs:
            await fs.release(fh)
        await remove_all_checked(mgr)
    assert not ORIGINS


# -- crash images ----------------------------------------------------------------------------


class CacheDevice(DelayedDevice):
    """A disk with a volatile write cache (as in test_snapshot.py): ``durable`` is
    what survives a crash; writes reach it at random, PREFLUSH and FUA force it."""

    def __init__(self, nr_sectors: int, name: str, rng: random.Random) -> None:
        super().__init__(nr_sectors, name, rng=rng, turns=lambda bio: rng.randrange(6))
        self.durable = bytearray(self.buf)

    async def submit(self, bio: Bio) -> None:
        if bio.flags & ReqFlag.PREFLUSH:
            self.durable[:] = self.buf
        await super().submit(bio)
        if bio.op is Op.WRITE and bio.nr_sectors and (
                bio.flags & ReqFlag.FUA or self.rng.random() < 0.3):
            start, end = bio.sector * 512, bio.end_sector * 512
            self.durable[start:end] = self.buf[start:end]


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_crash_images(seed: int) -> None:
    """(a) every durable image activates to the snapshot-time view; (b) each writer's
    writes acknowledged before its flush are durable when the flush returns."""
    rng = random.Random(seed)
    env = Env(snapshot_hold_bytes=16 * KiB, snapshot_hold_ms=5)
    base = CacheDevice(SIZE, "cbase", rng)
    base.buf[:] = base.durable[:] = rng.randbytes(SIZE * 512)
    cow = CacheDevice(2 * SIZE, "ccow", rng)
    env.devs["cbase"], env.devs["ccow"] = base, cow
    view = bytes(base.buf)
    origin = await env.create("origin", f"0 {SIZE} snapshot-origin cbase")
    await env.snapshot("snap", "cbase ccow P 8")
    crashes: list[tuple[bytes, bytes]] = []
    flushes = 0
    done = False

    async def writer(n: int) -> None:  # writer n owns sectors [n*512, n*512+512)
        nonlocal flushes
        acked: dict[int, bytes] = {}
        for i in range(40):
            nr = rng.randint(1, 12)
            sector = n * 512 + rng.randrange(512 - nr)
            buf = rng.randbytes(nr * 512)
            await origin.write(sector, buf)
            for k in range(nr):
                acked[sector + k] = buf[k * 512:(k + 1) * 512]
            if rng.random() < 0.2:
                await origin.flush()
                flushes += 1
                for s, b in acked.items():
                    assert base.durable[s * 512:(s + 1) * 512] == b, (n, i, s)

    async def crasher() -> None:
        while not done:
            for _ in range(rng.randrange(20)):
                await trio.lowlevel.checkpoint()
            crashes.append((bytes(base.durable), bytes(cow.durable)))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(crasher)
            async with trio.open_nursery() as writers:
                for n in range(4):
                    writers.start_soon(writer, n)
            done = True
    finally:
        await env.close()
    assert len(crashes) > 10 and flushes > 5
    for i, (origin_bytes, cow_bytes) in enumerate(crashes[:: max(1, len(crashes) // 15)]):
        o, c = MemDevice(SIZE, "o"), MemDevice(2 * SIZE, "c")
        o.buf[:], c.buf[:] = origin_bytes, cow_bytes
        md = MappedDevice(f"crash{i}")
        await md.load(await Table.build(md.name, parse_table(f"0 {SIZE} snapshot o c P 8"),
                                        {"o": o, "c": c}.__getitem__, lambda d: None,
                                        types=TYPES))
        await md.resume()
        try:
            assert bytes(await md.read(0, SIZE)) == view, f"crash image {i}"
        finally:
            await md.close()
