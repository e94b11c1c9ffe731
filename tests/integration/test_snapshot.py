"""Snapshots on a real daemon: ext4 through snapshot-origin, merge, overflow, damaged COWs.

Snapshots are taken the dmsetup/LVM way: the origin device (``snapshot-origin``
over the origin image) is suspended -- with a mounted file system frozen
first -- the snapshot device is created on ``<origin image> <cow>``, and the
origin is resumed.  Merges follow dm-spec §4.4/§4.9: a ``snapshot-merge``
table loaded on the COW of an active snapshot is a handover destination, so
the source snapshot must be suspended before the destination resumes.

Files are read back through loop mounts of the device files (root + loop);
``e2fsck -fn`` runs directly on the device files.  Everything set up with the
daemon helper (loop devices, mounts) is undone by its teardown, also on
failure; a frozen file system is thawed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon import Daemon, run_dmuser
from support.data import make_image, pattern, read_at, sha, verify_at, write_at
from support.system import fsck_clean, mkfs_ext4

MiB = 1 << 20
KiB = 1 << 10
SECTOR = 512

pytestmark = [pytest.mark.fuse]


# -- helpers -----------------------------------------------------------------------------


def info(d: Daemon, name: str) -> str:
    """The device's status INFO (words after the target type), e.g. ``16/2048 16``."""
    line = d.request("status", name=name)[name][0]  # type: ignore[index]
    return line.split(" ", 3)[3].strip() if line.count(" ") >= 3 else ""


def usage(d: Daemon, name: str) -> tuple[int, int, int]:
    alloc_total, meta = info(d, name).split()
    alloc, total = alloc_total.split("/")
    return int(alloc), int(total), int(meta)


@contextlib.contextmanager
def frozen(mnt: Path | None) -> Iterator[None]:
    """fsfreeze a mounted file system for the body (thawed even if it fails)."""
    if mnt is None:
        yield
        return
    subprocess.run(["fsfreeze", "-f", str(mnt)], check=True, capture_output=True, timeout=60)
    try:
        yield
    finally:
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True, timeout=60)


def take_snapshot(d: Daemon, name: str, cow: str, store: str = "P", chunk: int = 8,
                  origin: str = "origin", image: str = "origin.img",
                  mnt: Path | None = None) -> Path:
    """Suspend the origin (file system frozen), create the snapshot, resume the origin."""
    nr = d.info(origin)["nr_sectors"]
    with frozen(mnt):
        d.cli("suspend", origin)
        try:
            dev = d.create(name, f"0 {nr} snapshot {image} {cow} {store} {chunk}")
        finally:
            d.cli("resume", origin)
    return dev


def cow_tool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_dmuser("cow", *args, check=False, cwd=cwd)


def cow_json(path: Path) -> dict:  # type: ignore[type-arg]
    res = cow_tool("check", str(path), "--json", "--list")
    assert res.returncode == 0, f"cow check {path}: {res.returncode}\n{res.stdout}{res.stderr}"
    return json.loads(res.stdout)


def wait_merged(d: Daemon, name: str, timeout: float = 60) -> None:
    """``dmuser status NAME --watch --until-complete``, then check the status says so."""
    res = d.cli("status", name, "--watch", "--until-complete", "--interval", "0.1",
                timeout=timeout)
    assert "complete" in res.stdout, res.stdout
    alloc, _, meta = usage(d, name)
    assert alloc == meta, info(d, name)


def mkfs(dev: Path) -> None:
    mkfs_ext4(dev, "-b", "4096")


def write_files(root: Path, tag: str, names: list[str], size: int = 300 * KiB) -> dict[str, str]:
    sums = {}
    for i, name in enumerate(names):
        data = pattern(f"{tag}-{name}", size + i * 4097)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
    return sums


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file (lost+found excluded)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not rel.startswith("lost+found"):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def expect_eio(fn, *args) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info_:
        fn(*args)
    assert info_.value.errno == errno.EIO, info_.value


# -- ext4 on the origin: snapshot, change, merge back -----------------------------------


@pytest.mark.root
@pytest.mark.loop
@pytest.mark.mkfs
@pytest.mark.slow
@pytest.mark.parametrize("chunk", [8, 16])
def test_ext4_snapshot_change_and_merge_back(daemon: Daemon, chunk: int) -> None:
    d = daemon
    size = 48 * MiB
    make_image(d.dir / "origin.img", size)
    make_image(d.dir / "cow.img", 32 * MiB)
    origin = d.create("origin", f"0 {size // SECTOR} snapshot-origin origin.img")
    mkfs(origin)
    omnt, smnt = d.dir / "omnt", d.dir / "smnt"
    oloop = d.losetup(origin)
    d.mount(oloop, omnt)
    v1 = write_files(omnt, "v1", ["a", "b", "dir/c", "dir/d", "e"])
    os.sync()

    snap = take_snapshot(d, "snap", "cow.img", "P", chunk, mnt=omnt)
    fresh = usage(d, "snap")
    assert fresh[1] == 32 * MiB // SECTOR
    assert d.table_lines("snap")[0].endswith(f"cow.img P {chunk}")

    # change the origin: rewrite, delete, add
    (omnt / "b").unlink()
    v2 = dict(v1)
    del v2["b"]
    v2.update(write_files(omnt, "v2", ["a", "dir/c", "new1", "dir/new2"]))
    os.sync()
    assert tree(omnt) == v2
    alloc, _, meta = usage(d, "snap")
    assert alloc > fresh[0] and meta >= 2 * chunk, info(d, "snap")

    # the snapshot holds the old files
    fsck_clean(snap)
    sloop = d.losetup(snap)
    d.mount(sloop, smnt, "-o", "ro")
    assert tree(smnt) == v1
    d.umount(smnt)
    d.detach(sloop)

    d.umount(omnt)
    d.detach(oloop)
    fsck_clean(origin)
    fsck_clean(snap)

    # the snapshot is writable
    sloop = d.losetup(snap)
    d.mount(sloop, smnt)
    (smnt / "e").unlink()
    v3 = dict(v1)
    del v3["e"]
    v3.update(write_files(smnt, "v3", ["a", "dir/d", "snaponly"]))
    os.sync()
    d.umount(smnt)
    d.detach(sloop)
    fsck_clean(snap)
    fsck_clean(origin)
    snap_sha = sha(snap)
    rep = cow_json(d.dir / "cow.img")  # offline view of a live COW: everything committed
    assert rep["chunk_size"] == chunk and rep["exceptions"] > 0
    assert rep["usage"] == info(d, "snap")

    oloop = d.losetup(origin)
    d.mount(oloop, omnt, "-o", "ro")
    assert tree(omnt) == v2
    d.umount(omnt)
    d.detach(oloop)

    # merge back (dm-spec §4.4/§4.9): the origin is quiet, the source snapshot is
    # suspended, the snapshot-merge table is loaded on the same COW and resumed:
    # it takes over the snapshot's exceptions and copies them to the origin.
    nr = size // SECTOR
    d.cli("suspend", "origin")
    d.cli("suspend", "snap")
    d.reload("snap", f"0 {nr} snapshot-merge origin.img cow.img P {chunk}")
    d.cli("resume", "snap")
    try:
        wait_merged(d, "snap")
    finally:
        d.cli("resume", "origin")
    assert info(d, "snap") == f"{2 * chunk}/{32 * MiB // SECTOR} {2 * chunk}"
    # the origin now is the snapshot, and the merge device reads the same
    assert sha(origin) == snap_sha
    assert sha(snap) == snap_sha
    rep = cow_json(d.dir / "cow.img")
    assert rep["exceptions"] == 0 and rep["state"] == "valid", rep
    res = cow_tool("inspect", str(d.dir / "cow.img"))
    assert res.returncode == 0 and "exceptions:          0" in res.stdout, res.stdout
    assert rep["usage"] == f"{2 * chunk}/{32 * MiB // SECTOR} {2 * chunk}"

    fsck_clean(origin)
    oloop = d.losetup(origin)
    d.mount(oloop, omnt)
    assert tree(omnt) == v3
    d.umount(omnt)
    d.detach(oloop)
    d.cli("remove", "snap")
    d.cli("remove", "origin")
    assert d.devices() == []


# -- several snapshots of one origin, transient, LVM-style merge -------------------------


def test_several_snapshots_transient_and_lvm_merge(daemon: Daemon) -> None:
    d = daemon
    size = 4 * MiB
    nr = size // SECTOR
    base = make_image(d.dir / "origin.img", size, seed="base")
    for cow in ("cow1.img", "cow2.img", "cow3.img"):
        make_image(d.dir / cow, 4 * MiB)
    origin = d.create("origin", f"0 {nr} snapshot-origin origin.img")
    model = bytearray(base)

    def owrite(off: int, n: int, seed: str) -> None:
        data = pattern(seed, n)
        write_at(origin, off, data)
        model[off:off + n] = data

    s1 = take_snapshot(d, "s1", "cow1.img", "P", 8)
    want1 = bytearray(model)
    owrite(0, 256 * KiB, "o1")            # chunk-aligned
    owrite(1 * MiB + 1536, 70 * KiB, "o2")  # unaligned
    s2 = take_snapshot(d, "s2", "cow2.img", "P", 16)
    want2 = bytearray(model)
    owrite(64 * KiB, 256 * KiB, "o3")     # overlaps s1's copies and new for s2
    owrite(3 * MiB, 512 * KiB, "o4")
    s3 = take_snapshot(d, "s3", "cow3.img", "N", 8)
    want3 = bytearray(model)
    assert info(d, "s3") == f"0/{nr} 0"   # transient: chunk 0 of the COW is data
    owrite(2 * MiB, 128 * KiB, "o5")
    owrite(0, 8 * KiB, "o6")

    # each snapshot's own writes stay its own
    for dev, want, off, n, seed in ((s1, want1, 2 * MiB + 512, 40 * KiB, "w1"),
                                    (s2, want2, 0, 64 * KiB, "w2"),
                                    (s3, want3, 3 * MiB + 4096, 4 * KiB, "w3")):
        data = pattern(seed, n)
        write_at(dev, off, data)
        want[off:off + n] = data

    for dev, want, what in ((origin, model, "origin"), (s1, want1, "s1"), (s2, want2, "s2"),
                            (s3, want3, "s3")):
        verify_at(dev, 0, bytes(want), what)
    assert read_at(d.dir / "origin.img", 0, size) == bytes(model)
    assert d.table_lines("s3")[0].endswith("cow3.img N 8")
    alloc3, _, meta3 = usage(d, "s3")
    assert meta3 == 0 and alloc3 > 0 and alloc3 % 8 == 0
    # the transient COW has no header
    assert read_at(d.dir / "cow3.img", 0, 4) != b"SnAp"
    for cow, cs in (("cow1.img", 8), ("cow2.img", 16)):
        rep = cow_json(d.dir / cow)
        assert rep["chunk_size"] == cs and rep["exceptions"] > 0

    # merge s1 the LVM way: the origin device's table becomes snapshot-merge on
    # s1's COW; s1 (the handover source) is suspended before it resumes
    d.cli("suspend", "s1")
    d.cli("suspend", "origin")
    d.reload("origin", f"0 {nr} snapshot-merge origin.img cow1.img P 8")
    d.cli("resume", "origin")
    wait_merged(d, "origin")
    assert info(d, "s1") == "Invalid"   # the source gave its exceptions away
    d.cli("resume", "s1")
    expect_eio(read_at, s1, 0, 4096)
    d.cli("remove", "s1")
    verify_at(origin, 0, bytes(want1), "origin after merging s1")
    assert read_at(d.dir / "origin.img", 0, size) == bytes(want1)
    # the merge copied the others' chunks out before overwriting the origin
    verify_at(s2, 0, bytes(want2), "s2 after the merge of s1")
    verify_at(s3, 0, bytes(want3), "s3 after the merge of s1")
    assert cow_json(d.dir / "cow1.img")["exceptions"] == 0

    # a finished merge target acts as an origin: writes still copy out
    data = pattern("after", 64 * KiB)
    write_at(origin, 1 * MiB, data)
    verify_at(s2, 0, bytes(want2), "s2 after an origin write")
    verify_at(s3, 0, bytes(want3), "s3 after an origin write")
    verify_at(origin, 1 * MiB, data)

    for name in ("s2", "s3", "origin"):
        d.cli("remove", name)
    assert d.devices() == []


# -- overflow: P invalidates on a full COW, PO overflows on snapshot writes --------------


def test_full_cow_invalidates_and_po_overflow(daemon: Daemon) -> None:
    d = daemon
    size = 2 * MiB
    nr = size // SECTOR
    base = make_image(d.dir / "origin.img", size, seed="ov")
    small = 16 * 4 * KiB   # 16 chunks of 4 KiB: header, area 0, 14 data chunks
    make_image(d.dir / "small.img", small)
    make_image(d.dir / "big.img", 4 * MiB)
    make_image(d.dir / "po.img", small)
    origin = d.create("origin", f"0 {nr} snapshot-origin origin.img")
    sm = take_snapshot(d, "small", "small.img", "P", 8)
    big = take_snapshot(d, "big", "big.img", "P", 8)
    assert info(d, "small") == f"16/{small // SECTOR} 16"

    # 32 chunks of origin writes: the small COW holds 14 copies
    new = pattern("new", 128 * KiB)
    write_at(origin, 0, new)
    assert info(d, "small") == "Invalid"
    expect_eio(read_at, sm, 0, 4096)
    expect_eio(write_at, sm, 8192, b"x" * 4096)
    verify_at(origin, 0, new, "origin after the small snapshot overflowed")
    verify_at(big, 0, base, "the other snapshot")
    write_at(origin, 1 * MiB, new)
    verify_at(origin, 1 * MiB, new)
    verify_at(big, 0, base, "the other snapshot")
    # invalidation is durable: the header says valid = 0
    rep = cow_json(d.dir / "small.img")
    assert rep["valid"] == 0 and "invalid" in rep["state"], rep
    res = cow_tool("inspect", str(d.dir / "small.img"))
    assert res.returncode == 0 and "invalidated" in res.stdout, res.stdout

    # PO: a snapshot write that finds the COW full fails and shows Overflow
    po = take_snapshot(d, "po", "po.img", "PO", 8)
    assert d.table_lines("po")[0].endswith("po.img PO 8")
    ok, failed = 0, 0
    for i in range(20):
        try:
            write_at(po, (256 + i) * 4096, pattern(f"po{i}", 4096))
            ok += 1
        except OSError as exc:
            assert exc.errno == errno.EIO
            failed += 1
    assert (ok, failed) == (14, 6)
    assert info(d, "po") == "Overflow"
    # reads still work, writes fail, even to chunks it already has
    verify_at(po, 256 * 4096, pattern("po0", 4096), "overflowed snapshot, written chunk")
    verify_at(po, 0, new, "overflowed snapshot, origin chunk")
    expect_eio(write_at, po, 256 * 4096, b"y" * 4096)
    rep = cow_json(d.dir / "po.img")
    assert rep["valid"] == 1 and rep["exceptions"] == 14, rep
    # the origin and the other snapshot keep working; an origin write to a chunk
    # the full PO snapshot has no copy of invalidates it (never "Overflow")
    verify_at(origin, 0, new)
    write_at(origin, 1536 * KiB, new[:8192])
    assert info(d, "po") == "Invalid"
    verify_at(origin, 1536 * KiB, new[:8192])
    verify_at(big, 0, base, "the other snapshot")
    for name in ("small", "po", "big", "origin"):
        d.cli("remove", name)


# -- damaged COWs and the offline tool ---------------------------------------------------


def test_damaged_cow_fails_table_load_and_cow_tool(daemon: Daemon) -> None:
    d = daemon
    size = 4 * MiB
    nr = size // SECTOR
    make_image(d.dir / "origin.img", size, seed="dmg")
    make_image(d.dir / "cow.img", 4 * MiB)
    d.create("origin", f"0 {nr} snapshot-origin origin.img")
    snap = take_snapshot(d, "snap", "cow.img", "P", 8)
    # 300 chunk copies: area 0 (256 records) fills, area 1 starts at chunk 258
    write_at(d.path("origin"), 0, pattern("fill", 300 * 4096))
    write_at(snap, 3 * MiB, pattern("own", 8192))
    want = info(d, "snap")
    snap_sha = sha(snap)
    d.cli("remove", "snap")

    good = d.dir / "cow.img"
    res = cow_tool("check", str(good))
    assert res.returncode == 0 and "check: ok" in res.stdout, res.stdout
    assert "exceptions:          302" in res.stdout and "(chunks 1, 258)" in res.stdout, res.stdout
    res = cow_tool("inspect", str(good))
    assert res.returncode == 0 and f"usage:               {want}" in res.stdout, res.stdout
    rep = cow_json(good)
    assert rep["area_chunks"] == [1, 258] and rep["exceptions"] == 302

    raw = good.read_bytes()
    damaged = {
        # garbage in the header
        "garbage.img": b"\xde\xad\xbe\xef" + raw[4:],
        # cut inside area 1: activation cannot read it
        "truncated.img": raw[:258 * 4096 + 100],
        # too short even for a header
        "tiny.img": raw[:10],
        # a bad on-disk chunk size
        "badchunk.img": raw[:12] + (3).to_bytes(4, "little") + raw[16:],
        # unknown version
        "badversion.img": raw[:8] + (2).to_bytes(4, "little") + raw[12:],
    }
    # the reason the daemon logs (the table-load error is the kernel's generic one)
    reasons = {"garbage.img": "Invalid or corrupt snapshot",
               "truncated.img": "metadata area 1 (chunk 258) lies beyond the end of the device",
               "tiny.img": "cannot read the snapshot header",
               "badchunk.img": "invalid on-disk chunk size 3",
               "badversion.img": "unable to handle snapshot disk version 2"}
    for name, data in damaged.items():
        (d.dir / name).write_bytes(data)
        res = d.cli("create", "bad", "--table", f"0 {nr} snapshot origin.img {name} P 8",
                    check=False)
        assert res.returncode == 1, (name, res)
        assert "create bad" in res.stderr \
            and "Failed to read snapshot metadata" in res.stderr, (name, res.stderr)
        assert "Traceback" not in res.stderr
        assert reasons[name] in d.log_text(), (name, d.log_tail())
        assert "bad" not in d.devices()
        # the daemon is fine: the origin still works
        write_at(d.path("origin"), 0, b"z" * 4096)
        res = cow_tool("check", str(d.dir / name))
        assert res.returncode == 1, (name, res.stdout, res.stderr)
        assert "FAILED" in res.stdout or "damage" in res.stdout, (name, res.stdout)

    # a COW naming one chunk twice, or a metadata chunk as data, fails check
    twice = bytearray(raw)
    twice[4096 + 16:4096 + 32] = twice[4096:4096 + 16]
    (d.dir / "twice.img").write_bytes(twice)
    res = cow_tool("check", str(d.dir / "twice.img"))
    assert res.returncode == 1 and "already has an exception" in res.stdout, res.stdout
    meta = bytearray(raw)
    meta[4096 + 8:4096 + 16] = (258).to_bytes(8, "little")
    (d.dir / "meta.img").write_bytes(meta)
    res = cow_tool("check", str(d.dir / "meta.img"))
    assert res.returncode == 1 and "is a metadata area, not a data chunk" in res.stdout, res.stdout
    # usage errors and unreadable files
    assert cow_tool("check", str(d.dir / "nonexistent.img")).returncode == 2
    assert cow_tool("frobnicate", str(good)).returncode == 2

    # the good COW still loads, with the data dmuser showed before
    snap = take_snapshot(d, "snap", "cow.img", "P", 8)
    assert info(d, "snap") == want
    assert sha(snap) == snap_sha
    d.cli("remove", "snap")
    d.cli("remove", "origin")
