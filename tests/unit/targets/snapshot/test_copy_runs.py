"""Batched copy-out (``snap.start_copies``): one kcopyd job per run of chunks.

An origin write spanning several chunks that need copies gets consecutive COW
chunks (allocation order unchanged); each run of consecutive origin and COW
chunks is copied as one job (one read, one write), never across a metadata
area, and its exceptions commit in sequence order through the same commit
path.  A failing run invalidates the snapshot as a failing per-chunk copy does.
A snapshot write covering fresh chunks whole is one COW write per run.
"""

from __future__ import annotations

import struct

import trio
from support.fakes import Entry, RecordingDevice
from support.targets import TYPES

from dmuser.core.bio import Op, ReqFlag
from dmuser.core.blockdev import BlockDevice
from dmuser.core.config import Config
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.table import Table, TargetServices, parse_table
from dmuser.core.target import StatusType
from dmuser.targets.snapshot.registry import ORIGINS

SIZE = 4096  # origin sectors: 512 chunks of 4 KiB
CHUNK = 8
PER_AREA = 256  # records per 4 KiB area


class Env:
    """An origin with one P snapshot (4 KiB chunks) over recording in-memory devices."""

    def __init__(self, hold_bytes: int) -> None:
        self.log: list[Entry] = []
        self.base = RecordingDevice(SIZE, "base", journal=self.log, seed=3)
        self.cow = RecordingDevice(SIZE, "cow", journal=self.log)
        self.devs: dict[str, BlockDevice] = {"base": self.base, "cow": self.cow}
        self.mds: list[MappedDevice] = []
        self.config = Config(snapshot_hold_bytes=hold_bytes, snapshot_hold_ms=3600_000)

    async def create(self, name: str, text: str) -> MappedDevice:
        table = await Table.build(name, parse_table(text), self.devs.__getitem__,
                                  lambda d: None, TargetServices(config=self.config), types=TYPES)
        md = MappedDevice(name)
        await md.load(table)
        await md.resume()
        self.mds.append(md)
        return md

    async def start(self) -> tuple[MappedDevice, MappedDevice]:
        origin = await self.create("origin", f"0 {SIZE} snapshot-origin base")
        await origin.suspend()
        snap = await self.create("snap", f"0 {SIZE} snapshot base cow P {CHUNK}")
        await origin.resume()
        return origin, snap

    def copies(self) -> list[tuple[str, int, int]]:
        """(device, sector, nr_sectors) of every plain data write to the COW and read of base."""
        return [(e.dev, e.sector, e.nr_sectors) for e in self.log
                if e.nr_sectors and not e.flags & ReqFlag.FUA
                and (e.op, e.dev) in ((Op.WRITE, "cow"), (Op.READ, "base"))]

    def records(self, area_chunk: int, n: int) -> list[tuple[int, int]]:
        area = bytes(self.cow.buf[area_chunk * 4096:area_chunk * 4096 + 16 * n])
        return [struct.unpack_from("<QQ", area, 16 * i) for i in range(n)]

    async def close(self) -> None:
        for md in reversed(self.mds):
            await md.close()
        assert not ORIGINS, "origin registry not emptied"


def data(byte: int, nr: int) -> bytes:
    return bytes([byte]) * (nr * 512)


async def test_a_multi_chunk_write_is_one_copy() -> None:
    """Five chunks: one read of the origin, one write of five COW chunks, five
    records in sequence order; the snapshot keeps the old data (held path)."""
    env = Env(hold_bytes=1 << 20)
    origin, snap = await env.start()
    try:
        before = bytes(await snap.read(0, SIZE))
        env.log.clear()
        await origin.write(3 * CHUNK + 5, data(7, 4 * CHUNK))  # chunks 3..7
        await origin.flush()
        assert env.copies() == [("base", 3 * CHUNK, 5 * CHUNK), ("cow", 2 * CHUNK, 5 * CHUNK)]
        assert env.records(1, 6) == [(3 + i, 2 + i) for i in range(5)] + [(0, 0)]
        assert bytes(await snap.read(0, SIZE)) == before
        assert bytes(await origin.read(3 * CHUNK + 5, 4 * CHUNK)) == data(7, 4 * CHUNK)
    finally:
        await env.close()


async def test_a_run_never_crosses_a_metadata_area_and_commits_in_order() -> None:
    """Chunks whose COW chunks straddle area 1 (chunk 258) are copied as two jobs.
    The second job is let finish first: the records still land in sequence
    order (area 0 full, then area 1), as the kernel's COW bytes."""
    env = Env(hold_bytes=0)  # the kernel's path: every write waits for its commits
    origin, snap = await env.start()
    try:
        before = bytes(await snap.read(0, SIZE))
        await origin.write(0, data(1, 254 * CHUNK))  # chunks 0..253 -> COW 2..255
        env.log.clear()
        first_read = 254 * CHUNK
        gate = env.base.read_gates[first_read] = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(origin.write, first_read, data(2, 6 * CHUNK))  # chunks 254..259
            try:
                with trio.fail_after(5):
                    while ("cow", 259 * CHUNK, 4 * CHUNK) not in env.copies():
                        await trio.sleep(0.001)
            finally:
                gate.set()
        copies = env.copies()  # the jobs' reads may start in either order
        assert sorted(copies[:2]) == [("base", 254 * CHUNK, 2 * CHUNK),
                                      ("base", 256 * CHUNK, 4 * CHUNK)]
        assert copies[2:] == [("cow", 259 * CHUNK, 4 * CHUNK), ("cow", 256 * CHUNK, 2 * CHUNK),
                              ("cow", 258 * CHUNK, CHUNK)]  # area 1 zeroed at the 256th commit
        assert env.records(1, PER_AREA) == [(i, 2 + i) for i in range(PER_AREA)]
        assert env.records(258, 5) == [(256, 259), (257, 260), (258, 261), (259, 262), (0, 0)]
        assert bytes(await snap.read(0, SIZE)) == before
    finally:
        await env.close()


async def test_a_failed_run_invalidates_the_snapshot() -> None:
    """A failed read of a run's source fails the whole run: the snapshot is
    invalid (header written with valid = 0), no record of the run is on disk,
    and the origin write still completes, as with one failed per-chunk copy."""
    env = Env(hold_bytes=0)
    origin, snap = await env.start()
    try:
        env.base.fail_read = True
        await origin.write(3 * CHUNK, data(4, 5 * CHUNK))  # chunks 3..7: one failed read
        env.base.fail_read = False
        assert snap.table_lines(StatusType.INFO)[0].endswith(" Invalid")
        assert struct.unpack_from("<4I", env.cow.buf) == (0x70416E53, 0, 1, CHUNK)  # valid = 0
        assert env.records(1, 1) == [(0, 0)]
        assert bytes(env.base.buf[3 * CHUNK * 512:8 * CHUNK * 512]) == data(4, 5 * CHUNK)
    finally:
        await env.close()


async def test_a_snapshot_write_is_one_cow_write_per_run_of_whole_chunks() -> None:
    """Whole fresh chunks of a snapshot write are their own copy: one COW write per
    run.  A chunk that already has an exception splits the run even where the
    COW chunks happen to be consecutive; a partial chunk is copied first."""
    env = Env(hold_bytes=1 << 20)
    origin, snap = await env.start()
    try:
        before = bytes(await origin.read(0, SIZE))
        await snap.write(5 * CHUNK, data(5, CHUNK))  # chunk 5 -> COW 2
        env.log.clear()
        await snap.write(3 * CHUNK + 4, data(9, 5 * CHUNK - 4))  # chunks 3 (part) .. 7
        cow_writes = sorted((e.sector, e.nr_sectors) for e in env.log
                            if e.op is Op.WRITE and e.dev == "cow" and not e.flags & ReqFlag.FUA)
        assert cow_writes == [(2 * CHUNK, CHUNK),        # chunk 5: its COW chunk
                              (3 * CHUNK, CHUNK),        # chunk 3: copy-out
                              (3 * CHUNK + 4, 4),        # chunk 3: the write's part
                              (4 * CHUNK, CHUNK),        # chunk 4: a run of one
                              (5 * CHUNK, 2 * CHUNK)]    # chunks 6, 7: one write
        assert [(e.sector, e.nr_sectors) for e in env.log if e.dev == "base"] == \
            [(3 * CHUNK, CHUNK)]
        assert env.records(1, 6) == [(5, 2), (3, 3), (4, 4), (6, 5), (7, 6), (0, 0)]
        expect = bytearray(before)
        expect[3 * CHUNK * 512 + 2048:8 * CHUNK * 512] = data(9, 5 * CHUNK - 4)
        assert bytes(await snap.read(0, SIZE)) == bytes(expect)
        assert bytes(await origin.read(0, SIZE)) == before
    finally:
        await env.close()
