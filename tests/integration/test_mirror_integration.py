"""The mirror target (dm-raid1) on a real daemon: legs, resync, leg failure, bad tables.

Legs are image files, or dmuser devices stacked on image files (``linear``
``L0``...), so that a leg can fail by a live table switch of the leg device to
``error`` (reload + resume), or by ``flakey`` entering its down interval.  The
resync can be paused deterministically by suspending the source leg device:
the copy waits at that device's door.

The ``d`` fixture tears each test's devices down with
:meth:`support.daemon.Daemon.unstack` before the daemon fixture's teardown.  The
daemon's shutdown quiesces stacked devices top-down, but a test failing with a
leg device still suspended (a source leg paused for the resync, say) would
leave the shutdown's final flush of the mirror above it waiting; ``unstack``
resumes every device first, then unmounts, detaches and removes users first.

Status words (dm-spec §5.2): ``<#legs> <leg>... <in-sync>/<regions> 1 <health>
<log status>``, e.g. ``2 /m/L0 /m/L1 128/128 1 AA 3 disk /d/log.img A``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from support.daemon import Daemon
from support.data import assert_bytes, make_image, pattern, read_at, sha, verify_at, write_at
from support.oracles import MAGIC, read_disk_log
from support.system import Io, fsck_clean, mkfs_ext4, wait_until

MiB = 1 << 20
SECTOR = 512

pytestmark = [pytest.mark.fuse]


# -- helpers ---------------------------------------------------------------------------


class MirrorStatus(NamedTuple):
    legs: list[str]
    in_sync: int
    regions: int
    health: str
    log: list[str]


def mirror_status(d: Daemon, name: str) -> MirrorStatus:
    data = d.request("status", name=name)
    assert isinstance(data, dict), data
    words = data[name][0].split()
    assert words[2] == "mirror", words
    n = int(words[3])
    done, total = words[4 + n].split("/")
    assert words[5 + n] == "1", words
    return MirrorStatus(words[4:4 + n], int(done), int(total), words[6 + n], words[7 + n:])


def wait_in_sync(d: Daemon, name: str, timeout: float = 60.0) -> list[int]:
    """Poll the status until every region is in sync; the in-sync counts seen."""
    seen: list[int] = []

    def done() -> bool:
        st = mirror_status(d, name)
        if not seen or seen[-1] != st.in_sync:
            seen.append(st.in_sync)
        return st.in_sync == st.regions

    wait_until(done, timeout, interval=0.02, what=f"{name} in sync (counts seen {seen})")
    return seen


def wait_health(d: Daemon, name: str, leg: int, char: str, timeout: float = 20.0) -> None:
    wait_until(lambda: mirror_status(d, name).health[leg] == char, timeout, interval=0.02,
               what=f"{name} leg {leg} health {char!r} "
                    f"(status {d.cli('status', name).stdout.strip()})")


def switch(d: Daemon, name: str, table: str) -> None:
    """Live table switch of ``name`` (reload + resume), in process (fast)."""
    d.request("reload", name=name, table=table)
    d.request("resume", name=name)


@pytest.fixture
def d(daemon: Daemon) -> Iterator[Daemon]:
    yield daemon
    daemon.unstack()


def linear_legs(d: Daemon, size: int) -> None:
    """Zeroed leg images l0.img and l1.img of ``size`` bytes, a 1 MiB log.img, and the
    leg devices L0 and L1 (``linear`` over the images)."""
    make_image(d.dir / "l0.img", size)
    make_image(d.dir / "l1.img", size)
    make_image(d.dir / "log.img", 1 * MiB)
    for i in range(2):
        d.create(f"L{i}", f"0 {size // SECTOR} linear l{i}.img 0")


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# -- legs receive every write ----------------------------------------------------------


#: (byte offset, length): aligned, crossing regions (64 KiB), unaligned (read-modify-write),
#: large, the last sector
WRITES = [(0, 4096), (64 * 1024 - 512, 1024), (100, 3000), (3 * MiB, 1 * MiB + 4096),
          (5 * MiB + 7, 70000), (8 * MiB - 512, 512)]


@pytest.mark.parametrize("nlegs", [2, 3])
def test_writes_land_identically_on_every_leg(d: Daemon, nlegs: int) -> None:
    size, region = 8 * MiB, 128  # 128 regions of 64 KiB
    n = size // SECTOR
    offsets = [0, 2048, 0][:nlegs]  # leg 1 starts 1 MiB into its image
    imgs = [d.dir / f"l{i}.img" for i in range(nlegs)]
    for img, off in zip(imgs, offsets, strict=True):
        make_image(img, size + off * SECTOR)
    log = d.dir / "log.img"
    make_image(log, 1 * MiB)
    legs = " ".join(f"{img} {off}" for img, off in zip(imgs, offsets, strict=True))
    table = f"0 {n} mirror disk 2 {log} {region} {nlegs} {legs}"
    dev = d.create("m", table)
    assert d.table_lines("m") == [table]
    wait_in_sync(d, "m")  # a fresh log: every region is resynced (zeros onto zeros)

    expect = bytearray(size)
    for i, (off, length) in enumerate(WRITES):
        data = pattern(f"w{nlegs}-{i}", length)
        write_at(dev, off, data)
        expect[off:off + length] = data
    verify_at(dev, 0, bytes(expect), "read through the mirror")
    for img, off in zip(imgs, offsets, strict=True):
        assert_bytes(read_at(img, off * SECTOR, size), bytes(expect), f"leg {img.name}")
    if nlegs >= 2:  # the bytes before leg 1's offset are not the mirror's
        assert read_at(imgs[1], 0, offsets[1] * SECTOR) == bytes(offsets[1] * SECTOR)

    st = mirror_status(d, "m")
    assert (st.in_sync, st.regions, st.health) == (128, 128, "A" * nlegs)
    assert st.log == ["3", "disk", str(log), "A"]
    assert st.legs == [str(img) for img in imgs]

    d.cli("remove", "m")
    hdr = read_disk_log(log, 128)
    assert (hdr.magic, hdr.version, hdr.nr_regions) == (MAGIC, 2, 128)
    assert hdr.dirty == [], "regions left dirty after a clean remove"


def test_core_log_mirror_writes_and_resyncs(d: Daemon) -> None:
    size = 4 * MiB
    a = make_image(d.dir / "a.img", size, seed="core-a")
    make_image(d.dir / "b.img", size, seed="core-b")
    table = f"0 {size // SECTOR} mirror core 1 256 2 a.img 0 b.img 0"
    dev = d.create("m", table)
    wait_in_sync(d, "m")  # core default: everything is resynced on every load
    assert read_at(d.dir / "b.img", 0, size) == a
    data = pattern("core-w", 300000)
    write_at(dev, 12345, data)
    for img in ("a.img", "b.img"):
        verify_at(d.dir / img, 12345, data, img)
    st = mirror_status(d, "m")
    assert st.log == ["1", "core"] and st.health == "AA"


# -- resync ------------------------------------------------------------------------------


@pytest.mark.parametrize("nlegs", [2, 3])
def test_resync_with_sync_copies_the_default_leg(d: Daemon, nlegs: int) -> None:
    size, region = 8 * MiB, 128
    n = size // SECTOR
    imgs = [d.dir / f"l{i}.img" for i in range(nlegs)]
    leg0 = make_image(imgs[0], size, seed="leg0")
    for i, img in enumerate(imgs[1:], 1):
        if i == 1:
            make_image(img, size)
        else:
            make_image(img, size, seed=f"leg{i}")
    log = d.dir / "log.img"
    make_image(log, 1 * MiB)
    legs = " ".join(f"{img} 0" for img in imgs)
    dev = d.create("m", f"0 {n} mirror disk 3 {log} {region} sync {nlegs} {legs}")
    # during the resync, reads are served from the default leg
    verify_at(dev, 0, leg0, "read through the mirror during the resync")
    counts = wait_in_sync(d, "m")
    print("in-sync counts seen during the resync:", counts)
    assert counts == sorted(counts) and counts[-1] == 128, counts
    for img in imgs:
        assert_bytes(read_at(img, 0, size), leg0, f"leg {img.name} after the resync")
    assert mirror_status(d, "m").health == "A" * nlegs

    # a clean remove leaves every region clean: re-created without `sync`, nothing to do
    d.cli("remove", "m")
    assert read_disk_log(log, 128).dirty == []
    d.create("m", f"0 {n} mirror disk 2 {log} {region} {nlegs} {legs}")
    assert mirror_status(d, "m").in_sync == 128


def test_nosync_is_in_sync_at_once_and_copies_nothing(d: Daemon) -> None:
    size = 8 * MiB
    leg0 = make_image(d.dir / "l0.img", size, seed="ns0")
    make_image(d.dir / "l1.img", size)
    make_image(d.dir / "log.img", 1 * MiB)
    table = f"0 {size // SECTOR} mirror disk 3 {d.dir}/log.img 128 nosync 2 " \
            f"{d.dir}/l0.img 0 {d.dir}/l1.img 0"
    dev = d.create("m", table)
    out = d.cli("status", "m").stdout.split()
    assert out[6] == "128/128", out
    assert d.table_lines("m") == [table]
    time.sleep(0.3)
    assert read_at(d.dir / "l1.img", 0, size) == bytes(size), "nosync copied something"
    verify_at(dev, 0, leg0, "reads come from the default leg")
    data = pattern("ns-w", 65536)
    write_at(dev, 65536, data)
    verify_at(d.dir / "l1.img", 65536, data)
    verify_at(d.dir / "l0.img", 65536, data)


# -- leg failure -----------------------------------------------------------------------


def test_leg_failure_during_resync_then_repair(d: Daemon) -> None:
    """3 legs, handle_errors; the third leg turns into `error` while the resync is
    paused (its source leg suspended).  Every copy then fails on it (health S), no region
    gets in sync, writes are held (handle_errors), and a suspend fails them (EIO, as the
    kernel's flush suspend).  Repair as dmeventd would: reload the mirror without the
    dead leg; the dirty log makes the new table resync everything onto the good legs."""
    size, region = 8 * MiB, 128
    n = size // SECTOR
    leg0 = make_image(d.dir / "l0.img", size, seed="rs0")
    make_image(d.dir / "l1.img", size)
    make_image(d.dir / "l2.img", size)
    make_image(d.dir / "log.img", 1 * MiB)
    for i in range(3):
        d.create(f"L{i}", f"0 {n} linear l{i}.img 0")
    d.request("suspend", name="L0")  # the resync source: copies wait at its door
    dev = d.create("m", f"0 {n} mirror disk 3 log.img {region} sync 3 L0 0 L1 0 L2 0 "
                        f"1 handle_errors")
    st = mirror_status(d, "m")
    assert (st.in_sync, st.health) == (0, "AAA"), st
    switch(d, "L2", f"0 {n} error")
    d.request("resume", name="L0")

    wait_health(d, "m", 2, "S")
    time.sleep(0.5)  # the remaining copies fail too
    st = mirror_status(d, "m")
    assert (st.in_sync, st.health) == (0, "AAS"), st
    verify_at(dev, 0, leg0, "reads from the default leg while degraded")

    # with handle_errors a write that cannot reach every leg is held...
    data = pattern("held", 8192)
    writer = Io(lambda: write_at(dev, 5 * 65536, data))
    assert not writer.done.wait(1.0), f"write not held: {writer.error!r}"

    # ...until userspace replaces the table: the suspend fails it (no noflush suspend)
    switch(d, "m", f"0 {n} mirror disk 2 log.img {region} 2 L0 0 L1 0 1 handle_errors")
    assert writer.done.wait(20), "held write not released by the suspend"
    assert isinstance(writer.error, OSError) and writer.error.errno == errno.EIO, writer.error
    counts = wait_in_sync(d, "m")  # every region was still dirty in the log: all copied
    assert counts == sorted(counts), counts
    assert mirror_status(d, "m").health == "AA"
    assert_bytes(read_at(d.dir / "l1.img", 0, size), leg0, "leg 1 after the repair")
    assert_bytes(read_at(d.dir / "l0.img", 0, size), leg0, "leg 0 after the repair")
    write_at(dev, 5 * 65536, data)
    verify_at(d.dir / "l1.img", 5 * 65536, data)


def write_files(root: Path, first: int, count: int, on_file=None) -> dict[str, str]:  # type: ignore[no-untyped-def]
    sums = {}
    for i in range(first, first + count):
        rel = f"d{i % 4}/f{i}"
        data = pattern(f"fs{i}", 150_000 + 7919 * i)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
            if i % 3 == 0:
                os.fsync(f.fileno())
        sums[rel] = hashlib.sha256(data).hexdigest()
        if on_file is not None:
            on_file(i)
    return sums


def check_files(root: Path, sums: dict[str, str]) -> None:
    for rel, digest in sums.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, rel


@pytest.mark.root
@pytest.mark.loop
@pytest.mark.mkfs
@pytest.mark.slow
def test_default_leg_failure_under_an_ext4_workload(d: Daemon) -> None:
    """ext4 on a 2-leg mirror (handle_errors keep_log); the default leg turns into
    `error` in the middle of writing files.  The default moves to the other leg,
    writes keep succeeding, status shows D for the dead leg, every file reads back,
    and the file system is clean (on the mirror and on the surviving leg's image)."""
    size = 48 * MiB
    n = size // SECTOR
    linear_legs(d, size)
    dev = d.create("m", f"0 {n} mirror disk 3 log.img 1024 nosync 2 L0 0 L1 0 "
                        f"2 handle_errors keep_log")
    mkfs_ext4(dev)
    mnt = d.dir / "fsmnt"

    def fail_leg0(i: int) -> None:
        if i == 10:
            switch(d, "L0", f"0 {n} error")

    with d.loop_mounted(dev, mnt):
        sums = write_files(mnt, 0, 30, fail_leg0)
        os.sync()
        wait_health(d, "m", 0, "D")
        st = mirror_status(d, "m")
        assert st.health == "DA", st
        # the writes after the failure reached leg 1 only: their regions are out of sync
        assert st.in_sync < st.regions, st
        sums.update(write_files(mnt, 30, 5))
        os.sync()
        drop_caches()
        check_files(mnt, sums)
    fsck_clean(dev)
    fsck_clean(d.dir / "l1.img")  # the surviving leg alone holds the whole file system
    with d.loop_mounted(dev, mnt, "-o", "ro", loop_opts=["--read-only"]):
        check_files(mnt, sums)
    assert mirror_status(d, "m").health[0] == "D"
    assert sha(d.dir / "l0.img") != sha(d.dir / "l1.img"), "the dead leg got the writes?"


def test_flakey_leg_fails_writes_in_its_down_interval(d: Daemon) -> None:
    """Leg 1 is flakey (up 3 s, then down with error_writes).  A write in the up
    interval reaches both legs; one in the down interval only leg 0 (keep_log: it
    succeeds, the region goes out of sync, health D).  After the flakey leg is
    repaired and the mirror reloaded, the dirty log resyncs that region."""
    size = 4 * MiB
    n = size // SECTOR
    base = make_image(d.dir / "l0.img", size, seed="fk")
    make_image(d.dir / "l1.img", size, seed="fk")  # identical legs: nosync
    make_image(d.dir / "log.img", 1 * MiB)
    up = 3
    t0 = time.monotonic()
    d.create("F1", f"0 {n} flakey l1.img 0 {up} 3600 1 error_writes")
    t_loaded = time.monotonic()
    mirror = f"0 {n} mirror disk 3 log.img 128 nosync 2 l0.img 0 F1 0 2 handle_errors keep_log"
    dev = d.create("m", mirror)
    a = pattern("fk-a", 16384)
    write_at(dev, 0, a)
    if time.monotonic() - t0 < up:  # flakey's clock started after t0: it was still up
        verify_at(d.dir / "l1.img", 0, a, "write in the up interval on the flakey leg")
        assert mirror_status(d, "m").health == "AA"

    time.sleep(max(0.0, t_loaded + up + 0.3 - time.monotonic()))  # now down
    b = pattern("fk-b", 16384)
    off_b = 10 * 65536 + 4096  # region 10
    write_at(dev, off_b, b)  # succeeds (keep_log): on leg 0 only
    wait_health(d, "m", 1, "D")
    st = mirror_status(d, "m")
    assert st.health == "AD" and st.in_sync < st.regions, st
    verify_at(dev, off_b, b, "read back of the write made while the leg was down")
    verify_at(d.dir / "l0.img", off_b, b)
    assert read_at(d.dir / "l1.img", off_b, len(b)) == base[off_b:off_b + len(b)]

    # repair: the flakey leg back up for good, then reload the mirror (default mode)
    switch(d, "F1", f"0 {n} linear l1.img 0")
    switch(d, "m", mirror.replace(" 3 log.img 128 nosync", " 2 log.img 128"))
    wait_in_sync(d, "m")
    assert mirror_status(d, "m").health == "AA"
    assert sha(d.dir / "l0.img") == sha(d.dir / "l1.img")
    verify_at(d.dir / "l1.img", off_b, b)


def test_losing_every_leg_gives_eio_never_wrong_data(d: Daemon) -> None:
    size = 2 * MiB
    n = size // SECTOR
    linear_legs(d, size)
    dev = d.create("m", f"0 {n} mirror disk 3 log.img 128 nosync 2 L0 0 L1 0")
    data = pattern("all", size)
    write_at(dev, 0, data)

    switch(d, "L0", f"0 {n} error")  # reads fail over to leg 1
    for off in (0, 70000, size - 4096):
        verify_at(dev, off, data[off:off + 4096], f"read at {off} with leg 0 dead")
    assert mirror_status(d, "m").health[0] == "R"

    switch(d, "L1", f"0 {n} error")
    for off in (0, 70000, size - 4096):
        with pytest.raises(OSError) as exc:
            read_at(dev, off, 4096)
        assert exc.value.errno == errno.EIO
    with pytest.raises(OSError) as exc:
        write_at(dev, 8192, b"x" * 4096)
    assert exc.value.errno == errno.EIO
    with pytest.raises(OSError) as exc:
        read_at(dev, 8192, 4096)
    assert exc.value.errno == errno.EIO

    # back: the legs still hold the old data; the failed write reached neither
    switch(d, "L0", f"0 {n} linear l0.img 0")
    switch(d, "L1", f"0 {n} linear l1.img 0")
    switch(d, "m", f"0 {n} mirror disk 2 log.img 128 2 L0 0 L1 0")
    wait_in_sync(d, "m")
    verify_at(dev, 0, data, "after the legs came back")
    assert read_at(d.dir / "l1.img", 0, size) == data


# -- bad tables ------------------------------------------------------------------------


BAD_TABLES = [
    ("mirror core", "Insufficient mirror log arguments"),
    ("mirror core x 1024", "Invalid mirror log argument count"),
    ("mirror core 2 1024", "Insufficient mirror log arguments"),
    ("mirror core 1 1000 2 a.img 0 b.img 0", "Error creating mirror dirty log"),
    ("mirror core 2 1024 maybe 2 a.img 0 b.img 0", "Error creating mirror dirty log"),
    ("mirror core 3 1024 sync x 2 a.img 0 b.img 0", "Error creating mirror dirty log"),
    ("mirror bogus 1 1024 2 a.img 0 b.img 0", "Error creating mirror dirty log"),
    ("mirror disk 2 nolog.img 1024 2 a.img 0 b.img 0", "Error creating mirror dirty log"),
    ("mirror disk 2 tiny.img 2 2 a.img 0 b.img 0", "Error creating mirror dirty log"),
    ("mirror disk 1 log.img 2 a.img 0 b.img 0", "Error creating mirror dirty log"),
    ("mirror core 1 1024 1 a.img 0", "Invalid number of mirrors"),
    ("mirror core 1 1024 10 " + "a.img 0 " * 10, "Invalid number of mirrors"),
    ("mirror core 1 1024 x a.img 0", "Invalid number of mirrors"),
    ("mirror core 1 1024 2 a.img 0", "Too few mirror arguments"),
    ("mirror core 1 1024 2 a.img 0 b.img x", "Invalid offset"),
    ("mirror core 1 1024 2 a.img 0 nosuch.img 0", "Device lookup failure"),
    ("mirror core 1 1024 2 a.img 0 b.img 0 x", "Invalid number of features"),
    ("mirror core 1 1024 2 a.img 0 b.img 0 2 handle_errors", "Not enough arguments to support "
                                                             "feature count"),
    ("mirror core 1 1024 2 a.img 0 b.img 0 1 Handle_errors", "Unrecognised feature requested"),
    ("mirror core 1 1024 2 a.img 0 b.img 0 1 keep_log", "keep_log feature requires the "
                                                        "handle_errors feature"),
    ("mirror core 1 1024 2 a.img 0 b.img 0 1 handle_errors x", "Too many mirror arguments"),
]


def test_bad_mirror_tables_fail_with_kernel_texts(d: Daemon) -> None:
    size = 1 * MiB
    for img in ("a.img", "b.img"):
        make_image(d.dir / img, size)
    make_image(d.dir / "log.img", 1 * MiB)
    make_image(d.dir / "tiny.img", 512)  # 1024 header bytes do not fit
    good = d.create("good", f"0 {size // SECTOR} mirror disk 2 log.img 128 2 a.img 0 b.img 0")
    wait_in_sync(d, "good")
    good_table = d.table_lines("good")
    data = pattern("good", 65536)
    write_at(good, 0, data)
    n = size // SECTOR
    for words, message in BAD_TABLES:
        res = d.cli("create", "bad", "--table", f"0 {n} {words}", check=False)
        assert res.returncode == 1, (words, res)
        assert res.stderr.strip().endswith(f"mirror: {message}"), (words, res.stderr)
        res = d.cli("reload", "good", "--table", f"0 {n} {words}", check=False)
        assert res.returncode == 1 and message in res.stderr, (words, res.stderr)
    assert d.devices() == ["good"]
    assert d.table_lines("good") == good_table
    info = d.info("good")
    assert info["live"] and not info["inactive"] and not info["suspended"], info
    more = pattern("good2", 65536)
    write_at(good, 65536, more)
    verify_at(good, 0, data + more)
    verify_at(d.dir / "b.img", 0, data + more)
    st = mirror_status(d, "good")
    assert (st.in_sync, st.regions, st.health) == (16, 16, "AA")
