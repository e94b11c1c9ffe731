"""Power cuts of the snapshot's inline copy path, on real image files.

When the origin and the COW are plain ``FileDevice``\\ s, a copy-out is one
``pread`` and one ``pwrite`` (``copy_out.copy_inline``), its record is kept by
the store's synchronous ``hold_nowait``, and origin writes that need it are
held until the group commit that makes it durable (``docs/snapshot-protocol.md``,
"Held origin writes", "Inline copy-outs").  ``test_held.py::test_crash_images``
and ``test_logwrites_replay.py`` go through kcopyd; this module runs the stack in
process over image files in ``tmp_path`` whose syscalls a model of a volatile
write cache wraps (``support/volatile.py``), takes crash images (the durable
shadows of origin and COWs) between syscalls and at checkpoints while several
writers run, and checks a uniform sample of them (the COWs start as garbage but
for their first two chunks, so a metadata area not zeroed in time shows):

(a) every crash image activates to the snapshot-time view (plus, per sector,
    one of the snapshot writer's writes);
(b) what a writer had acknowledged before its flush returned (or an FUA write,
    when it returned) is in the durable origin.

It also proves the path it claims to test was taken: inline copies (most of
them), ``hold_nowait`` commits, area fills, runs cut by the inline budget,
held writes absorbed from the direct path, and drains by flush, memory bound
and timer.  Each case takes ~1 s.  ``$DMUSER_CRASH_FILES_SEEDS=N`` runs seeds 1..N
(default 3) instead, cycling through the chunk sizes: a longer run on demand.
"""

from __future__ import annotations

import os
import random
import sys
from collections import Counter
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from support.data import make_image
from support.fakes import MemDevice
from support.targets import TYPES, make_manager, remove_all_checked
from support.volatile import VolatileDisk

from dmuser.core.bio import Bio, ReqFlag
from dmuser.core.config import Config
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.table import Table, parse_table
from dmuser.services.dm_io import Region
from dmuser.targets.snapshot import copy_out
from dmuser.targets.snapshot.held import HeldWrites
from dmuser.targets.snapshot.origin import SnapshotOriginTarget
from dmuser.targets.snapshot.registry import ORIGINS
from dmuser.targets.snapshot.service import Service
from dmuser.targets.snapshot.snap import PendingException, Snapshot
from dmuser.targets.snapshot.store.persistent import PersistentStore

SECTOR = 512
KiB = 1024
ORIGIN_SECTORS = 2048
COW_SECTORS = ORIGIN_SECTORS + 256  # never full (header, areas, a chunk per origin chunk)
#: (seed, chunk sizes of the origin's snapshots)
CASES = [(seed, ((4,), (64,), (4, 64))[(seed - 1) % 3])
         for seed in range(1, int(os.environ.get("DMUSER_CRASH_FILES_SEEDS", "3")) + 1)]
IMAGES = 40  # crash images checked per case (a uniform sample of those taken)
#: the inline budget of one origin write, scaled down (for 2 KiB chunks) with the
#: images so that runs too large for it and budget cuts both happen (really 256 KiB)
BUDGET = 32 * KiB


class Probes:
    """Counts of what the snapshot machinery did (wrappers around its functions)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.c: Counter[str] = Counter()
        c = self.c
        copied_inline = Snapshot._copied_inline

        def counted_copied_inline(snap: Snapshot, run: Sequence[PendingException],
                                  failed: bool) -> None:
            c["inline_copies"] += 1  # every inline copy ends here
            c["inline_sectors"] += len(run) * snap.store.chunk_size
            copied_inline(snap, run, failed)

        service_copy = Service.copy

        def counted_copy(service: Service, src: Region, dst: Region, done: Any) -> bool:
            c["kcopyd_copies"] += 1
            c["kcopyd_sectors"] += src.count
            return service_copy(service, src, dst, done)

        start_copy = Snapshot.start_copy

        def counted_start_copy(snap: Snapshot, run: Sequence[PendingException],
                               inline: bool = True) -> bool:
            c["runs"] += 1
            c["multi_chunk_runs"] += len(run) > 1
            c["budget_cuts"] += not inline
            return start_copy(snap, run, inline)

        hold_nowait = PersistentStore.hold_nowait

        def counted_hold_nowait(store: PersistentStore, *args: Any) -> bool:
            held = hold_nowait(store, *args)
            c["hold_nowait"] += held
            return held

        write_area = PersistentStore._write_area

        async def counted_write_area(store: PersistentStore, full: bool) -> Any:
            c["area_writes"] += 1
            c["area_fills"] += full
            return await write_area(store, full)

        drain = HeldWrites.drain

        def classified_drain(held: HeldWrites, everything: bool = False
                             ) -> Coroutine[Any, Any, None]:
            c[f"drain_{self._why(sys._getframe(1))}"] += 1
            return drain(held, everything)

        absorb = SnapshotOriginTarget.absorb_write

        def counted_absorb(target: SnapshotOriginTarget, *args: Any) -> bool:
            done = absorb(target, *args)
            c["absorbed"] += done
            return done

        monkeypatch.setattr(Snapshot, "_copied_inline", counted_copied_inline)
        monkeypatch.setattr(Service, "copy", counted_copy)
        monkeypatch.setattr(Snapshot, "start_copy", counted_start_copy)
        monkeypatch.setattr(PersistentStore, "hold_nowait", counted_hold_nowait)
        monkeypatch.setattr(PersistentStore, "_write_area", counted_write_area)
        monkeypatch.setattr(HeldWrites, "drain", classified_drain)
        monkeypatch.setattr(SnapshotOriginTarget, "absorb_write", counted_absorb)

    @staticmethod
    def _why(frame: Any) -> str:
        """Which trigger called drain(): its caller's name, and in map() the locals."""
        name = frame.f_code.co_name
        if name == "fire":
            return "timer"
        if name != "map":
            return name
        bio, n, limit = (frame.f_locals.get(k) for k in ("bio", "n", "limit"))
        if bio is None or n is None or bio.is_empty_flush:
            return "flush"
        if bio.flags & ReqFlag.FUA or n > limit:
            return "before_sync_write"
        return "memory"


class Images:
    """A uniform sample (reservoir) of the crash images taken, and how many were."""

    def __init__(self, disk: VolatileDisk, files: Sequence[Any], rng: random.Random) -> None:
        self.disk, self.files, self.rng = disk, files, rng
        self.sample: list[list[bytes]] = []
        self.taken = 0
        self._version = -1

    def take(self) -> None:
        """Take an image now (the disk's lock held) unless nothing changed since the last."""
        if self.disk.version == self._version:
            return
        self._version = self.disk.version
        self.taken += 1
        if len(self.sample) < IMAGES:
            self.sample.append(self.disk.durable_images(self.files))
        elif (i := self.rng.randrange(self.taken)) < IMAGES:
            self.sample[i] = self.disk.durable_images(self.files)


async def read_crash_image(i: int, origin: bytes, cow: bytes, chunk: int) -> bytes:
    """Activate a fresh snapshot over copies of a crash image; its whole content."""
    o, c = MemDevice(ORIGIN_SECTORS, "o"), MemDevice(COW_SECTORS, "c")
    o.buf[:], c.buf[:] = origin, cow
    md = MappedDevice(f"crash{i}")
    table = await Table.build(md.name, parse_table(f"0 {ORIGIN_SECTORS} snapshot o c P {chunk}"),
                              {"o": o, "c": c}.__getitem__, lambda d: None, types=TYPES)
    await md.load(table)
    await md.resume()
    try:
        return bytes(await md.read(0, ORIGIN_SECTORS))
    finally:
        await md.close()


def regions(rng: random.Random, n: int) -> list[tuple[int, int]]:
    """``n`` disjoint ranges of origin sectors, cut at random (not chunk-aligned)."""
    cuts = sorted(rng.sample(range(64, ORIGIN_SECTORS - 64), n - 1))
    bounds = [0, *cuts, ORIGIN_SECTORS]
    return list(zip(bounds, bounds[1:], strict=False))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("seed", "chunks"), CASES,
                         ids=[f"seed{s}-cs{'+'.join(map(str, c))}" for s, c in CASES])
async def test_inline_copy_crash_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        seed: int, chunks: tuple[int, ...]) -> None:
    """(a) and (b) of the module docstring, for snapshots with chunks of 2 KiB (writes
    span several, areas of 128 records fill) or 32 KiB (writes stay in one), alone
    or both of one origin (one write copies out to both)."""
    rng = random.Random(seed)
    if 4 in chunks:
        monkeypatch.setattr(copy_out, "INLINE_COPY_MAX_BYTES", BUDGET)
    view = make_image(tmp_path / "base.img", ORIGIN_SECTORS * SECTOR, seed=seed)
    disk = VolatileDisk(random.Random(seed * 7919))
    files = [disk.track(str(tmp_path / "base.img"))]
    for k, chunk in enumerate(chunks):
        # the COW holds garbage but for its first two chunks (as a reused volume whose
        # start was wiped): areas must be zeroed before the one before them fills
        cow = bytearray(rng.randbytes(COW_SECTORS * SECTOR))
        cow[:2 * chunk * SECTOR] = bytes(2 * chunk * SECTOR)
        (tmp_path / f"cow{k}.img").write_bytes(cow)
        files.append(disk.track(str(tmp_path / f"cow{k}.img")))
    images = Images(disk, files, random.Random(seed * 31))
    image_rng = random.Random(seed * 17)

    def between_syscalls() -> None:  # the disk's lock is held
        if image_rng.random() < 0.3:
            images.take()

    disk.on_syscall = between_syscalls
    disk.install(monkeypatch)
    probes = Probes(monkeypatch)
    c = probes.c
    mgr = make_manager(config=Config(snapshot_hold_bytes=16 * KiB, snapshot_hold_ms=2,
                                     write_behind_bytes=64 * KiB))
    for k, chunk in enumerate(chunks):
        await mgr.create(f"snap{k}", f"0 {ORIGIN_SECTORS} snapshot base.img cow{k}.img "
                         f"P {chunk}", str(tmp_path))
    await mgr.create("o", f"0 {ORIGIN_SECTORS} snapshot-origin base.img", str(tmp_path))
    origin, snap = mgr.get("o"), mgr.get("snap0")
    snap_writes: dict[int, set[bytes]] = {}  # sector -> every block snap0's writer sent
    done = False

    def durable_origin() -> bytes:
        return disk.durable(files[0])

    async def origin_writer(n: int, lo: int, hi: int, direct: bool) -> None:
        """Writes to ``[lo, hi)`` (its own), by the direct path (FUSE's first try) or
        as bios; flushes and FUA writes are checked against the durable origin."""
        wrng = random.Random(seed * 100 + n)
        acked: dict[int, bytes] = {}
        for i in range(60):
            nr = wrng.choice((wrng.randint(1, 16), wrng.randint(1, 16), wrng.randint(17, 96)))
            if i % 30 == 29:  # over the gaps the others left: many runs, a budget cut
                nr = hi - lo
            nr = min(nr, hi - lo)
            sector = wrng.randrange(lo, hi - nr + 1)
            buf = wrng.randbytes(nr * SECTOR)
            fua = wrng.random() < 0.05
            if fua:
                await origin.submit(Bio.write(sector, bytearray(buf), ReqFlag.FUA))
                d = durable_origin()
                assert d[sector * SECTOR:(sector + nr) * SECTOR] == buf, (n, "FUA", sector)
                c["fua_writes"] += 1
            elif not (direct and origin.write_direct(sector, buf)):
                await origin.write(sector, buf)
            for k in range(nr):
                acked[sector + k] = buf[k * SECTOR:(k + 1) * SECTOR]
            r = wrng.random()
            if r < 0.15:
                await origin.flush()
                c["flushes"] += 1
                d = durable_origin()
                for s, b in acked.items():
                    assert d[s * SECTOR:(s + 1) * SECTOR] == b, (n, "flush", s)
            elif r < 0.25:  # reads see held writes
                got = bytes(await origin.read(sector, nr))
                assert got == b"".join(acked[s] for s in range(sector, sector + nr)), (n, sector)
            r = wrng.random()
            if r < 0.3:
                await trio.sleep(wrng.random() * 0.004)  # let the hold timer fire
            elif r < 0.6:
                await trio.lowlevel.checkpoint()
            # else no yield: direct writes pile up until the memory bound drains them

    async def snapshot_writer() -> None:
        wrng = random.Random(seed * 100 + 99)
        for _ in range(20):
            nr = wrng.randint(1, 8)
            sector = wrng.randrange(ORIGIN_SECTORS - nr)
            buf = wrng.randbytes(nr * SECTOR)
            for k in range(nr):
                snap_writes.setdefault(sector + k, set()).add(buf[k * SECTOR:(k + 1) * SECTOR])
            await snap.write(sector, buf)
            if wrng.random() < 0.2:
                await snap.flush()
            await trio.sleep(wrng.random() * 0.004)

    async def crasher() -> None:
        while not done:
            for _ in range(rng.randrange(10)):
                await trio.lowlevel.checkpoint()
            with disk.lock:
                images.take()

    try:
        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(crasher)
                async with trio.open_nursery() as writers:
                    for n, (lo, hi) in enumerate(regions(rng, 5)):
                        writers.start_soon(origin_writer, n, lo, hi, n % 2 == 0)
                    writers.start_soon(snapshot_writer)
                done = True
    finally:
        with trio.fail_after(20):  # closing commits what is held: a hang must fail here
            await remove_all_checked(mgr)
    assert not ORIGINS
    with disk.lock:
        images.take()  # after the targets closed (everything committed and flushed)
    disk.check_cache()

    for i, (origin_bytes, *cows) in enumerate(images.sample):
        for k, (chunk, cow_bytes) in enumerate(zip(chunks, cows, strict=True)):
            got = await read_crash_image(i, origin_bytes, cow_bytes, chunk)
            if got == view:
                continue
            writes = snap_writes if k == 0 else {}
            bad = [s for s in range(ORIGIN_SECTORS)
                   if got[s * SECTOR:(s + 1) * SECTOR] != view[s * SECTOR:(s + 1) * SECTOR]
                   and got[s * SECTOR:(s + 1) * SECTOR] not in writes.get(s, ())]
            assert not bad, f"crash image {i}, snap{k}: {len(bad)} bad sectors, {bad[:8]}..."

    # the path under test was taken, and every mechanism around it
    assert c["inline_copies"] > c["kcopyd_copies"], c  # most copies inline
    assert c["hold_nowait"] > 0 and c["drain_flush"] > 0, c
    assert c["flushes"] > 5 and c["fua_writes"] > 0, c
    assert disk.counts["pwritev_dsync"] > 0 and disk.counts["fdatasync"] > 0, disk.counts
    assert disk.counts["writeback"] > 0, disk.counts
    assert images.taken > 100, images.taken
    if 4 in chunks:  # 2 KiB chunks: writes span several, areas of 128 records fill, and
        # copies go on all along (with 32 KiB chunks alone, all 32 may be copied early)
        assert c["multi_chunk_runs"] > 0 and c["area_fills"] > 0, c
        assert c["budget_cuts"] > 0 and c["kcopyd_copies"] > 0, c
        assert c["absorbed"] > 0 and c["drain_memory"] > 0 and c["drain_timer"] > 0, c
