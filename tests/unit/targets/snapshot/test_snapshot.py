"""snapshot, snapshot-origin and snapshot-merge on in-memory devices.

Covers constructor errors and status strings, the copy-out protocol (commit
ordering, tracked reads, full-chunk writes, group commit), overflow and
invalidation, several snapshots per origin, handover and merge.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

import pytest
import trio
import trio.testing
from support.fakes import DelayedDevice, Entry, MemDevice, RecordingDevice
from support.targets import TYPES

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.blockdev import BlockDevice
from dmuser.core.config import Config
from dmuser.core.errors import DmError, DmIOError, TableError
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.table import Table, TargetServices, parse_table
from dmuser.core.target import StatusType
from dmuser.targets.snapshot.registry import ORIGINS

SIZE = 2048  # origin sectors


class Env:
    """Mapped devices over named in-memory devices, built without a manager."""

    def __init__(self) -> None:
        self.log: list[Entry] = []  # every bio of every device, in order
        self.devs: dict[str, BlockDevice] = {}
        self.mds: dict[str, MappedDevice] = {}
        # the kernel's protocol: every origin write waits for its commits
        # (held origin writes: test_held.py)
        self.config = Config(snapshot_hold_bytes=0)

    def mem(self, name: str, nr_sectors: int, seed: int | None = None) -> RecordingDevice:
        dev = RecordingDevice(nr_sectors, name, journal=self.log, seed=seed)
        self.devs[name] = dev
        return dev

    def get_device(self, word: str) -> BlockDevice:
        return self.mds.get(word) or self.devs[word]

    async def table(self, name: str, text: str) -> Table:
        return await Table.build(name, parse_table(text), self.get_device, lambda d: None,
                                 TargetServices(config=self.config), types=TYPES)

    async def create(self, name: str, text: str) -> MappedDevice:
        md = MappedDevice(name)
        await md.load(await self.table(name, text))
        await md.resume()
        self.mds[name] = md
        return md

    async def reload(self, name: str, text: str) -> None:
        await self.mds[name].load(await self.table(name, text))

    async def snapshot(self, name: str, args: str, origin_md: str = "origin") -> MappedDevice:
        """Create a snapshot the LVM way: origin suspended around it."""
        await self.mds[origin_md].suspend()
        md = await self.create(name, f"0 {SIZE} snapshot {args}")
        await self.mds[origin_md].resume()
        return md

    def status(self, name: str, kind: StatusType = StatusType.INFO) -> str:
        return self.mds[name].table_lines(kind)[0].split(" ", 3)[3]

    async def close(self) -> None:
        for md in reversed(list(self.mds.values())):
            await md.close()
        self.mds.clear()


@pytest.fixture
async def env() -> Env:  # type: ignore[misc]
    e = Env()
    e.mem("base", SIZE, seed=1)
    e.mem("cow", 1024)
    e.mem("cow2", 1024)
    yield e
    await e.close()
    assert not ORIGINS, "origin registry not emptied"


async def origin_env(env: Env, snap_args: str = "base cow P 8",
                     ) -> tuple[MappedDevice, MappedDevice]:
    origin = await env.create("origin", f"0 {SIZE} snapshot-origin base")
    snap = await env.snapshot("snap", snap_args)
    return origin, snap


def where(e: Entry) -> tuple[str, int, int]:
    """(device, sector, nr_sectors) of a journal entry."""
    return e.dev, e.sector, e.nr_sectors


def data(byte: int, nr: int) -> bytes:
    return bytes([byte]) * (nr * 512)


async def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.001)


# -- constructor, status -------------------------------------------------------------------


@pytest.mark.parametrize("args,error", [
    ("base cow P", "requires 4 or more arguments"),
    ("base cow P 8 3 a b c", "Invalid number of feature arguments"),
    ("base cow P 8 2 discard_zeroes_cow", "Invalid number of feature arguments"),
    ("base cow P 8 x", "Invalid number of feature arguments"),
    ("base cow P 8 1 frob", "Unrecognised feature requested"),
    ("base cow P 8 1 discard_passdown_origin",
     "discard_passdown_origin feature depends on discard_zeroes_cow"),
    ("nope cow P 8", "Cannot get origin device"),
    ("base nope P 8", "Cannot get COW device"),
    ("base base P 8", "COW device cannot be the same as origin device"),
    ("base cow X 8", "Couldn't create exception store"),
    ("base cow P 12", "Couldn't create exception store"),
    ("base cow Px 8", "Couldn't create exception store"),
    ("base cow N 0", "Chunk size not set"),
])
async def test_snapshot_ctr_errors(env: Env, args: str, error: str) -> None:
    with pytest.raises(TableError) as info:
        await env.create("snap", f"0 {SIZE} snapshot {args}")
    assert info.value.message == f"snap: snapshot: {error}"
    assert not ORIGINS


async def test_metadata_errors(env: Env) -> None:
    env.devs["cow"].buf[:4] = b"JUNK"  # type: ignore[attr-defined]
    with pytest.raises(TableError, match="snap: snapshot: Failed to read snapshot metadata"):
        await env.create("snap", f"0 {SIZE} snapshot base cow P 8")
    with pytest.raises(TableError, match="origin: incorrect number of arguments"):
        await env.create("o", f"0 {SIZE} snapshot-origin base cow")
    with pytest.raises(TableError, match="Cannot get target device"):
        await env.create("o", f"0 {SIZE} snapshot-origin nope")


@pytest.mark.parametrize("args,table,status", [
    ("base cow P 8", "base cow P 8", "16/1024 16"),
    ("base cow p 16", "base cow P 16", "32/1024 32"),
    ("base cow POxyz 8", "base cow PO 8", "16/1024 16"),
    ("base cow P 0", "base cow P 32", "64/1024 64"),
    ("base cow Nfoo 16", "base cow N 16", "0/1024 0"),
    ("base cow P 8 1 discard_zeroes_cow", "base cow P 8 1 discard_zeroes_cow", "16/1024 16"),
    ("base cow PO 8 2 DISCARD_PASSDOWN_ORIGIN discard_zeroes_cow",
     "base cow PO 8 2 discard_zeroes_cow discard_passdown_origin", "16/1024 16"),
])
async def test_status_and_table(env: Env, args: str, table: str, status: str) -> None:
    await env.create("snap", f"0 {SIZE} snapshot {args}")
    assert env.status("snap", StatusType.TABLE) == table
    assert env.status("snap") == status
    await env.mds.pop("snap").close()
    # TABLE output loads again and means the same thing
    await env.create("snap", f"0 {SIZE} snapshot {table}")
    assert env.status("snap", StatusType.TABLE) == table


async def test_origin_status(env: Env) -> None:
    await env.create("origin", f"0 {SIZE} snapshot-origin base")
    assert env.mds["origin"].table_lines(StatusType.TABLE) == [f"0 {SIZE} snapshot-origin base"]
    assert env.mds["origin"].table_lines(StatusType.INFO) == [f"0 {SIZE} snapshot-origin "]


# -- copy-out --------------------------------------------------------------------------------


async def test_origin_write_copies_out_then_commits_then_writes(env: Env) -> None:
    origin, snap = await origin_env(env)
    before = bytes(await snap.read(0, SIZE))
    env.log.clear()
    await origin.write(3, data(0xAB, 2))
    writes = [e for e in env.log if e.op is Op.WRITE]
    assert [where(w) for w in writes] == [("cow", 16, 8), ("cow", 8, 8), ("base", 3, 2)]
    assert writes[1].flags & ReqFlag.PREFLUSH and writes[1].flags & ReqFlag.FUA
    assert bytes(await snap.read(0, SIZE)) == before
    assert bytes(await origin.read(3, 2)) == data(0xAB, 2)
    assert env.status("snap") == "24/1024 16"


async def test_multi_chunk_origin_write_allocates_in_sector_order(env: Env) -> None:
    origin, snap = await origin_env(env)
    before = bytes(await snap.read(0, SIZE))
    await origin.write(5, data(1, 30))   # chunks 0..4
    area = bytes(env.devs["cow"].buf[4096:4096 + 80])  # type: ignore[attr-defined]
    assert [struct.unpack_from("<QQ", area, 16 * i) for i in range(5)] == \
        [(i, i + 2) for i in range(5)]
    assert bytes(await snap.read(0, SIZE)) == before


async def test_snapshot_read_holds_origin_write(env: Env) -> None:
    origin, snap = await origin_env(env)
    base = env.devs["base"]
    old = bytes(base.buf[0:4096])  # type: ignore[attr-defined]
    gate = trio.Event()
    base.read_gates[0] = gate  # type: ignore[attr-defined]
    got: list[bytes] = []
    done: list[str] = []

    async def snap_read() -> None:
        got.append(bytes(await snap.read(0, 8)))
        done.append("read")

    async def origin_write() -> None:
        await origin.write(0, data(0xEE, 8))
        done.append("write")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(snap_read)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(origin_write)
        await trio.testing.wait_all_tasks_blocked()
        # copy-out committed, but the origin write waits for the tracked read
        assert done == [] and bytes(base.buf[0:4096]) == old  # type: ignore[attr-defined]
        assert env.status("snap") == "24/1024 16"
        gate.set()
    assert done == ["read", "write"] and got == [old]
    assert bytes(await snap.read(0, 8)) == old


async def test_snapshot_writes(env: Env) -> None:
    origin, snap = await origin_env(env)
    base = env.devs["base"]
    before = bytes(base.buf)  # type: ignore[attr-defined]
    reads = base.reads  # type: ignore[attr-defined]
    await snap.write(8, data(7, 8))                     # whole chunk: no copy
    assert base.reads == reads  # type: ignore[attr-defined]
    await snap.write(19, data(9, 2))                    # partial: copy then write
    assert base.reads == reads + 1  # type: ignore[attr-defined]
    await snap.write(20, data(10, 1))                   # already remapped
    expect = bytearray(before)
    expect[8 * 512:16 * 512] = data(7, 8)
    expect[19 * 512:21 * 512] = data(9, 1) + data(10, 1)
    assert bytes(await snap.read(0, SIZE)) == bytes(expect)
    assert bytes(base.buf) == before  # type: ignore[attr-defined]
    assert bytes(await origin.read(0, SIZE)) == before
    assert env.status("snap") == "32/1024 16"


async def test_group_commit(env: Env) -> None:
    origin, snap = await origin_env(env)
    env.log.clear()
    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(origin.write, i * 8 + 1, data(i, 1))
    area_writes = [e for e in env.log if e.op is Op.WRITE and e.dev == "cow" and e.sector == 8]
    assert 1 <= len(area_writes) < 20
    assert env.status("snap") == f"{(2 + 20) * 8}/1024 16"


async def test_several_snapshots_per_origin(env: Env) -> None:
    origin = await env.create("origin", f"0 {SIZE} snapshot-origin base")
    before = bytes(await origin.read(0, SIZE))
    s1 = await env.snapshot("s1", "base cow P 8")
    await origin.write(0, data(1, 16))
    mid = bytes(await origin.read(0, SIZE))
    s2 = await env.snapshot("s2", "base cow2 N 32")
    await origin.write(8, data(2, 40))
    assert bytes(await s1.read(0, SIZE)) == before
    assert bytes(await s2.read(0, SIZE)) == mid
    assert env.status("s1") == f"{(2 + 6) * 8}/1024 16"      # chunks 0..5
    assert env.status("s2") == "64/1024 0"                   # chunks 0 and 1 of 32


async def test_throttle(env: Env) -> None:
    env.config = Config(snapshot_cow_threshold=1, snapshot_hold_bytes=0)
    origin, snap = await origin_env(env)
    before = bytes(await snap.read(0, SIZE))
    target = snap.live.targets[0].snap  # type: ignore[union-attr,attr-defined]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, target.in_progress)  # type: ignore[attr-defined]
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        async with trio.open_nursery() as writers:
            for i in range(30):
                writers.start_soon(origin.write, i * 8, data(i, 8))
                writers.start_soon(snap.write, 1000 + i * 8, data(i, 3))
        nursery.cancel_scope.cancel()
    assert 1 <= peak <= 2  # checked and started without a checkpoint in between
    assert bytes(await snap.read(0, 240)) == before[:240 * 512]


async def test_inactive_snapshot_is_ignored(env: Env) -> None:
    origin = await env.create("origin", f"0 {SIZE} snapshot-origin base")
    snap = MappedDevice("snap")
    await snap.load(await env.table("snap", f"0 {SIZE} snapshot base cow P 8"))
    env.mds["snap"] = snap
    await origin.write(0, data(3, 8))
    await snap.resume()
    assert env.status("snap") == "16/1024 16"


async def test_overflow_invalidates(env: Env) -> None:
    env.mem("small", 5 * 8)  # header, area, 3 data chunks
    origin, snap = await origin_env(env, "base small P 8")
    for i in range(3):
        await origin.write(i * 8, data(i, 1))
    assert env.status("snap") == "40/40 16"
    await origin.write(100, data(9, 1))                  # the origin write itself succeeds
    assert env.status("snap") == "Invalid"
    with pytest.raises(DmIOError):
        await snap.read(0, 8)
    await trio.testing.wait_all_tasks_blocked()
    assert struct.unpack_from("<IIII", env.devs["small"].buf) == (0x70416E53, 0, 1, 8)  # type: ignore[attr-defined]
    await snap.flush()  # flushes still pass


async def test_overflow_po(env: Env) -> None:
    env.mem("small", 3 * 8)  # header, area, 1 data chunk
    origin, snap = await origin_env(env, "base small PO 8")
    await snap.write(0, data(1, 8))
    with pytest.raises(DmIOError):
        await snap.write(8, data(2, 8))
    assert env.status("snap") == "Overflow"
    assert bytes(await snap.read(0, 8)) == data(1, 8)     # reads still work
    with pytest.raises(DmIOError):
        await snap.write(0, data(3, 8))                   # all writes fail
    await origin.write(100, data(9, 1))                   # an origin write never overflows
    assert env.status("snap") == "Invalid"


async def test_copy_error_invalidates(env: Env) -> None:
    origin, snap = await origin_env(env)
    env.devs["cow"].fail_sectors.add(16)  # type: ignore[attr-defined]
    with pytest.raises(DmIOError):
        await snap.write(1, data(1, 1))
    assert env.status("snap") == "Invalid"
    await origin.write(100, data(1, 1))  # origin I/O goes on


async def test_persistent_reload(env: Env) -> None:
    origin, snap = await origin_env(env)
    before = bytes(await snap.read(0, SIZE))
    await origin.write(0, data(1, 100))
    await snap.write(500, data(2, 20))
    view = bytes(await snap.read(0, SIZE))
    assert view[:100 * 512] == before[:100 * 512]
    status = env.status("snap")
    await env.mds.pop("snap").close()
    snap = await env.snapshot("snap", "base cow P 8")
    assert bytes(await snap.read(0, SIZE)) == view and env.status("snap") == status


async def test_transient_snapshot(env: Env) -> None:
    origin, snap = await origin_env(env, "base cow N 16")
    before = bytes(await snap.read(0, SIZE))
    await origin.write(0, data(1, 20))
    await snap.write(100, data(2, 1))
    assert env.status("snap") == "48/1024 0"
    expect = bytearray(before)
    expect[100 * 512:101 * 512] = data(2, 1)
    assert bytes(await snap.read(0, SIZE)) == bytes(expect)
    assert bytes(env.devs["cow"].buf[:512]) == before[:512]  # type: ignore[attr-defined]


async def test_discard_zeroes_cow(env: Env) -> None:
    origin, snap = await origin_env(env, "base cow P 8 1 discard_zeroes_cow")
    await snap.write(8, data(5, 8))
    await snap.submit(Bio(Op.DISCARD, 8, 8))
    assert bytes(await snap.read(8, 8)) == bytes(4096)
    await snap.submit(Bio(Op.DISCARD, 16, 8))             # no exception: nothing happens
    assert bytes(await snap.read(16, 8)) == bytes(env.devs["base"].buf[16 * 512:24 * 512])  # type: ignore[attr-defined]


# -- handover and merge ----------------------------------------------------------------------


async def test_merge_lvm_flow(env: Env) -> None:
    """lvconvert --merge: the origin device gets a snapshot-merge table."""
    origin, snap = await origin_env(env)
    for chunk in (5, 6, 7, 2, 3, 9):
        await origin.write(chunk * 8, data(chunk, 8))
    await snap.write(300, data(0x55, 3))
    want = bytes(await snap.read(0, SIZE))
    env.log.clear()
    await env.reload("origin", f"0 {SIZE} snapshot-merge base cow P 8")
    await snap.suspend()
    await origin.resume()
    await wait_for(lambda: env.status("origin") == "16/1024 16")
    assert env.status("snap") == "Invalid"
    merged = [(e.sector, e.nr_sectors) for e in env.log
              if e.op is Op.WRITE and e.dev == "base" and e.nr_sectors]
    assert merged == [(296, 8), (72, 8), (16, 16), (40, 24)]     # newest run first
    assert bytes(await origin.read(0, SIZE)) == want
    assert bytes(env.devs["base"].buf) == want  # type: ignore[attr-defined]
    await env.mds.pop("snap").close()


async def test_merge_by_reloading_the_snapshot(env: Env) -> None:
    origin, snap = await origin_env(env)
    await snap.write(40, data(1, 30))
    want = bytes(await snap.read(0, SIZE))
    await env.reload("snap", f"0 {SIZE} snapshot-merge base cow P 8")
    await snap.resume()
    await wait_for(lambda: env.status("snap") == "16/1024 16")
    assert bytes(env.devs["base"].buf) == want  # type: ignore[attr-defined]
    assert bytes(await snap.read(0, SIZE)) == want
    await snap.write(0, data(2, 1))                        # behaves like an origin now


async def test_merge_io_while_merging(env: Env) -> None:
    origin, snap = await origin_env(env)
    for chunk in range(0, 40, 2):
        await snap.write(chunk * 8, data(chunk, 8))
    await env.mds.pop("snap").close()
    await env.mds.pop("origin").close()
    merge = await env.create("m", f"0 {SIZE} snapshot-merge base cow P 8")  # after a "reboot"
    await merge.write(0, data(0xA1, 1))
    await merge.write(8, data(0xA2, 1))
    await wait_for(lambda: env.status("m") == "16/1024 16")
    base = env.devs["base"].buf  # type: ignore[attr-defined]
    assert bytes(base[:512]) == data(0xA1, 1) and bytes(base[8 * 512:9 * 512]) == data(0xA2, 1)
    assert bytes(base[16 * 512:24 * 512]) == data(2, 8)


async def test_merge_resumes_after_restart(env: Env) -> None:
    origin, snap = await origin_env(env)
    for chunk in range(0, 60, 3):
        await snap.write(chunk * 8, data(chunk, 8))
    want = bytes(await snap.read(0, SIZE))
    await env.mds.pop("snap").close()
    await env.mds.pop("origin").close()
    base = env.devs["base"]
    gate = trio.Event()
    base.flush_gate = gate  # type: ignore[attr-defined]
    merge = await env.create("m", f"0 {SIZE} snapshot-merge base cow P 8")
    await trio.testing.wait_all_tasks_blocked()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(merge.suspend)                 # waits for the step in flight
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert env.status("m") == f"{(2 + 19) * 8}/1024 16"   # exactly one step merged
    await env.mds.pop("m").close()
    merge = await env.create("m", f"0 {SIZE} snapshot-merge base cow P 8")
    await wait_for(lambda: env.status("m") == "16/1024 16")
    assert bytes(base.buf) == want  # type: ignore[attr-defined]


async def test_merge_failed(env: Env) -> None:
    origin, snap = await origin_env(env)
    await snap.write(80, data(1, 8))
    await snap.write(160, data(2, 8))
    await env.mds.pop("snap").close()
    await env.mds.pop("origin").close()
    env.devs["base"].fail_sectors.add(160)  # type: ignore[attr-defined]
    merge = await env.create("m", f"0 {SIZE} snapshot-merge base cow P 8")
    await wait_for(lambda: env.status("m") == "Merge failed")
    assert bytes(await merge.read(80, 8)) == data(1, 8)    # I/O goes on
    env.devs["base"].fail_sectors.clear()  # type: ignore[attr-defined]


async def test_merge_errors(env: Env) -> None:
    await env.create("n", f"0 {SIZE} snapshot base cow2 N 8")
    with pytest.raises(TableError, match="does not support snapshot-merge"):
        await env.create("m", f"0 {SIZE} snapshot-merge base cow2 N 8")
    with pytest.raises(TableError, match="does not support snapshot-merge"):
        await env.create("m", f"0 {SIZE} snapshot-merge base cow N 8")
    await env.create("a", f"0 {SIZE} snapshot base cow P 8")
    m = MappedDevice("m")
    await m.load(await env.table("m", f"0 {SIZE} snapshot-merge base cow P 8"))
    env.mds["m"] = m
    with pytest.raises(TableError, match="Snapshot cow pairing for exception table handover"):
        await env.table("x", f"0 {SIZE} snapshot base cow P 8")
    with pytest.raises(DmError, match="until source is suspended"):
        await m.resume()


async def test_handover_cancelled_when_source_goes(env: Env,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    await env.create("a", f"0 {SIZE} snapshot base cow P 8")
    b = MappedDevice("b")
    await b.load(await env.table("b", f"0 {SIZE} snapshot base cow P 8"))
    env.mds["b"] = b
    await env.mds.pop("a").close()
    assert "Cancelling snapshot handover." in caplog.text
    await b.resume()
    assert env.status("b") == "Invalid"


# -- crash consistency ----------------------------------------------------------------------


class CacheDevice(DelayedDevice):
    """A disk with a volatile write cache: ``buf`` is what reads see, ``durable`` what
    survives a crash.  A write may reach ``durable`` at any time (random early write-back),
    PREFLUSH makes everything completed before it durable, FUA makes the write itself.
    Every bio takes a random number (0-5) of scheduler turns."""

    def __init__(self, nr_sectors: int, name: str, rng: random.Random) -> None:
        super().__init__(nr_sectors, name, rng=rng, turns=lambda bio: rng.randrange(6))
        self.durable = bytearray(self.buf)

    async def submit(self, bio: Bio) -> None:
        if bio.flags & ReqFlag.PREFLUSH:
            self.durable[:] = self.buf
        await super().submit(bio)
        written = bio.op is Op.WRITE and bio.nr_sectors
        if written and (bio.flags & ReqFlag.FUA or self.rng.random() < 0.3):
            start, end = bio.sector * 512, bio.end_sector * 512
            self.durable[start:end] = self.buf[start:end]


@pytest.mark.parametrize("seed", [1, 2])
async def test_crash_images_never_lose_snapshot_data(env: Env, seed: int) -> None:
    """At any instant, the durable bytes of origin + COW activate to the snapshot-time view."""
    rng = random.Random(seed)
    base = CacheDevice(SIZE, "cbase", rng)
    base.buf[:] = base.durable[:] = rng.randbytes(SIZE * 512)
    env.devs["cbase"], env.devs["ccow"] = base, CacheDevice(2 * SIZE, "ccow", rng)
    view = bytes(base.buf)
    origin = await env.create("origin", f"0 {SIZE} snapshot-origin cbase")
    await env.snapshot("snap", "cbase ccow P 8")
    crashes: list[tuple[bytes, bytes]] = []
    done = False

    async def writer(n: int) -> None:
        for _ in range(15):
            nr = rng.randint(1, 20)
            await origin.write(rng.randrange(SIZE - nr), rng.randbytes(nr * 512))

    async def crasher() -> None:
        while not done:
            for _ in range(rng.randrange(30)):
                await trio.lowlevel.checkpoint()
            crashes.append((bytes(base.durable), bytes(env.devs["ccow"].durable)))  # type: ignore[attr-defined]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(crasher)
        async with trio.open_nursery() as writers:
            for n in range(4):
                writers.start_soon(writer, n)
        done = True
    assert len(crashes) > 10
    for i, (origin_bytes, cow_bytes) in enumerate(crashes[:: max(1, len(crashes) // 15)]):
        o, c = MemDevice(SIZE, "o"), MemDevice(2 * SIZE, "c")
        o.buf[:], c.buf[:] = origin_bytes, cow_bytes
        devs = {"o": o, "c": c}
        md = MappedDevice(f"crash{i}")
        await md.load(await Table.build(md.name, parse_table(f"0 {SIZE} snapshot o c P 8"),
                                        devs.__getitem__, lambda d: None,
                types=TYPES))
        await md.resume()
        try:
            assert bytes(await md.read(0, SIZE)) == view, f"crash image {i}"
        finally:
            await md.close()


# -- fast paths: whole-range checks, one piece per run, the copier ---------------------------


def area_records(env: Env, cow: str, n: int, chunk_bytes: int = 4096) -> list[tuple[int, int]]:
    area = bytes(env.devs[cow].buf[chunk_bytes:chunk_bytes + 16 * n])  # type: ignore[attr-defined]
    return [struct.unpack_from("<QQ", area, 16 * i) for i in range(n)]


async def test_origin_write_mixing_copied_and_uncopied_chunks(env: Env) -> None:
    """One origin bio over chunks already copied (in one snapshot or both) and not
    yet copied: only the missing ones are copied, in sector order, and both
    snapshots keep their data; the bio reaches the origin whole, after the copies."""
    origin = await env.create("origin", f"0 {SIZE} snapshot-origin base")
    before = bytes(await origin.read(0, SIZE))
    s1 = await env.snapshot("s1", "base cow P 8")
    s2 = await env.snapshot("s2", "base cow2 N 16")
    await origin.write(8, data(1, 1))      # s1 chunk 1, s2 chunk 0
    await origin.write(27, data(3, 2))     # s1 chunk 3, s2 chunk 1
    mid = bytes(await origin.read(0, SIZE))
    assert area_records(env, "cow", 2) == [(1, 2), (3, 3)]
    env.log.clear()
    await origin.write(4, data(9, 44))     # sectors 4..47: s1 chunks 0..5, s2 chunks 0..2
    assert area_records(env, "cow", 7) == [(1, 2), (3, 3), (0, 4), (2, 5), (4, 6), (5, 7),
                                           (0, 0)]
    base_writes = [(e.sector, e.nr_sectors) for e in env.log
                   if e.op is Op.WRITE and e.dev == "base"]
    assert base_writes == [(4, 44)]
    last = env.log[-1]
    assert last.op is Op.WRITE and where(last) == ("base", 4, 44)  # after every copy and commit
    assert bytes(await s1.read(0, SIZE)) == before
    assert bytes(await s2.read(0, SIZE)) == before
    assert mid != before
    assert env.status("s2") == "48/1024 0"               # chunks 0, 1, 2 of 16
    env.log.clear()
    await origin.write(0, data(5, 48))                     # everything copied: no copy
    assert [e.dev for e in env.log] == ["base"]
    assert bytes(await s1.read(0, SIZE)) == before


async def test_origin_write_over_copied_chunks_waits_for_tracked_read(env: Env) -> None:
    """Chunks 1 and 2 both have completed exceptions, but chunk 2's is still held
    by a tracked snapshot read: a write over both must wait for that read."""
    origin, snap = await origin_env(env)
    base = env.devs["base"]
    old = bytes(base.buf[8 * 512:24 * 512])  # type: ignore[attr-defined]
    await origin.write(8, data(1, 1))                      # chunk 1 copied
    gate = trio.Event()
    base.read_gates[16] = gate  # type: ignore[attr-defined]
    done: list[str] = []
    got: list[bytes] = []

    async def snap_read() -> None:
        got.append(bytes(await snap.read(16, 8)))
        done.append("read")

    async def origin_write(sector: int, nr: int, tag: str) -> None:
        await origin.write(sector, data(0xEE, nr))
        done.append(tag)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(snap_read)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(origin_write, 16, 1, "w1")      # copies chunk 2 out
        await trio.testing.wait_all_tasks_blocked()
        assert 2 in snap.live.targets[0].snap.complete  # type: ignore[union-attr,attr-defined]
        nursery.start_soon(origin_write, 8, 16, "w2")      # chunks 1, 2: all "copied"
        await trio.testing.wait_all_tasks_blocked()
        assert done == []
        assert bytes(base.buf[16 * 512:24 * 512]) == old[8 * 512:]  # type: ignore[attr-defined]
        gate.set()
    assert done[0] == "read" and got == [old[8 * 512:]]
    assert bytes(await snap.read(8, 16)) == old


async def test_snapshot_io_goes_down_one_piece_per_run(env: Env) -> None:
    origin, snap = await origin_env(env)
    before = bytes(await snap.read(0, SIZE))
    await origin.write(16, data(1, 1))                     # chunk 2 -> COW chunk 2
    await origin.write(0, data(2, 16))                     # chunks 0, 1 -> COW chunks 3, 4
    await origin.write(24, data(3, 8))                     # chunk 3 -> COW chunk 5
    env.log.clear()
    assert bytes(await snap.read(0, 16)) == before[:16 * 512]
    assert [where(e) for e in env.log] == [("cow", 24, 16)]
    env.log.clear()
    assert bytes(await snap.read(0, 48)) == before[:48 * 512]
    assert sorted(where(e) for e in env.log) == [("base", 32, 16), ("cow", 16, 8),
                                               ("cow", 24, 16), ("cow", 40, 8)]
    env.log.clear()
    await snap.write(16, data(7, 16))                      # chunks 2, 3 -> COW 2, 5: two
    assert sorted(where(e) for e in env.log) == [("cow", 16, 8), ("cow", 40, 8)]
    env.log.clear()
    await snap.write(4, data(8, 8))                        # chunks 0, 1 -> COW 3, 4: one
    assert [where(e) for e in env.log] == [("cow", 28, 8)]
    want = bytearray(before)
    want[16 * 512:32 * 512] = data(7, 16)
    want[4 * 512:12 * 512] = data(8, 8)
    assert bytes(await snap.read(0, SIZE)) == bytes(want)


async def test_merge_bio_without_exceptions_goes_to_the_origin_whole(env: Env) -> None:
    origin, snap = await origin_env(env)
    await snap.write(40, data(1, 8))                       # chunk 5 only
    other = await env.snapshot("other", "base cow2 P 8")
    await env.mds.pop("snap").close()
    await env.reload("origin", f"0 {SIZE} snapshot-merge base cow P 8")
    await origin.suspend()
    await origin.resume()
    await wait_for(lambda: env.status("origin") == "16/1024 16")
    keep = bytes(await other.read(0, SIZE))
    env.log.clear()
    await origin.write(0, data(2, 64))                     # chunks 0..7, none in the COW
    base_writes = [(e.sector, e.nr_sectors) for e in env.log
                   if e.op is Op.WRITE and e.dev == "base"]
    assert base_writes == [(0, 64)]
    assert bytes(await other.read(0, SIZE)) == keep        # other snapshot copied out
    assert bytes(await origin.read(0, 64)) == data(2, 64)


async def test_service_runs_in_the_table_nursery(env: Env) -> None:
    from dmuser.core.table import TargetServices

    async with trio.open_nursery() as nursery:
        table = await Table.build("s", parse_table(f"0 {SIZE} snapshot base cow N 8"),
                                  env.get_device, lambda d: None, TargetServices(nursery=nursery),
                types=TYPES)
        names = [t.name for t in nursery.child_tasks]
        assert names == ["snapshot service s:snapshot"]
        await table.close()
        await trio.testing.wait_all_tasks_blocked()
        assert not nursery.child_tasks


async def test_cancelled_origin_write_does_not_stall_commits(env: Env) -> None:
    """The copy runs in the service: cancelling the write that started it leaves
    the copy and its commit to finish, and later writes are not held up."""
    origin, snap = await origin_env(env)
    before = bytes(await snap.read(0, SIZE))
    base = env.devs["base"]
    gate = trio.Event()
    base.read_gates[8] = gate  # type: ignore[attr-defined]  # the copy's read of chunk 1
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(origin.write, 8, data(1, 8))
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
    gate.set()
    with trio.fail_after(5):
        await origin.write(16, data(2, 8))
        await origin.write(8, data(3, 8))
    assert bytes(await snap.read(0, SIZE)) == before
    assert area_records(env, "cow", 3) == [(1, 2), (2, 3), (0, 0)]
