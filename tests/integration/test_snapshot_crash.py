"""Crash consistency of snapshots: ``kill -9`` of the daemon during concurrent writes.

Writers (subprocesses) write self-describing 4 KiB blocks with ``O_DIRECT``
to the origin device (``snapshot-origin``) and to the snapshot devices at the
same time, with an ``fsync`` after every burst of 1 to ``FSYNC_EVERY``
writes (origin writes are then acknowledged before their copy-outs are
durable, and held in the daemon until a group commit: ``held.py``).  Each
writer owns its blocks, so its writes to a block are ordered; it logs every
write before issuing it (``I``) and each completed ``fsync`` (``A``: every
write logged before it is durable), to a file outside the FUSE mount.  At a
seeded random moment the daemon gets SIGKILL.  Then, before anything is
re-created:

* ``dmuser cow check`` passes on every COW (the metadata walk: no record names
  a chunk twice, past the device, or a metadata area);

and after a restart on the same paths (``serve`` cleans the stale mount and
socket) and re-creating the same tables:

* (b) the origin holds, per block, the last write covered by a completed
  ``fsync`` -- or one of the writes to that block issued after it;
* (a) each snapshot equals the origin as it was when the snapshot was taken
  plus the snapshot's own writes, with the same rule.  The COW images start
  out filled with garbage, so an exception pointing at a chunk whose copy
  never landed would show up as a block nobody wrote.

What was read is then taken as the new reference, and the next round starts
(a second snapshot is taken on the way).  The last kill point falls in the
middle of a merge: the restarted daemon loads ``snapshot-merge`` from the COW
alone, finishes the merge, and the origin then equals the merged snapshot while
the other snapshot is untouched.

A second test puts ext4 on the snapshot: journaled file writes with fsync and
``syncfs`` while raw writes to the origin keep copying chunks out, then the kill;
after the restart the journal replays on mount, every fsync'd file is intact
and ``e2fsck -fn`` is clean.

The seed is ``$DMUSER_CRASH_SEED`` (default fixed); the first test's kill
points are ``$DMUSER_CRASH_POINTS`` (default 10, about 50 s; the on-demand tier
runs 50 or more); the kill points executed are printed (``-s`` shows them).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.daemon import Daemon, DaemonFactory, run_dmuser
from support.data import make_image
from support.system import detach_loop, loops_under, umount, wait_until

MiB = 1 << 20
SECTOR = 512
BLOCK = 4096

SEED = int(os.environ.get("DMUSER_CRASH_SEED", "20240917"))
#: kill points of test_kill9_during_origin_and_snapshot_writes (rounds + the merge)
POINTS = max(2, int(os.environ.get("DMUSER_CRASH_POINTS", "10")))
#: a writer fsyncs after every burst of 1..FSYNC_EVERY writes
FSYNC_EVERY = 6

pytestmark = [pytest.mark.fuse, pytest.mark.slow, pytest.mark.timeout(180 + 12 * POINTS)]

#: kill points executed by this module (reported at the end of each test)
KILLS: list[str] = []


# -- the writers -------------------------------------------------------------------------

WRITER = r"""
import mmap, os, random, sys
dev, log, tag, seed, lo, hi, seq, every = sys.argv[1:9]
seed, lo, hi, seq, every = int(seed), int(lo), int(hi), int(seq), int(every)
BLOCK = 4096
rng = random.Random(seed)
buf = mmap.mmap(-1, 4 * BLOCK)           # page aligned, as O_DIRECT wants
logfd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
burst = rng.randint(1, every)
while True:
    n = rng.choice((1, 1, 1, 2, 3, 4))
    blk = rng.randrange(lo, hi - n + 1)
    for i in range(n):
        buf[i * BLOCK:(i + 1) * BLOCK] = f"{tag}:{blk + i}:{seq}:".encode().ljust(32, b".") * 128
    os.write(logfd, f"I {blk} {n} {seq}\n".encode())
    try:
        os.pwrite(fd, memoryview(buf)[:n * BLOCK], blk * BLOCK)
        burst -= 1
        if not burst:
            os.fsync(fd)
            os.write(logfd, f"A {seq}\n".encode())
            burst = rng.randint(1, every)
    except OSError as exc:
        os.write(logfd, f"E {seq} {exc.errno}\n".encode())
        break
    seq += 1
"""


def block_data(tag: str, blk: int, seq: int) -> bytes:
    return f"{tag}:{blk}:{seq}:".encode().ljust(32, b".") * (BLOCK // 32)


def describe(data: bytes) -> str:
    """What a block holds, for error messages."""
    head = data[:32]
    if data == head * (BLOCK // 32):
        return repr(head.rstrip(b".").decode(errors="replace"))
    return f"unrecognised data {data[:16].hex()}..."


class Writer:
    def __init__(self, dev: Path, log: Path, tag: str, seed: int, lo: int, hi: int,
                 seq: int, every: int = FSYNC_EVERY) -> None:
        self.log, self.tag = log, tag
        log.write_bytes(b"")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(dev), str(log), tag, str(seed), str(lo), str(hi),
             str(seq), str(every)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)

    def started(self) -> bool:
        return b"\nA " in b"\n" + self.log.read_bytes()

    def reap(self) -> None:
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        err = self.proc.stderr.read().decode() if self.proc.stderr else ""
        if self.proc.stderr:
            self.proc.stderr.close()
        assert self.proc.returncode in (0, -signal.SIGKILL), f"writer {self.tag}: {err}"

    def outcome(self) -> tuple[dict[int, int], dict[int, list[int]], int]:
        """(block -> seq of the last write covered by a completed fsync,
        block -> seqs of the writes after it (acknowledged or in flight),
        #writes covered by a completed fsync)."""
        acked: dict[int, int] = {}
        since: list[tuple[int, int, int]] = []  # writes after the last completed fsync
        nacked = 0
        for line in self.log.read_text().splitlines():
            w = line.split()
            if w[0] == "I":
                since.append((int(w[1]), int(w[2]), int(w[3])))
            elif w[0] == "A":
                assert since and since[-1][2] == int(w[1]), line
                for blk, n, seq in since:
                    for b in range(blk, blk + n):
                        acked[b] = seq
                nacked += len(since)
                since = []
            # "E": the write failed (the daemon died): it stays in doubt
        maybe: dict[int, list[int]] = {}
        for blk, n, seq in since:
            for b in range(blk, blk + n):
                maybe.setdefault(b, []).append(seq)
        return acked, maybe, nacked


class Model:
    """What a device must hold, block by block (the data itself)."""

    def __init__(self, name: str, blocks: list[bytes]) -> None:
        self.name = name
        self.blocks = blocks
        #: block -> alternatives accepted besides ``blocks[b]`` after this round
        self.accept: dict[int, list[bytes]] = {}

    def apply(self, w: Writer) -> int:
        acked, maybe, nacked = w.outcome()
        for b, seq in acked.items():
            self.blocks[b] = block_data(w.tag, b, seq)
        for b, seqs in maybe.items():
            self.accept.setdefault(b, []).extend(block_data(w.tag, b, seq) for seq in seqs)
        return nacked

    def check_and_resolve(self, path: Path) -> int:
        """Compare the device with the model; adopt what it holds.  #blocks in doubt."""
        with open(path, "rb") as f:
            data = f.read()
        assert len(data) == len(self.blocks) * BLOCK, (self.name, len(data))
        bad = []
        for b, want in enumerate(self.blocks):
            got = data[b * BLOCK:(b + 1) * BLOCK]
            if got == want:
                continue
            if got in self.accept.get(b, ()):
                self.blocks[b] = got
                continue
            bad.append(f"block {b}: holds {describe(got)}, expected {describe(want)}"
                       + (f" or {[describe(x) for x in self.accept[b]]}"
                          if b in self.accept else ""))
        doubt = len(self.accept)
        self.accept = {}
        assert not bad, f"{self.name}: {len(bad)} wrong blocks:\n" + "\n".join(bad[:20])
        return doubt


# -- the rig -----------------------------------------------------------------------------


class Snap:
    def __init__(self, name: str, cow: Path, chunk: int, model: Model) -> None:
        self.name, self.cow, self.chunk, self.model = name, cow, chunk, model

    def table(self, nr: int, target: str = "snapshot") -> str:
        return f"0 {nr} {target} origin.img {self.cow.name} P {self.chunk}"


class Rig:
    def __init__(self, factory: DaemonFactory, size: int, cow_size: int) -> None:
        self.d: Daemon = factory("d")
        self.dir = self.d.dir
        self.size, self.nr, self.nblk = size, size // SECTOR, size // BLOCK
        self.cow_size = cow_size
        self.image = self.dir / "origin.img"
        self.snaps: list[Snap] = []
        self.origin_table = f"0 {self.nr} snapshot-origin origin.img"
        self.rng = random.Random(SEED)

    def new_cow(self, name: str) -> Path:
        """A COW image full of garbage except its (zero) header chunk."""
        path = self.dir / name
        rnd = random.Random(f"{SEED}-{name}")
        with open(path, "wb") as f:
            f.write(bytes(64 * 1024))
            left = self.cow_size - 64 * 1024
            while left > 0:
                n = min(left, MiB)
                f.write(rnd.randbytes(n))
                left -= n
        return path

    def take_snapshot(self, name: str, chunk: int, origin: Model) -> Snap:
        snap = Snap(name, self.new_cow(f"{name}.cow"), chunk, Model(name, list(origin.blocks)))
        self.d.request("suspend", name="origin")
        try:
            self.d.cli("create", name, "--table", snap.table(self.nr))
        finally:
            self.d.request("resume", name="origin")
        self.snaps.append(snap)
        return snap

    def kill(self, what: str) -> None:
        self.d.signal(signal.SIGKILL)
        self.d.wait()
        KILLS.append(what)

    def check_cows(self) -> None:
        for s in self.snaps:
            res = run_dmuser("cow", "check", str(s.cow), check=False)
            assert res.returncode == 0, f"cow check {s.cow}:\n{res.stdout}{res.stderr}"

    def restart(self, origin_table: str | None = None) -> None:
        """New daemon on the same paths; snapshots first, then the origin (LVM's order)."""
        self.d.start()
        for s in self.snaps:
            self.d.cli("create", s.name, "--table", s.table(self.nr))
        self.d.cli("create", "origin", "--table", origin_table or self.origin_table)

    def usage(self, name: str) -> tuple[int, int]:
        line = self.d.request("status", name=name)[name][0]  # type: ignore[index]
        words = line.split()
        return int(words[3].split("/")[0]), int(words[4])

    def drop_mounts(self) -> None:
        """After a kill: unmount file systems on the dead devices, detach their loops."""
        d = self.d
        for mp in list(reversed(d.fs_mounts)):
            umount(mp)
        d.fs_mounts.clear()
        for dev in dict.fromkeys(d.loops + loops_under(self.dir)):
            detach_loop(dev)
        d.loops.clear()


@pytest.fixture
def rig_factory(make_daemon: DaemonFactory):  # type: ignore[no-untyped-def]
    made: list[Rig] = []

    def make(size: int, cow_size: int) -> Rig:
        r = Rig(make_daemon, size, cow_size)
        made.append(r)
        return r

    yield make
    for r in made:  # snapshots hold the origin image; remove them before the daemon stops
        if r.d.alive():
            for name in [s.name for s in r.snaps] + ["origin"]:
                with contextlib.suppress(Exception):
                    r.d.request("resume", name=name)
            r.drop_mounts()


def run_writers(rig: Rig, writers: list[Writer], delay: float, what: str) -> None:
    """Let the writers get going, wait ``delay`` more, kill the daemon, reap them."""
    try:
        wait_until(lambda: all(w.started() or w.proc.poll() is not None for w in writers),
                   30, what="the writers to get going")
        time.sleep(delay)
        rig.kill(what)
    finally:
        for w in writers:
            w.reap()


# -- tests -------------------------------------------------------------------------------


def test_kill9_during_origin_and_snapshot_writes(rig_factory,  # type: ignore[no-untyped-def]
                                                 tmp_path: Path) -> None:
    rig: Rig = rig_factory(16 * MiB, 20 * MiB)
    d, rng = rig.d, rig.rng
    base = make_image(rig.image, rig.size, seed=f"{SEED}-base")
    origin = Model("origin", [base[b * BLOCK:(b + 1) * BLOCK] for b in range(rig.nblk)])
    d.cli("create", "origin", "--table", rig.origin_table)
    rig.take_snapshot("s1", 8, origin)
    half = rig.nblk // 2
    stats = []
    for rnd in range(POINTS - 1):
        if rnd == 2:
            rig.take_snapshot("s2", 16, origin)
        seq = (rnd + 1) * 1_000_000
        writers = [Writer(d.path("origin"), tmp_path / f"o{i}-{rnd}.log", f"o{i}",
                          rng.randrange(1 << 30), lo, hi, seq)
                   for i, (lo, hi) in enumerate(((0, half), (half, rig.nblk)))]
        for s in rig.snaps:
            writers.append(Writer(d.path(s.name), tmp_path / f"{s.name}-{rnd}.log", s.name,
                                  rng.randrange(1 << 30), 0, rig.nblk, seq))
        delay = rng.uniform(0.1, 0.9)
        run_writers(rig, writers, delay, f"round {rnd}: {delay:.2f} s into "
                                         f"{len(writers)} writers")
        acks = {w.tag: (origin if w.tag.startswith("o") else
                        next(s.model for s in rig.snaps if s.name == w.tag)).apply(w)
                for w in writers}
        rig.check_cows()
        rig.restart()
        doubt = {m.name: m.check_and_resolve(d.path(m.name))
                 for m in [origin] + [s.model for s in rig.snaps]}
        assert rig.image.read_bytes() == b"".join(origin.blocks)
        stats.append(f"round {rnd}: kill after {delay:.2f} s, fsync'd writes {acks}, "
                     f"blocks in doubt {doubt}, usage "
                     f"{ {s.name: rig.usage(s.name) for s in rig.snaps} }")

    # last kill point: in the middle of merging s1 back (LVM's way), with s2 written to
    s1, s2 = rig.snaps
    d.request("suspend", name="s1")
    d.request("suspend", name="origin")
    d.cli("reload", "origin", "--table", s1.table(rig.nr, "snapshot-merge"))
    start, meta = rig.usage("s1")
    w = Writer(d.path("s2"), tmp_path / "s2-merge.log", "s2", rng.randrange(1 << 30),
               0, rig.nblk, 9_000_000)
    try:
        wait_until(w.started, 30, what="the s2 writer")
        frac = rng.uniform(0.1, 0.6)
        d.request("resume", name="origin")
        wait_until(lambda: start - rig.usage("origin")[0] >= frac * (start - meta), 60,
                   interval=0.002, what="merge progress")
        left = rig.usage("origin")[0]
        rig.kill(f"merge of s1 at {frac:.0%} ({left}/{start} sectors left)")
    finally:
        w.reap()
    s2.model.apply(w)
    res = run_dmuser("cow", "check", str(s1.cow), check=False)
    assert res.returncode == 0, res.stdout
    assert "exceptions:          0" not in res.stdout, "the merge was not interrupted"
    rig.check_cows()
    rig.snaps.remove(s1)
    rig.restart(s1.table(rig.nr, "snapshot-merge"))
    d.cli("status", "origin", "--watch", "--until-complete", "--interval", "0.1", timeout=90)
    alloc, meta = rig.usage("origin")
    assert alloc == meta == 16
    s1.model.name = "origin after the merge"
    s1.model.check_and_resolve(d.path("origin"))
    assert rig.image.read_bytes() == b"".join(s1.model.blocks)
    s2.model.check_and_resolve(d.path("s2"))
    res = run_dmuser("cow", "check", str(s1.cow), check=False)
    assert res.returncode == 0 and "exceptions:          0" in res.stdout, res.stdout
    d.cli("remove", "s2")
    d.cli("remove", "origin")
    print("\nsnapshot crash test, seed", SEED, "\n" + "\n".join(stats))
    print(f"kill points executed: {len(KILLS)}: " + "; ".join(KILLS))
    assert len(KILLS) >= POINTS


EXT4_WRITER = r"""
import ctypes, hashlib, os, random, sys
mnt, log, seed, nfiles = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
logfd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.makedirs(os.path.join(mnt, "w"), exist_ok=True)
for i in range(nfiles):
    rel = f"w/f{seed}-{i}"
    data = rng.randbytes(rng.choice((512, 4096, 20000, 100000, 300000)))
    fd = os.open(os.path.join(mnt, rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    os.write(logfd, f"{rel} {hashlib.sha256(data).hexdigest()}\n".encode())
fd = os.open(mnt, os.O_RDONLY)        # syncfs, not sync: other file systems may be frozen
assert ctypes.CDLL(None, use_errno=True).syncfs(fd) == 0, ctypes.get_errno()
os.close(fd)
os.write(logfd, b"SYNCED\n")
"""


@pytest.mark.root
@pytest.mark.loop
@pytest.mark.mkfs
def test_kill9_with_ext4_on_the_snapshot(rig_factory,  # type: ignore[no-untyped-def]
                                         tmp_path: Path) -> None:
    rig: Rig = rig_factory(32 * MiB, 40 * MiB)
    d, rng = rig.d, random.Random(SEED + 1)
    make_image(rig.image, rig.size)
    d.cli("create", "origin", "--table", rig.origin_table)
    res = subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0",
                          "-b", "4096", str(d.path("origin"))],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    image = rig.image.read_bytes()
    origin = Model("origin", [image[b * BLOCK:(b + 1) * BLOCK] for b in range(rig.nblk)])
    snap = rig.take_snapshot("snap", 8, origin)
    mnt = rig.dir / "smnt"
    acked: dict[str, str] = {}
    kills_before = len(KILLS)
    for rnd in range(2):
        d.mount(d.losetup(d.path("snap")), mnt)
        log = tmp_path / f"ext4-{rnd}.log"
        fs_writer = subprocess.Popen([sys.executable, "-c", EXT4_WRITER, str(mnt), str(log),
                                      str(rnd), "40"], stdin=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        # raw writes to the origin keep copying chunks out into the same COW
        ow = Writer(d.path("origin"), tmp_path / f"oext4-{rnd}.log", "o",
                    rng.randrange(1 << 30), 0, rig.nblk, (rnd + 1) * 1_000_000)
        try:
            assert fs_writer.stderr is not None
            assert fs_writer.wait(60) == 0, fs_writer.stderr.read().decode()
            wait_until(ow.started, 30, what="the origin writer")
            delay = rng.uniform(0.05, 0.5)
            time.sleep(delay)
            rig.kill(f"ext4 round {rnd}: {delay:.2f} s after sync, origin writes running")
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                fs_writer.wait(10)
            if fs_writer.returncode is None:
                fs_writer.kill()
                fs_writer.wait()
            if fs_writer.stderr:
                fs_writer.stderr.close()
            ow.reap()
            rig.drop_mounts()
        lines = log.read_text().splitlines()
        assert lines[-1] == "SYNCED", lines[-3:]
        acked.update(line.split() for line in lines[:-1])
        origin.apply(ow)
        rig.check_cows()
        rig.restart()
        origin.check_and_resolve(d.path("origin"))
        # the journal replays on mount; every fsync'd file is there; fsck is clean
        d.mount(d.losetup(d.path("snap")), mnt)
        for rel, digest in acked.items():
            assert hashlib.sha256((mnt / rel).read_bytes()).hexdigest() == digest, rel
        d.umount(mnt)
        d.detach(d.loops[-1])
        res = subprocess.run(["e2fsck", "-fn", str(d.path("snap"))], capture_output=True,
                             text=True, timeout=120)
        assert res.returncode == 0, f"e2fsck: exit {res.returncode}\n{res.stdout}{res.stderr}"
    assert snap.model.name == "snap"
    d.cli("remove", "snap")
    d.cli("remove", "origin")
    print(f"\next4 on the snapshot: {len(acked)} fsync'd files; kill points: "
          + "; ".join(KILLS[kills_before:]))
    print(f"kill points executed so far: {len(KILLS)}")
