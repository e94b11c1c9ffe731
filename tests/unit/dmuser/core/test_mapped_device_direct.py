"""The direct path (Table.direct / MappedDevice.read_direct, write_direct): a one-target
linear table onto a file serves plain FUSE reads and writes without a bio.

It must keep every guarantee of the full path: bytes land where the table
says, a suspended device holds the request, an overlapping read-modify-write
excludes it, a table swap redirects it, and failures are reported through the
full path."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
import trio.testing
from support.data import make_image
from support.targets import make_manager, remove_all_checked

from dmuser.byte_io import range_lock
from dmuser.core.config import Config
from dmuser.core.manager import DeviceManager
from dmuser.core.mapped_device import MappedDevice
from dmuser.fuse_ops import DeviceFS

S = 512


class Env(SimpleNamespace):
    mgr: DeviceManager
    fs: DeviceFS
    img: Path
    fh: int
    md: MappedDevice


async def open_device(fs: DeviceFS, name: bytes) -> int:
    """A handle on the device file ``name``, as a FUSE open would give."""
    inode = (await fs.lookup(pyfuse3.ROOT_INODE, name, None)).st_ino
    return (await fs.open(inode, os.O_RDWR, None)).fh


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    mgr = make_manager()
    fs = DeviceFS(mgr)
    img = tmp_path / "a.img"
    make_image(img, 64 * S, seed=5)
    md = await mgr.create("lin", "0 32 linear a.img 16", str(tmp_path))
    fh = await open_device(fs, b"lin")
    yield Env(mgr=mgr, fs=fs, img=img, fh=fh, md=md)
    await fs.release(fh)
    await remove_all_checked(mgr)


@pytest.fixture
def no_full_path(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Record every request that takes the full path (MappedDevice.submit)."""
    calls: list[object] = []
    real = MappedDevice.submit

    async def spy(self: MappedDevice, bio: object) -> None:
        calls.append(bio)
        await real(self, bio)

    monkeypatch.setattr(MappedDevice, "submit", spy)
    return calls


async def test_table_direct_only_for_one_linear_target_on_a_file(tmp_path: Path) -> None:
    mgr = make_manager()
    make_image(tmp_path / "a.img", 64 * S, seed=0)
    cwd = str(tmp_path)
    lin = await mgr.create("lin", "0 32 linear a.img 16", cwd)
    assert lin.live is not None and lin.live.direct is not None
    dev, delta = lin.live.direct.direct_remap(True, 0, 8)
    assert (dev.path, delta) == (str(tmp_path / "a.img"), 16)
    two = await mgr.create("two", "0 8 linear a.img 0\n8 8 linear a.img 40", cwd)
    stacked = await mgr.create("stacked", "0 16 linear lin 0", cwd)
    flakey = await mgr.create("flakey", "0 16 flakey a.img 0 5 0", cwd)
    zero = await mgr.create("zero", "0 16 zero", cwd)
    for md in (two, stacked, flakey, zero):
        assert md.live is not None and md.live.direct is None, md.name
    assert two.live is not None
    second = two.live.targets[1]   # device sector 8 + k is file sector 40 + k
    assert second.direct_remap(False, 8, 1) == (dev, 40 - 8)
    await remove_all_checked(mgr)


async def test_aligned_io_takes_the_direct_path_to_the_right_bytes(
        env: Env, no_full_path: list[object]) -> None:
    data = os.urandom(8 * S)
    assert await env.fs.write(env.fh, 4 * S, data) == len(data)
    # linear ... 16: device sector 4 is file sector 20
    assert env.img.read_bytes()[20 * S : 28 * S] == data
    assert await env.fs.read(env.fh, 4 * S, 8 * S) == data
    assert no_full_path == [], "aligned I/O on a linear-on-file device went through bios"


async def test_unaligned_write_still_read_modify_writes(env: Env,
                                                        no_full_path: list[object]) -> None:
    before = env.img.read_bytes()
    await env.fs.write(env.fh, 3 * S + 100, b"x" * 300)
    after = env.img.read_bytes()
    assert after[19 * S + 100 : 19 * S + 400] == b"x" * 300
    assert after[: 19 * S + 100] == before[: 19 * S + 100]
    assert after[19 * S + 400 :] == before[19 * S + 400 :]
    assert no_full_path, "an unaligned write must use the locked read-modify-write path"


async def test_suspended_device_holds_direct_io(env: Env) -> None:
    data = os.urandom(S)
    done: list[str] = []
    await env.md.suspend()

    async def write() -> None:
        await env.fs.write(env.fh, 0, data)
        done.append("write")

    async def read() -> None:
        await env.fs.read(env.fh, 0, S)
        done.append("read")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        assert done == [], "I/O to a suspended device completed"
        assert env.img.read_bytes()[16 * S : 17 * S] != data
        await env.md.resume()
    assert sorted(done) == ["read", "write"]
    assert env.img.read_bytes()[16 * S : 17 * S] == data


@pytest.mark.parametrize("held, blocks", [((3, 4), True), ((10, 12), False)])
async def test_held_range_excludes_direct_write_only_if_it_overlaps(
        env: Env, held: tuple[int, int], blocks: bool) -> None:
    node = env.fs._handles[env.fh]
    data = os.urandom(2 * S)          # device sectors 2-3
    done, release = trio.Event(), trio.Event()

    async def holder(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with range_lock(node.md).hold(*held):  # as an unaligned write in progress would
            task_status.started()
            await release.wait()

    async def write() -> None:
        await env.fs.write(env.fh, 2 * S, data)
        done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(holder)
        nursery.start_soon(write)
        await trio.testing.wait_all_tasks_blocked()
        assert done.is_set() is not blocks
        assert (env.img.read_bytes()[18 * S : 20 * S] == data) is not blocks
        release.set()
    assert done.is_set()
    assert env.img.read_bytes()[18 * S : 20 * S] == data


async def test_table_swap_redirects_direct_io(env: Env, no_full_path: list[object]) -> None:
    await env.md.load(await env.mgr.build_table(env.md, f"0 32 linear {env.img} 32", "/"))
    await env.md.suspend()
    await env.md.resume()
    data = os.urandom(S)
    await env.fs.write(env.fh, 0, data)
    assert env.img.read_bytes()[32 * S : 33 * S] == data
    assert no_full_path == []


async def test_failure_is_reported_by_the_full_path(env: Env) -> None:
    assert env.md.live is not None and env.md.live.direct is not None
    dev = env.md.live.direct.direct_remap(False, 0, 1)[0]
    fd = dev.fd
    dev.fd = -1  # every syscall on it now fails (EBADF)
    try:
        with pytest.raises(pyfuse3.FUSEError) as info:
            await env.fs.write(env.fh, 0, bytes(S))
        assert info.value.errno == errno.EBADF
        with pytest.raises(pyfuse3.FUSEError) as info:
            await env.fs.read(env.fh, 0, S)
        assert info.value.errno == errno.EBADF
    finally:
        dev.fd = fd


# -- snapshot-origin: reads, and writes no snapshot needs a copy for -------------------------


class OriginEnv(SimpleNamespace):
    mgr: DeviceManager
    fs: DeviceFS
    base: Path
    origin_fh: int
    snap_fh: int
    before: bytes


@pytest.fixture
async def oenv(tmp_path: Path) -> AsyncIterator[OriginEnv]:
    # origin writes wait for their commits (held writes: targets/snapshot/test_held.py)
    mgr = make_manager(config=Config(snapshot_hold_bytes=0))
    fs = DeviceFS(mgr)
    base = tmp_path / "base.img"
    before = make_image(base, 64 * S, seed=9)
    make_image(tmp_path / "cow.img", 64 * S)
    await mgr.create("snap", "0 64 snapshot base.img cow.img P 8", str(tmp_path))
    await mgr.create("o", "0 64 snapshot-origin base.img", str(tmp_path))
    fhs = [await open_device(fs, b"o"), await open_device(fs, b"snap")]
    yield OriginEnv(mgr=mgr, fs=fs, base=base, origin_fh=fhs[0], snap_fh=fhs[1],
                    before=before)
    for fh in fhs:
        await fs.release(fh)
    await remove_all_checked(mgr)


async def test_origin_first_write_copies_out_then_rewrites_go_direct(
        oenv: OriginEnv, no_full_path: list[object]) -> None:
    first, second = os.urandom(S), os.urandom(S)
    await oenv.fs.write(oenv.origin_fh, 9 * S, first)    # chunk 1, not yet copied
    assert len(no_full_path) == 1, "a write needing a copy-out must take the full path"
    await oenv.fs.write(oenv.origin_fh, 10 * S, second)  # chunk 1 again: copied already
    assert len(no_full_path) == 1, "a write no snapshot needs a copy for goes direct"
    assert oenv.base.read_bytes()[9 * S : 11 * S] == first + second
    # the snapshot still shows the chunk as it was (its reads take the full path)
    assert await oenv.fs.read(oenv.snap_fh, 8 * S, 8 * S) == oenv.before[8 * S : 16 * S]
    assert await oenv.fs.read(oenv.origin_fh, 9 * S, 2 * S) == first + second


async def test_origin_write_is_plain_only_without_pending_throttle_or_copy(
        oenv: OriginEnv) -> None:
    from dmuser.targets.snapshot.registry import lookup_origin, origin_write_is_plain
    md = oenv.mgr.get("o")
    assert md.live is not None and md.live.direct is not None
    dev = md.live.direct.direct_remap(False, 0, 1)[0]
    assert not origin_write_is_plain(dev, 0, 8)          # chunk 0 not copied yet
    await oenv.fs.write(oenv.origin_fh, 0, bytes(S))     # copies chunk 0 out
    assert origin_write_is_plain(dev, 0, 8)
    assert not origin_write_is_plain(dev, 0, 16)         # chunk 1 is not copied
    origin = lookup_origin(dev)
    assert origin is not None
    snap = origin.snapshots[0]
    snap.pending[0] = object()                           # a copy of chunk 0 in progress
    assert not origin_write_is_plain(dev, 0, 8)
    del snap.pending[0]
    snap.in_progress = snap.cow_threshold + 1            # writes are being throttled
    assert not origin_write_is_plain(dev, 0, 8)
    snap.in_progress = 0
    assert origin_write_is_plain(dev, 0, 8)
