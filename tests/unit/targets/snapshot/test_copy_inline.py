"""Inline copy-outs (``targets/snapshot/copy_out.py``): file-backed origin and COW.

When the origin and the COW are image files served inline, a copy-out is one
``pread`` and one ``pwrite`` at allocation, and its exception is committed
with ``hold`` without a task (``Snapshot._copied_inline``); everything else
still goes through kcopyd.  These tests check that the inline path is taken
(and is not when files are served by threads), that the COW it leaves is the
kernel's format with each record pointing at the chunk's old data, that a
failing copy read invalidates the snapshot without losing the origin write,
and that held records still commit in sequence order when kcopyd copies and
inline copies mix.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.data import make_image
from support.targets import make_manager, remove_all_checked

from dmuser.byte_io import read_bytes, write_bytes
from dmuser.core.bio import Bio, ReqFlag
from dmuser.core.blockdev import FileDevice
from dmuser.core.config import Config
from dmuser.core.manager import DeviceManager
from dmuser.core.target import StatusType
from dmuser.formats.cow import MetadataWalk
from dmuser.targets.snapshot import copy_out
from dmuser.targets.snapshot.origin import SnapshotOriginTarget
from dmuser.targets.snapshot.registry import ORIGINS
from dmuser.targets.snapshot.service import Service

SECTORS = 512          # origin: 256 KiB
CHUNK = 8              # 4 KiB chunks
CHUNK_BYTES = CHUNK * 512
COW_SECTORS = 1024


class Copies:
    """Counts kcopyd copy-outs (``Service.copy``) and inline ones (``copy_inline``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kcopyd = 0
        self.inline = 0
        real_copy, real_inline = Service.copy, copy_out.copy_inline

        def copy(service: Service, *args: Any) -> bool:
            self.kcopyd += 1
            return real_copy(service, *args)

        def inline(*args: Any) -> bool:
            self.inline += 1
            return real_inline(*args)

        monkeypatch.setattr(Service, "copy", copy)
        monkeypatch.setattr("dmuser.targets.snapshot.snap.copy_inline", inline)


async def setup(tmp_path: Path, config: Config | None = None, sectors: int = SECTORS,
                cow_sectors: int = COW_SECTORS, seed: int = 5) -> tuple[DeviceManager, bytes]:
    """Origin ``o`` (an image of ``sectors`` seeded data) with one P snapshot ``snap``."""
    mgr = make_manager(config=config or Config(snapshot_hold_ms=3600_000))
    before = make_image(tmp_path / "base.img", sectors * 512, seed=seed)
    make_image(tmp_path / "cow.img", cow_sectors * 512)
    await mgr.create("snap", f"0 {sectors} snapshot base.img cow.img P {CHUNK}", str(tmp_path))
    await mgr.create("o", f"0 {sectors} snapshot-origin base.img", str(tmp_path))
    return mgr, before


def cow_records(path: Path) -> list[tuple[int, int]]:
    data = path.read_bytes()
    walk = MetadataWalk(CHUNK, len(data) // 512)
    while (chunk := walk.next_area()) is not None:
        walk.feed(data[chunk * CHUNK_BYTES:(chunk + 1) * CHUNK_BYTES])
    assert not walk.problems, walk.problems
    return walk.records


def writes() -> Iterator[tuple[int, bytes]]:
    """Writes to chunks 3, 0, 7 (twice), and across chunks 10-12."""
    for off, n in ((3 * CHUNK_BYTES + 512, 1024), (0, 512), (7 * CHUNK_BYTES, CHUNK_BYTES),
                   (7 * CHUNK_BYTES + 1024, 512), (10 * CHUNK_BYTES + 2048, 2 * CHUNK_BYTES)):
        yield off, os.urandom(n)


async def write_all(mgr: DeviceManager) -> bytearray:
    expect = bytearray()
    for off, data in writes():
        await write_bytes(mgr.get("o"), off, data, direct=True)
        expect += data
    return expect


async def test_file_copy_outs_run_inline_and_leave_the_kernel_format(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copies = Copies(monkeypatch)
    mgr, before = await setup(tmp_path)
    try:
        await write_all(mgr)
        await mgr.get("o").submit(Bio.flush())
        assert (copies.inline, copies.kcopyd) == (4, 0)  # chunks 3, 0, 7 (once), 10-12 (one run)
        records = cow_records(tmp_path / "cow.img")
        assert sorted(old for old, _ in records) == [0, 3, 7, 10, 11, 12]
        cow = (tmp_path / "cow.img").read_bytes()
        for old, new in records:
            assert cow[new * CHUNK_BYTES:(new + 1) * CHUNK_BYTES] == \
                before[old * CHUNK_BYTES:(old + 1) * CHUNK_BYTES], f"chunk {old}"
        assert await read_bytes(mgr.get("snap"), 0, SECTORS * 512) == before
        assert mgr.get("snap").table_lines(StatusType.INFO)[0].split()[-2] == \
            f"{(2 + 6) * CHUNK}/{COW_SECTORS}"  # header + 1 area + 6 copies
    finally:
        await remove_all_checked(mgr)
    assert not ORIGINS


async def test_files_served_by_threads_copy_through_kcopyd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copies = Copies(monkeypatch)
    mgr, before = await setup(tmp_path, Config(snapshot_hold_ms=3600_000, inline_max_bytes=0))
    try:
        await write_all(mgr)
        await mgr.get("o").submit(Bio.flush())
        assert (copies.inline, copies.kcopyd) == (0, 4)
        assert await read_bytes(mgr.get("snap"), 0, SECTORS * 512) == before
    finally:
        await remove_all_checked(mgr)


async def test_a_failed_inline_read_invalidates_the_snapshot_not_the_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = str(tmp_path / "base.img")
    real = FileDevice.pread_inline

    def pread(dev: FileDevice, sector: int, nbytes: int) -> bytes:
        if dev.path == base and nbytes == CHUNK_BYTES:
            raise OSError(errno.EIO, "injected")
        return real(dev, sector, nbytes)

    monkeypatch.setattr(FileDevice, "pread_inline", pread)
    mgr, before = await setup(tmp_path)
    try:
        new = os.urandom(512)
        await write_bytes(mgr.get("o"), 5 * CHUNK_BYTES, new, direct=True)
        await mgr.get("o").submit(Bio.flush())
        assert mgr.get("snap").table_lines(StatusType.INFO)[0].endswith("Invalid")
        monkeypatch.setattr(FileDevice, "pread_inline", real)
        assert (tmp_path / "base.img").read_bytes()[5 * CHUNK_BYTES:5 * CHUNK_BYTES + 512] \
            == new
        # later writes need no copy from an invalid snapshot and go straight through
        await write_bytes(mgr.get("o"), 9 * CHUNK_BYTES, new, direct=True)
        assert (tmp_path / "base.img").read_bytes()[9 * CHUNK_BYTES:9 * CHUNK_BYTES + 512] \
            == new
    finally:
        await remove_all_checked(mgr)


async def test_inline_and_kcopyd_copies_commit_in_sequence_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every other copy goes to kcopyd (a copy finishing later than the inline ones
    allocated after it): records still land in allocation order."""
    real_ok = copy_out.inline_ok
    calls = [0]

    def every_other(*args: Any) -> bool:
        calls[0] += 1
        return calls[0] % 2 == 0 and real_ok(*args)

    monkeypatch.setattr("dmuser.targets.snapshot.snap.inline_ok", every_other)
    mgr, before = await setup(tmp_path)
    try:
        order = [6, 2, 9, 1, 14, 4]
        for chunk in order:
            await write_bytes(mgr.get("o"), chunk * CHUNK_BYTES, os.urandom(512), direct=True)
        await mgr.get("o").submit(Bio.flush())
        records = cow_records(tmp_path / "cow.img")
        assert [old for old, _ in records] == order
        assert [new for _, new in records] == sorted(new for _, new in records)
        assert await read_bytes(mgr.get("snap"), 0, SECTORS * 512) == before
    finally:
        await remove_all_checked(mgr)


async def test_inline_copies_fill_an_area_and_go_on_in_the_next(tmp_path: Path) -> None:
    """300 first writes with 256 records per area: the record that fills area 0 is
    written (with the zeroed area 1) by the commit loop, not held; the rest go on
    into area 1, whose COW chunk the allocation skipped."""
    mgr, before = await setup(tmp_path, sectors=4096, cow_sectors=6144, seed=6)
    try:
        for chunk in range(300):
            await write_bytes(mgr.get("o"), chunk * CHUNK_BYTES, bytes(512), direct=True)
        await mgr.get("o").submit(Bio.flush())
        records = cow_records(tmp_path / "cow.img")
        assert [old for old, _ in records] == list(range(300))
        news = [new for _, new in records]
        assert news == list(range(2, 2 + 256)) + list(range(2 + 256 + 1, 2 + 256 + 1 + 44))
        cow = (tmp_path / "cow.img").read_bytes()
        for old, new in records[250:260]:
            assert cow[new * CHUNK_BYTES:(new + 1) * CHUNK_BYTES] == \
                before[old * CHUNK_BYTES:(old + 1) * CHUNK_BYTES], f"chunk {old}"
    finally:
        await remove_all_checked(mgr)


async def test_a_direct_path_write_is_held_behind_its_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FUSE/NBD write that needs a copy-out is held by the direct path
    (``SnapshotOriginTarget.absorb_write``, no map()), and reaches the origin
    file only after the area write (PREFLUSH|FUA) that commits its exception."""
    log: list[tuple[str, int, bool]] = []
    real_submit = FileDevice.submit

    async def submit(dev: FileDevice, bio: Bio) -> None:
        if bio.is_write and bio.nr_sectors:
            log.append((os.path.basename(dev.path), bio.sector,
                        bool(bio.flags & ReqFlag.FUA)))
        await real_submit(dev, bio)

    maps = [0]
    real_map = SnapshotOriginTarget.map

    async def map_(target: SnapshotOriginTarget, bio: Bio) -> Any:
        maps[0] += 1
        return await real_map(target, bio)

    monkeypatch.setattr(FileDevice, "submit", submit)
    monkeypatch.setattr(SnapshotOriginTarget, "map", map_)
    mgr, before = await setup(tmp_path)
    try:
        new = os.urandom(1024)
        await write_bytes(mgr.get("o"), 4 * CHUNK_BYTES + 512, new, direct=True)
        assert maps[0] == 0, "the write went through map(), not the direct path"
        assert (tmp_path / "base.img").read_bytes() == before  # held
        await mgr.get("o").submit(Bio.flush())
        base_writes = [i for i, (name, _, _) in enumerate(log) if name == "base.img"]
        area_writes = [i for i, (name, sector, fua) in enumerate(log)
                       if name == "cow.img" and fua and sector == CHUNK]
        assert base_writes and area_writes, log
        assert area_writes[0] < base_writes[0], log
        assert (tmp_path / "base.img").read_bytes()[4 * CHUNK_BYTES + 512:][:1024] == new
        assert await read_bytes(mgr.get("snap"), 0, SECTORS * 512) == before
    finally:
        await remove_all_checked(mgr)


async def test_one_write_copies_at_most_the_inline_budget_inline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 MiB write over 128 fragmented chunks: 256 KiB of its copies run inline
    (64 runs of one 4 KiB chunk), the other 64 go to kcopyd; all commit."""
    mgr, before = await setup(tmp_path, sectors=4096, cow_sectors=6144, seed=7)
    try:
        for chunk in range(0, 256, 2):
            await write_bytes(mgr.get("o"), chunk * CHUNK_BYTES, bytes(512), direct=True)
        copies = Copies(monkeypatch)
        await write_bytes(mgr.get("o"), 0, os.urandom(256 * CHUNK_BYTES), direct=True)
        assert (copies.inline, copies.kcopyd) == (
            copy_out.INLINE_COPY_MAX_BYTES // CHUNK_BYTES, 128 - 64)
        await mgr.get("o").submit(Bio.flush())
        assert sorted(old for old, _ in cow_records(tmp_path / "cow.img")) == list(range(256))
        assert await read_bytes(mgr.get("snap"), 0, 2 << 20) == before
    finally:
        await remove_all_checked(mgr)
