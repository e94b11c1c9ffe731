"""Crash recovery of a mirror with a disk log: ``kill -9`` of the daemon during writes.

A 64 MiB two-leg mirror of 256 regions (256 KiB each) gets writes confined to
a few regions, the daemon is killed with SIGKILL at a seeded random moment,
and then, before anything is re-created, the log device is decoded with
``support/oracles.py``, a small decoder written from dm-spec §5.5 (independent of
``dmuser.targets.mirror.log``).  Checked:

* the dirty regions are a subset of the regions written (far fewer than 256);
* every region where the two legs differ is dirty in the log (dirty-before-data);
* a new daemon re-creating the same table resyncs exactly the dirty regions:
  the first in-sync count equals ``256 - dirty`` (the resync is held at its
  first copy by creating the mirror while its source leg device is suspended);
* afterwards both legs are byte-identical, every block reads back as one of
  the versions written to it, never older than the last acknowledged (fsync'd)
  one, and a clean remove leaves the log all clean;
* after a clean shutdown nothing is dirty and nothing is resynced;
* with ext4 on the mirror, the file system recovers (journal replay) and is
  fsck-clean, with every fsync'd file intact.

Legs are stacked dmuser ``linear`` devices over the image files; the ``rig``
fixture tears them down with :meth:`support.daemon.Daemon.unstack` (resume every
device, unmount, detach, remove users first) before the daemon fixture's
teardown, so that a test failing with leg 1 suspended cannot hold the
daemon's shutdown.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.daemon import Daemon, DaemonFactory
from support.data import make_image, read_at, write_at
from support.oracles import MAGIC, differing_regions, read_disk_log
from support.system import fsck_clean, mkfs_ext4, wait_until

MiB = 1 << 20
SECTOR = 512
REGION_SECTORS = 512
REGION = REGION_SECTORS * SECTOR  # 256 KiB
NR_REGIONS = 256
SIZE = NR_REGIONS * REGION  # 64 MiB
N = SIZE // SECTOR
BLOCK = 4096

pytestmark = [pytest.mark.fuse, pytest.mark.slow, pytest.mark.timeout(240)]


# -- helpers -------------------------------------------------------------------------------


def log_dirty(path: str | os.PathLike[str]) -> list[int]:
    """The dirty regions of the disk log at ``path``."""
    return read_disk_log(path, NR_REGIONS).dirty


def legs_differ(a: Path, b: Path) -> list[int]:
    """The regions where the two leg images differ."""
    return differing_regions(a, b, REGION, NR_REGIONS)


def in_sync_count(d: Daemon, name: str = "m") -> tuple[int, int]:
    data = d.request("status", name=name)
    assert isinstance(data, dict)
    words = data[name][0].split()
    done, total = words[4 + int(words[3])].split("/")
    return int(done), int(total)


def wait_in_sync(d: Daemon, name: str = "m", timeout: float = 60.0) -> None:
    wait_until(lambda: in_sync_count(d, name)[0] == NR_REGIONS, timeout, interval=0.02,
               what=f"{name} in sync")


class Rig:
    """One daemon directory with two leg images and a log image, surviving restarts."""

    def __init__(self, factory: DaemonFactory) -> None:
        self.d = factory("d")
        self.dir = self.d.dir
        self.l0, self.l1, self.log = self.dir / "l0.img", self.dir / "l1.img", self.dir / "log.img"
        make_image(self.l0, SIZE)
        make_image(self.l1, SIZE)
        make_image(self.log, 1 * MiB)
        self.dev = self.d.path("m")

    def table(self, mode: str = "") -> str:
        nargs = 3 if mode else 2
        return (f"0 {N} mirror disk {nargs} {self.log} {REGION_SECTORS}{' ' + mode if mode else ''}"
                f" 2 L0 0 L1 0")

    def create(self, mode: str = "", pin: bool = True) -> int:
        """Legs L0/L1 and mirror m.  With ``pin`` the mirror is created while L0 (the
        resync source) is suspended, so the in-sync count read right after is exactly
        the number of regions the log says are clean.  Returns that count."""
        d = self.d
        d.create("L0", f"0 {N} linear {self.l0} 0")
        d.create("L1", f"0 {N} linear {self.l1} 0")
        if pin:
            d.request("suspend", name="L0")
        d.create("m", self.table(mode))
        first, total = in_sync_count(d)
        assert total == NR_REGIONS
        if pin:
            d.request("resume", name="L0")
        return first

    def remove_all(self) -> None:
        for name in ("m", "L0", "L1"):
            self.d.request("remove", name=name)

    def kill(self) -> None:
        self.d.signal(signal.SIGKILL)
        self.d.wait()

    def restart(self) -> None:
        self.d.start()


@pytest.fixture
def rig(make_daemon: DaemonFactory) -> Rig:
    r = Rig(make_daemon)
    yield r
    r.d.unstack()


# -- the writers -------------------------------------------------------------------------


WRITER = r"""
import os, random, struct, sys
dev, seed, regions = sys.argv[1], int(sys.argv[2]), [int(r) for r in sys.argv[3].split(",")]
BLOCK, PER_REGION = 4096, int(sys.argv[4]) // 4096
rng = random.Random(seed)
gen = seed * 1_000_000
blocks = sorted(r * PER_REGION + i for r in regions for i in range(PER_REGION))
fd = os.open(dev, os.O_RDWR)
try:
    while True:
        batch = []
        for _ in range(rng.randint(1, 6)):
            # 1-4 consecutive blocks (crossing a region boundary when both are ours)
            k = rng.randrange(len(blocks))
            run = [blocks[k]]
            for _ in range(rng.randint(0, 3)):
                if blocks.count(run[-1] + 1):
                    run.append(run[-1] + 1)
            data = b""
            for b in run:
                gen += 1
                data += struct.pack("<QQ", b, gen) * (BLOCK // 16)
                batch.append(f"{b}:{gen}")
            os.pwrite(fd, data, run[0] * BLOCK)
        os.fsync(fd)
        print(" ".join(batch), flush=True)
except OSError:
    pass
"""


class Writers:
    """A few processes writing self-describing 4 KiB blocks to disjoint region sets;
    each prints the blocks whose fsync returned (acknowledged)."""

    def __init__(self, dev: Path, seed: int, region_sets: list[list[int]], tmp: Path) -> None:
        self.procs = []
        self.outs = []
        for i, regions in enumerate(region_sets):
            out = open(tmp / f"writer{seed}-{i}.out", "w+")  # noqa: SIM115
            self.outs.append(out)
            self.procs.append(subprocess.Popen(
                [sys.executable, "-c", WRITER, str(dev), str(seed * 10 + i),
                 ",".join(map(str, regions)), str(REGION)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    def wait_first_ack(self, timeout: float = 30.0) -> None:
        """Wait until every writer has had a write acknowledged, so that a kill
        afterwards lands among running writes, whatever the machine's load
        (starting a Python process can take longer than the kill delay)."""
        deadline = time.monotonic() + timeout
        while not all(os.path.getsize(out.name) for out in self.outs):
            assert time.monotonic() < deadline, f"writers acknowledged nothing in {timeout} s"
            assert all(p.poll() is None for p in self.procs), "a writer exited early"
            time.sleep(0.02)

    def stop(self) -> dict[int, int]:
        """Kill and reap the writers; block -> last acknowledged generation."""
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in self.procs:
            p.wait(30)
        acked: dict[int, int] = {}
        for out in self.outs:
            out.seek(0)
            for line in out.read().splitlines():
                for word in line.split():
                    b, g = map(int, word.split(":"))
                    acked[b] = max(acked.get(b, 0), g)
            out.close()
        return acked


def check_blocks(path: Path, written_regions: list[int], acked: dict[int, int]) -> None:
    """Every block of a written region is zeros or one version written to it (never a
    mixture, never another block's), at least as new as the last acknowledged one;
    every other region is still zeros."""
    with open(path, "rb") as f:
        for r in range(NR_REGIONS):
            data = f.read(REGION)
            if r not in written_regions:
                assert data == bytes(REGION), f"region {r} was never written but is not zero"
                continue
            for i in range(REGION // BLOCK):
                b = r * (REGION // BLOCK) + i
                blk = data[i * BLOCK:(i + 1) * BLOCK]
                if blk == bytes(BLOCK):
                    assert b not in acked, f"block {b}: acknowledged write lost"
                    continue
                bno, gen = struct.unpack_from("<QQ", blk)
                assert blk == struct.pack("<QQ", bno, gen) * (BLOCK // 16), f"block {b} torn"
                assert bno == b, f"block {b} holds block {bno}'s data"
                assert gen >= acked.get(b, 0), f"block {b}: gen {gen} older than acked " \
                                               f"{acked[b]}"


def recover_and_check(rig: Rig, written: list[int], what: str) -> tuple[list[int], int, int]:
    """After a kill: decode the log, check it against the legs, restart, re-create,
    count, resync.  Returns (dirty regions, first in-sync count, regions where the legs
    differed before the resync)."""
    hdr = read_disk_log(rig.log, NR_REGIONS)
    assert (hdr.magic, hdr.version, hdr.nr_regions) == (MAGIC, 2, NR_REGIONS), hdr
    dirty = hdr.dirty
    assert set(dirty) <= set(written), f"{what}: dirty {dirty} outside the written {written}"
    differ = legs_differ(rig.l0, rig.l1)
    assert set(differ) <= set(dirty), f"{what}: legs differ in {differ}, not all dirty {dirty}"
    rig.restart()
    first = rig.create()
    assert first == NR_REGIONS - len(dirty), \
        f"{what}: first in-sync count {first}, the log has {len(dirty)} dirty regions"
    wait_in_sync(rig.d)
    return dirty, first, len(differ)


# -- tests -------------------------------------------------------------------------------


def test_kill9_at_random_points_resyncs_only_dirty_regions(rig: Rig, tmp_path: Path) -> None:
    # a fresh log: `nosync` makes every region clean, then a clean remove
    rig.create("nosync", pin=False)
    rig.remove_all()
    assert log_dirty(rig.log) == []
    # re-created in the default mode: nothing to resync
    assert rig.create() == NR_REGIONS

    figures = []
    all_written: set[int] = set()
    all_acked: dict[int, int] = {}
    # At least three kill points; more (up to eight) until two of them caught dirty
    # regions -- a kill between writes legitimately finds nothing dirty.
    for seed in (11, 22, 33, 44, 55, 66, 77, 88):
        if len(figures) >= 3 and sum(bool(f["dirty"]) for f in figures) >= 2:
            break
        rng = random.Random(seed)
        starts = sorted(rng.sample(range(0, NR_REGIONS - 2, 3), 3))  # 3 runs of 3 regions
        groups = [[s, s + 1, s + 2] for s in starts]
        written = [r for g in groups for r in g]
        all_written |= set(written)
        writers = Writers(rig.dev, seed, groups, tmp_path)
        writers.wait_first_ack()
        delay = rng.uniform(0.3, 1.2)
        time.sleep(delay)
        rig.kill()
        acked = writers.stop()
        assert acked, f"seed {seed}: no write was acknowledged in {delay:.2f} s"
        for b, g in acked.items():
            all_acked[b] = max(all_acked.get(b, 0), g)
        dirty, first, differed = recover_and_check(rig, written, f"seed {seed}")
        figures.append(dict(seed=seed, kill_after_s=round(delay, 2), acked_blocks=len(acked),
                            dirty=dirty, legs_differed=differed, first_in_sync=first))
        rig.remove_all()  # flushes the legs; the log becomes all clean
        assert log_dirty(rig.log) == []
        assert hashlib.sha256(rig.l0.read_bytes()).digest() == \
            hashlib.sha256(rig.l1.read_bytes()).digest(), f"seed {seed}: legs differ"
        check_blocks(rig.l0, sorted(all_written), all_acked)
        assert rig.create() == NR_REGIONS, "a clean remove left something to resync"
    print(f"\nkill -9 figures ({NR_REGIONS} regions, 9 written per kill):")
    for f in figures:
        print(f"  {f}")
    assert any(f["dirty"] for f in figures), f"no kill caught a dirty region: {figures}"


def test_kill9_with_writes_in_flight_resyncs_exactly_their_regions(rig: Rig) -> None:
    """Deterministic: leg 1 is suspended, so a write straddling regions 100 and 101 is
    stuck half done (on leg 0, not on leg 1) when the daemon is killed.  (One write:
    the kernel serialises direct-I/O writes to one FUSE file, so a second writer would
    wait behind the first before it reaches the daemon.)"""
    rig.create("nosync", pin=False)
    d = rig.d
    # first a completed write, and wait until its region is clean again: the daemon has
    # then done its post-resume passes (one flushes every leg, and must not meet a
    # suspended one)
    write_at(rig.dev, 0, b"warm" * 1024)
    wait_until(lambda: log_dirty(rig.log) == [], 20, what="a clean log")
    stuck = [100, 101]
    d.request("suspend", name="L1")
    first_block = 101 * (REGION // BLOCK) - 1
    procs = [subprocess.Popen(
        [sys.executable, "-c",
         "import os, struct, sys; b = int(sys.argv[2]); "
         "fd = os.open(sys.argv[1], os.O_RDWR); "
         "os.pwrite(fd, b''.join(struct.pack('<QQ', b + i, 7) * 256 for i in (0, 1)), "
         "b * 4096)",
         str(rig.dev), str(first_block)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_until(lambda: log_dirty(rig.log) == stuck, 20,
                   what=f"regions {stuck} dirty in the log")
        wait_until(lambda: legs_differ(rig.l0, rig.l1) == stuck, 20,
                   what=f"the writes on leg 0 of regions {stuck}")
        assert all(p.poll() is None for p in procs), "a write completed with leg 1 suspended"
        rig.kill()
    finally:
        if d.alive():  # failed before the kill: release the writes
            with contextlib.suppress(Exception):
                d.request("resume", name="L1")
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(30)
    dirty, first, _ = recover_and_check(rig, stuck, "in flight")
    assert dirty == stuck and first == NR_REGIONS - len(stuck)
    rig.remove_all()
    assert legs_differ(rig.l0, rig.l1) == []
    for b in (first_block, first_block + 1):  # resynced from the default leg: it had the write
        blk = read_at(rig.l1, b * BLOCK, BLOCK)
        assert blk == struct.pack("<QQ", b, 7) * (BLOCK // 16)


def test_clean_shutdown_leaves_nothing_to_resync(make_daemon: DaemonFactory,
                                                 tmp_path: Path) -> None:
    """Plain image legs: write, `dmuser shutdown`, and the log is all clean; a new
    daemon resyncs nothing."""
    d = make_daemon("d")
    for name in ("l0.img", "l1.img"):
        make_image(d.dir / name, SIZE)
    make_image(d.dir / "log.img", 1 * MiB)
    table = f"0 {N} mirror disk 2 log.img {REGION_SECTORS} 2 l0.img 0 l1.img 0"
    d.create("m", table)
    wait_in_sync(d)  # a fresh log: full resync first
    written = [5, 6, 77, 200]
    writers = Writers(d.path("m"), 5, [written[:2], written[2:]], tmp_path)
    writers.wait_first_ack()
    time.sleep(0.5)
    d.cli("shutdown")
    assert d.wait() == 0
    acked = writers.stop()
    assert acked
    hdr = read_disk_log(d.dir / "log.img", NR_REGIONS)
    assert (hdr.magic, hdr.nr_regions, hdr.dirty) == (MAGIC, NR_REGIONS, [])
    assert legs_differ(d.dir / "l0.img", d.dir / "l1.img") == []
    check_blocks(d.dir / "l0.img", written, acked)
    d.start()
    d.create("m", table)
    assert in_sync_count(d) == (NR_REGIONS, NR_REGIONS)
    d.cli("remove", "m")


EXT4_WRITER = r"""
import hashlib, os, random, sys
root, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
i = 0
try:
    while True:
        data = rng.randbytes(rng.randint(1000, 300000))
        name = f"f{i:05d}"
        path = os.path.join(root, f"d{i % 5}", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        print(f"d{i % 5}/{name} {hashlib.sha256(data).hexdigest()}", flush=True)
        i += 1
except OSError:
    pass
"""


@pytest.fixture
def kernel_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon clears regions at the next pass, as the kernel (no CLEAN_DELAY), so
    the dirty count after a crash measures the writes in flight, not the last 5 s."""
    monkeypatch.setenv("DMUSER_MIRROR_CLEAN_DELAY", "0")


@pytest.mark.root
@pytest.mark.loop
@pytest.mark.mkfs
def test_kill9_under_ext4_then_recovery_is_fsck_clean(kernel_clean: None, rig: Rig,
                                                      tmp_path: Path) -> None:
    d = rig.d
    rig.create("nosync", pin=False)
    mkfs_ext4(rig.dev, extended="nodiscard,lazy_itable_init=0")
    mnt = rig.dir / "fsmnt"
    loop = d.losetup(rig.dev)
    d.mount(loop, mnt)
    out = open(tmp_path / "ext4-writer.out", "w+")  # noqa: SIM115
    writer = subprocess.Popen([sys.executable, "-c", EXT4_WRITER, str(mnt), "4"],
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: os.path.getsize(tmp_path / "ext4-writer.out") > 2000, 30,
                   what="the ext4 writer to get going")
        time.sleep(random.Random(4).uniform(0.2, 0.8))
        rig.kill()
    finally:
        writer.kill()
        writer.wait(60)
        d.unmount_and_detach()
    out.seek(0)
    acked = dict(line.split() for line in out.read().splitlines() if len(line.split()) == 2)
    out.close()
    assert acked

    hdr = read_disk_log(rig.log, NR_REGIONS)
    differ = legs_differ(rig.l0, rig.l1)
    assert set(differ) <= set(hdr.dirty), (differ, hdr.dirty)
    dirty, first, _ = recover_and_check(rig, list(range(NR_REGIONS)), "ext4")
    print(f"\next4 kill -9: {len(acked)} files acknowledged, {len(dirty)} dirty regions "
          f"{dirty}, legs differed in {len(differ)}, first in-sync {first}/{NR_REGIONS}")
    assert len(dirty) < NR_REGIONS // 4, dirty

    # the journal replays on mount; every fsync'd file is there; fsck is clean
    with d.loop_mounted(rig.dev, mnt):
        for rel, digest in acked.items():
            assert hashlib.sha256((mnt / rel).read_bytes()).hexdigest() == digest, rel
    fsck_clean(rig.dev)
    rig.remove_all()
    assert log_dirty(rig.log) == []
    assert legs_differ(rig.l0, rig.l1) == []
