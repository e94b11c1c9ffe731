"""Snapshot crash safety at every crash point of its own backing writes (log-writes replay).

Why: ``test_snapshot_crash.py`` kills the daemon at a few random moments, and
``test_held.py`` builds crash images from a simulated volatile cache.  This test
records, with dmuser's own ``log-writes`` target, every write the snapshot
targets send to their backing storage, in the order it may become durable and
with its PREFLUSH/FUA flags, then replays the log to *every* flush, FUA and mark
entry (``dmuser.crashpoints``) -- every state a power cut can leave -- and
checks at each one (docs/snapshot-protocol.md, "Held origin writes"):

* (a) a snapshot is never corrupted: the COW header is valid and its metadata
  walk finds no bad record; every origin chunk that differs from its
  pre-snapshot data has an exception on disk; the snapshot's view (COW chunk if
  excepted, else origin) holds in every sector the pre-snapshot data or one of
  the snapshot's own writes -- never an origin write nor the garbage the COW
  area started with (an exception whose copy is not durable would show it).
  ``snap2``, whose COW is too small, overflows during the run: its header may
  say invalid (then nothing else is checked), but while it says valid, (a)
  holds for it too; the view the snapshot target itself reads after an
  activation of the image is compared at the snapshot writer's marks;
* (b) at the mark a writer puts after each of its fsyncs, everything it wrote
  before is there, exactly (each writer owns its sectors and waits for the
  mark); at the mark after a FUA write, that write is there; at the end mark
  every device holds exactly what was written.

The stack, in process (``DeviceManager`` over image files, so it needs no root
and no FUSE; stacked devices resolve by name as in the daemon)::

    base.img -> lw (log-writes, log in log.img) -> olin (linear: origin area)
                                                -> csnap, csnap2 (linear: COW areas)
    origin = snapshot-origin olin
    snap = snapshot olin csnap P 8;  snap2 = snapshot olin csnap2 P 16

One log-writes device under all areas, not one per area: one log gives the
true global order of origin and COW writes, which (a) is about (an origin write
reaching the disk before a COW record).  The price: a flush in the log covers
every area, where the daemon's fdatasync of the origin file does not flush a
COW file, so this test cannot catch a protocol that relies on an origin flush
to make COW writes durable; ``test_held.test_crash_images`` models one volatile
cache per device and covers that.  Two log-writes devices would model it but
have no order between them.  Like any log-writes replay, it sees the states a
prefix of the log gives: two plain writes logged in one flush batch are never
split, so an ordering that relies on a plain write *completing* first (the
invalid header before held writes go out) is only caught when a flush happens
to fall in between.

Workload: four origin writers (each owning a quarter of the origin: small
writes that take the held path, some larger than ``snapshot_hold_bytes``, some
FUA) and one snapshot writer, concurrently, with fsyncs at random and a
``mark`` after each fsync and FUA write; ``snapshot_hold_ms`` is short, so
timer drains happen too.  The first mark, ``snapshot``, follows the snapshot's
creation: crash points start there.  The sector contents are self-describing
(``tag:sector:seq``), so a failure names what a sector holds.

``$DMUSER_LOGWRITES_WRITES`` (writes per writer, default 40: about 5 s) and
``$DMUSER_LOGWRITES_SEED`` give a larger or another run on demand (the seed
picks the writes; their interleaving also depends on timing, so a run is not
replayed exactly: a failure prints the crash point and what each bad sector
holds).
"""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from support.data import pattern
from support.fakes import MemDevice
from support.oracles import COW_MAGIC, read_cow
from support.targets import TYPES, make_manager, remove_all_checked

from dmuser.core.bio import Bio, ReqFlag
from dmuser.core.config import Config
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.table import Table, parse_table
from dmuser.crashpoints import CrashPoint, crash_points
from dmuser.formats.cow import MetadataWalk
from dmuser.targets.snapshot.registry import ORIGINS

SEED = int(os.environ.get("DMUSER_LOGWRITES_SEED", "20261203"))
#: writes per writer
WRITES = max(10, int(os.environ.get("DMUSER_LOGWRITES_WRITES", "40")))

pytestmark = pytest.mark.timeout(120 + 2 * WRITES)

S = 512
CS = 8                  # snapshot chunk size (sectors)
ORIG = 4096             # origin sectors: 512 chunks, more than one metadata area (256)
COW = 4608              # COW sectors: 576 chunks, room for an exception of every chunk
COW2 = 1024             # snap2's COW: 64 chunks of 16 sectors, 62 for data: it overflows
HOLD = 16 * 1024        # snapshot_hold_bytes: writes of up to 32 sectors are held
ORIGIN_WRITERS = 4
LOG_BYTES = 256 << 20   # sparse


def sector_data(tag: str, sector: int, seq: int) -> bytes:
    return f"{tag}:{sector}:{seq}:".encode().ljust(32, b".") * (S // 32)


def describe(data: bytes, pre: bytes) -> str:
    """What a sector holds, for messages (``pre``: its pre-snapshot data)."""
    head = data[:32]
    if data == head * (S // 32):
        return repr(head.rstrip(b".").decode(errors="replace"))
    if data == pre:
        return "its pre-snapshot data"
    return f"unrecognised data {data[:12].hex()}... (the COW area's initial garbage?)"


@dataclass
class Writer:
    """One writer's oracle: it owns sectors ``lo..hi`` of its device."""

    tag: str
    lo: int
    hi: int
    #: what its sectors must hold once everything it wrote is durable
    model: bytearray
    #: sector -> every data ever written there (any of them may survive a crash)
    ever: dict[int, set[bytes]] = field(default_factory=dict)
    #: mark -> (first sector, data) that the replayed image must hold at that mark
    marks: dict[str, tuple[int, bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class CowArea:
    """A snapshot and where its COW lies in base.img."""

    name: str
    start: int
    sectors: int
    chunk_size: int
    #: it overflows during the run: an invalid header is then a legitimate state
    may_invalidate: bool


SNAPS = (CowArea("snap", ORIG, COW, CS, False), CowArea("snap2", ORIG + COW, COW2, 16, True))


@dataclass
class World:
    pre: bytes                      # the origin before the snapshot
    origin_writers: list[Writer]
    snap_writer: Writer
    checked: dict[str, int] = field(default_factory=dict)
    #: crash points at which snap2 was valid / already invalidated
    snap2: dict[str, int] = field(default_factory=lambda: {"valid": 0, "invalid": 0})

    def origin_ever(self, sector: int) -> set[bytes]:
        w = self.origin_writers[sector * ORIGIN_WRITERS // ORIG]
        return w.ever.get(sector, set())


async def workload(devs: dict[str, MappedDevice], world: World, rng: random.Random,
                   mark: Callable[[str], Awaitable[None]]) -> int:
    """Run the writers concurrently; returns the largest held byte count seen."""
    peak = 0
    done = False

    async def write(md: MappedDevice, w: Writer, k: int) -> None:
        nr = rng.randint(40, 64) if rng.random() < 0.1 else rng.randint(1, 16)
        sector = rng.randrange(w.lo, w.hi - nr + 1)
        seq = k
        data = b"".join(sector_data(w.tag, sector + i, seq) for i in range(nr))
        for i in range(nr):
            w.ever.setdefault(sector + i, set()).add(data[i * S:(i + 1) * S])
        fua = rng.random() < 0.08
        if fua:
            await md.submit(Bio.write(sector, bytearray(data), ReqFlag.FUA))
        else:
            await md.write(sector, data)
        w.model[(sector - w.lo) * S:(sector - w.lo + nr) * S] = data
        if fua:
            name = f"{w.tag}-fua-{k}"
            w.marks[name] = (sector, data)
            await mark(name)
        if rng.random() < 0.25:
            await md.flush()
            name = f"{w.tag}-sync-{k}"
            w.marks[name] = (w.lo, bytes(w.model))
            await mark(name)

    async def writer(md: MappedDevice, w: Writer) -> None:
        for k in range(WRITES):
            await write(md, w, k)
            for _ in range(rng.randrange(4)):
                await trio.lowlevel.checkpoint()

    async def sampler() -> None:
        nonlocal peak
        while not done:
            peak = max([peak] + [o.held.bytes for o in ORIGINS.values()])
            await trio.sleep(0.0002)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sampler)
        async with trio.open_nursery() as writers:
            for w in world.origin_writers:
                writers.start_soon(writer, devs["origin"], w)
            writers.start_soon(writer, devs["snap"], world.snap_writer)
        done = True
    return peak


def origin_problems(origin: bytes, world: World) -> list[str]:
    """Every origin sector holds its pre-snapshot data or a write of its owner."""
    pre, problems = world.pre, []
    for chunk in range(ORIG // CS):
        lo, hi = chunk * CS * S, (chunk + 1) * CS * S
        if origin[lo:hi] != pre[lo:hi]:
            for s in range(chunk * CS, (chunk + 1) * CS):
                got = origin[s * S:(s + 1) * S]
                if got != pre[s * S:(s + 1) * S] and got not in world.origin_ever(s):
                    problems.append(f"origin sector {s} holds "
                                    f"{describe(got, pre[s * S:(s + 1) * S])}")
    return problems


def snapshot_view(image: bytes, area: CowArea, world: World, problems: list[str],
                  ) -> bytes | None:
    """The snapshot's content as an activation of this image would show it, (a)
    checked on the way; None if it is invalid (a problem unless ``may_invalidate``)."""
    origin, cow = image[:ORIG * S], image[area.start * S:(area.start + area.sectors) * S]
    hdr = read_cow(cow)
    cs, name = area.chunk_size, area.name
    if (hdr.magic, hdr.valid, hdr.version, hdr.chunk_size) == (COW_MAGIC, 0, 1, cs) \
            and area.may_invalidate:
        return None
    if (hdr.magic, hdr.valid, hdr.version, hdr.chunk_size) != (COW_MAGIC, 1, 1, cs):
        problems.append(f"{name}: COW header: magic {hdr.magic:#x} valid {hdr.valid} "
                        f"version {hdr.version} chunk size {hdr.chunk_size}")
        return None
    walk = MetadataWalk(cs, area.sectors)
    while (chunk := walk.next_area()) is not None:
        walk.feed(cow[chunk * cs * S:(chunk + 1) * cs * S])
    problems.extend(f"{name}: {p}" for p in walk.problems)
    if walk.records != hdr.records:
        problems.append(f"{name}: dmuser.formats.cow and the spec reader disagree on the records")
    exc = dict(hdr.records)
    ours = world.snap_writer.ever if name == "snap" else {}
    view = bytearray(origin)
    pre, cb = world.pre, cs * S
    for chunk in range(ORIG // cs):
        lo, hi = chunk * cb, (chunk + 1) * cb
        if chunk in exc:
            view[lo:hi] = cow[exc[chunk] * cb:(exc[chunk] + 1) * cb]
        elif origin[lo:hi] != pre[lo:hi]:
            problems.append(f"(a) {name}: origin chunk {chunk} is overwritten on disk but "
                            "has no exception on disk")
        if view[lo:hi] != pre[lo:hi]:
            for s in range(chunk * cs, (chunk + 1) * cs):
                got = bytes(view[s * S:(s + 1) * S])
                if got != pre[s * S:(s + 1) * S] and got not in ours.get(s, ()):
                    where = f"COW chunk {exc[chunk]}" if chunk in exc else "the origin"
                    problems.append(f"(a) {name}: sector {s} (chunk {chunk}, from {where}) "
                                    f"holds {describe(got, pre[s * S:(s + 1) * S])}, "
                                    "neither its pre-snapshot data nor a snapshot write")
    return bytes(view)


def check_point(image: bytes, point: CrashPoint, world: World, final: bool,
                ) -> tuple[list[str], bytes | None]:
    """(a) and (b) at one crash point: (the problems found, the snapshot's view)."""
    problems = origin_problems(image[:ORIG * S], world)
    view = snapshot_view(image, SNAPS[0], world, problems)
    valid2 = snapshot_view(image, SNAPS[1], world, problems) is not None
    world.snap2["valid" if valid2 else "invalid"] += 1
    if view is None:
        return problems, None
    devices = {"snap": view, "origin": image[:ORIG * S]}
    for w in world.origin_writers + [world.snap_writer]:
        dev = devices["snap" if w is world.snap_writer else "origin"]
        wants = [w.marks[point.mark]] if point.mark in w.marks else []
        if final:
            wants = [(w.lo, bytes(w.model))]
        for start, want in wants:
            got = dev[start * S:start * S + len(want)]
            for i in range(0, len(want), S):
                if got[i:i + S] != want[i:i + S]:
                    pre = world.pre[start * S + i:start * S + i + S]
                    problems.append(f"(b) {w.tag}: sector {start + i // S} holds "
                                    f"{describe(got[i:i + S], pre)}, acknowledged before "
                                    f"this point: {describe(want[i:i + S], pre)}")
            world.checked[w.tag] = world.checked.get(w.tag, 0) + 1
    return problems, view


async def activate(image: bytes) -> bytes:
    """Read the whole snapshot through the snapshot target over a copy of ``image``."""
    o, c = MemDevice(ORIG, "o"), MemDevice(COW, "c")
    o.buf[:], c.buf[:] = image[:ORIG * S], image[ORIG * S:(ORIG + COW) * S]
    md = MappedDevice("crash")
    await md.load(await Table.build(md.name, parse_table(f"0 {ORIG} snapshot o c P {CS}"),
                                    {"o": o, "c": c}.__getitem__, lambda d: None, types=TYPES))
    await md.resume()
    try:
        return bytes(await md.read(0, ORIG))
    finally:
        await md.close()


async def test_every_crash_point_of_the_snapshots_backing_writes(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    pre = pattern(f"{SEED}-origin", ORIG * S)
    start = pre                              # each COW: a zero header chunk, then garbage
    for area in SNAPS:
        start += bytes(area.chunk_size * S) + rng.randbytes((area.sectors - area.chunk_size) * S)
    (tmp_path / "base.img").write_bytes(start)
    (tmp_path / "base0.img").write_bytes(start)
    with open(tmp_path / "log.img", "wb") as f:
        f.truncate(LOG_BYTES)
    quarter = ORIG // ORIGIN_WRITERS
    world = World(pre, [Writer(f"o{i}", i * quarter, (i + 1) * quarter,
                               bytearray(pre[i * quarter * S:(i + 1) * quarter * S]))
                        for i in range(ORIGIN_WRITERS)],
                  Writer("s", 0, ORIG, bytearray(pre)))
    mgr = make_manager(config=Config(snapshot_hold_bytes=HOLD, snapshot_hold_ms=5))
    cwd = str(tmp_path)
    try:
        lw = await mgr.create("lw", f"0 {len(start) // S} log-writes base.img log.img", cwd)
        assert lw.live is not None
        lw_target = lw.live.target_at(0)

        async def mark(text: str) -> None:
            await lw_target.message(["mark", text])

        await mgr.create("olin", f"0 {ORIG} linear lw 0", cwd)
        origin = await mgr.create("origin", f"0 {ORIG} snapshot-origin olin", cwd)
        for area in SNAPS:
            await mgr.create(f"c{area.name}", f"0 {area.sectors} linear lw {area.start}", cwd)
        await mgr.suspend(origin)
        for area in SNAPS:
            await mgr.create(area.name, f"0 {ORIG} snapshot olin c{area.name} P "
                                        f"{area.chunk_size}", cwd)
        await mgr.resume(origin)
        await lw.flush()
        await mark("snapshot")
        with trio.fail_after(30 + WRITES):
            peak = await workload(mgr.devices, world, rng, mark)
        for name in ("snap", "snap2", "origin", "olin", "csnap", "csnap2", "lw"):
            await mgr.remove(name)  # the origin drains; lw logs the rest and the end mark
    finally:
        await remove_all_checked(mgr)
    assert not ORIGINS

    flags: dict[str, int] = {}
    last = None
    for point in crash_points(tmp_path / "log.img", tmp_path / "replay.img",
                              start=tmp_path / "base0.img", since="snapshot"):
        final = point.number == point.total - 1
        image = point.image.read_bytes()
        problems, view = check_point(image, point, world, final)
        assert not problems, f"{point}: {len(problems)} problems:\n" + "\n".join(problems[:20])
        if final or (point.mark or "").startswith("s-sync"):  # the target's own reading
            assert await activate(image) == view, f"{point}: activation reads another view"
        flags[point.kind] = flags.get(point.kind, 0) + 1
        last = point
    assert last is not None and last.mark == "dm-log-writes-end"
    assert (tmp_path / "replay.img").read_bytes() == (tmp_path / "base.img").read_bytes()
    records = read_cow((tmp_path / "base.img").read_bytes()[ORIG * S:]).records
    print(f"\nlog-writes replay: seed {SEED}, {WRITES} writes per writer, {last.total} crash "
          f"points {flags}, {len(records)} exceptions, peak held {peak} bytes, "
          f"mark checks {world.checked}, snap2 at the crash points {world.snap2}")
    assert peak > 0, "no origin write was held: the workload misses the held path"
    assert len(records) > 256, "the workload did not fill a metadata area"
    assert world.snap2["valid"] >= 10 and world.snap2["invalid"] >= 1, world.snap2
    assert len(flags) >= 3 and all(n >= 4 for n in world.checked.values()), (flags, world.checked)
