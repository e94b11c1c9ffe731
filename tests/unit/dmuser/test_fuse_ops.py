"""fuse_ops.DeviceFS called in process (no mount): byte-exact I/O, EOF/ENOSPC, errno mapping."""

from __future__ import annotations

import errno
import os
import random
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
from support.data import make_image, pattern
from support.targets import ProbeTarget, make_manager, remove_all_checked

from dmuser.byte_io import range_lock
from dmuser.core.errors import DeviceBusyError
from dmuser.core.manager import DeviceManager
from dmuser.fuse_ops import DeviceFS

S = 512
ROOT = pyfuse3.ROOT_INODE
DEV_BYTES = 16 * S           # "d": two linear targets of 8 sectors each
BOUNDARY = 8 * S             # where the first target ends


class Env(SimpleNamespace):
    mgr: DeviceManager
    fs: DeviceFS
    a: Path
    b: Path
    a0: bytes
    b0: bytes
    model: bytearray

    def device_bytes(self) -> bytes:
        """What the device holds, read straight from the backing files; checks the rest."""
        a, b = self.a.read_bytes(), self.b.read_bytes()
        assert a[: 4 * S] == self.a0[: 4 * S] and a[12 * S :] == self.a0[12 * S :], \
            "bytes outside the mapped range of a.img changed"
        assert b[: 2 * S] == self.b0[: 2 * S] and b[10 * S :] == self.b0[10 * S :], \
            "bytes outside the mapped range of b.img changed"
        return a[4 * S : 12 * S] + b[2 * S : 10 * S]

    async def inode(self, name: str) -> int:
        return (await self.fs.lookup(ROOT, name.encode(), None)).st_ino

    async def open(self, name: str) -> int:
        info = await self.fs.open(await self.inode(name), os.O_RDWR, None)
        return info.fh


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    mgr = make_manager()
    fs = DeviceFS(mgr)
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a0, b0 = make_image(a, 16 * S, seed=21), make_image(b, 16 * S, seed=22)
    await mgr.create("d", "0 8 linear a.img 4\n8 8 linear b.img 2", str(tmp_path))
    await mgr.create("z", "0 8 zero", "/")
    await mgr.create("e", "0 8 error", "/")
    e = Env(mgr=mgr, fs=fs, a=a, b=b, a0=a0, b0=b0,
            model=bytearray(a0[4 * S : 12 * S] + b0[2 * S : 10 * S]))
    yield e
    await remove_all_checked(mgr)


def fuse_errno(info: pytest.ExceptionInfo[pyfuse3.FUSEError]) -> int:
    return info.value.errno


# -- metadata --------------------------------------------------------------------------------


async def test_lookup_and_getattr(env: Env) -> None:
    attr = await env.fs.lookup(ROOT, b"d", None)
    assert stat.S_ISREG(attr.st_mode)
    assert attr.st_size == DEV_BYTES
    assert (await env.fs.getattr(attr.st_ino, None)).st_size == DEV_BYTES
    assert (await env.fs.lookup(ROOT, b"z", None)).st_size == 8 * S
    root = await env.fs.getattr(ROOT, None)
    assert stat.S_ISDIR(root.st_mode)
    assert stat.S_ISDIR((await env.fs.lookup(ROOT, b"..", None)).st_mode)
    inodes = {(await env.fs.lookup(ROOT, n, None)).st_ino for n in (b"d", b"z", b"e")}
    assert len(inodes) == 3 and ROOT not in inodes


async def test_lookup_errors(env: Env) -> None:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await env.fs.lookup(ROOT, b"nope", None)
    assert fuse_errno(info) == errno.ENOENT
    d = await env.inode("d")
    with pytest.raises(pyfuse3.FUSEError) as info:
        await env.fs.lookup(d, b"d", None)
    assert fuse_errno(info) == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as info:
        await env.fs.getattr(9999, None)
    assert fuse_errno(info) == errno.ENOENT
    with pytest.raises(pyfuse3.FUSEError) as info:
        await env.fs.open(9999, os.O_RDWR, None)
    assert fuse_errno(info) == errno.ENOENT


async def test_names_follow_manager(env: Env) -> None:
    await env.mgr.create("new", "0 24 zero", "/")
    assert (await env.fs.lookup(ROOT, b"new", None)).st_size == 24 * S
    old_inode = await env.inode("new")
    await env.mgr.remove("new")
    with pytest.raises(pyfuse3.FUSEError):
        await env.fs.lookup(ROOT, b"new", None)
    with pytest.raises(pyfuse3.FUSEError):
        await env.fs.getattr(old_inode, None)
    await env.mgr.create("new", "0 8 zero", "/")
    assert await env.inode("new") != old_inode  # a new device is a new inode


async def test_size_follows_table_swap(env: Env) -> None:
    md = env.mgr.get("z")
    await md.load(await env.mgr.build_table(md, "0 32 zero", "/"))
    await md.resume()
    assert (await env.fs.lookup(ROOT, b"z", None)).st_size == 32 * S


async def test_truncate_is_ignored_like_on_a_block_device(env: Env) -> None:
    inode = await env.inode("d")
    fh = (await env.fs.open(inode, os.O_RDWR, None)).fh
    await env.fs.write(fh, 0, b"\x5a" * S)
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 123
    got = await env.fs.setattr(inode, attr, SimpleNamespace(update_size=True), None, None)
    assert got.st_size == DEV_BYTES
    assert await env.fs.read(fh, 0, S) == b"\x5a" * S  # nothing was cut off


async def test_statfs(env: Env) -> None:
    st = await env.fs.statfs(None)
    assert st.f_blocks == 16 + 8 + 8
    assert st.f_files == 3


async def test_open_release_count_and_busy_remove(env: Env) -> None:
    md = env.mgr.get("d")
    fh1, fh2 = await env.open("d"), await env.open("d")
    assert fh1 != fh2
    assert md.open_count == 2
    with pytest.raises(DeviceBusyError):
        await env.mgr.remove("d")
    await env.fs.release(fh1)
    assert md.open_count == 1
    await env.fs.release(fh2)
    assert md.open_count == 0
    await env.mgr.remove("d")


# -- data ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("off", "length"),
    [(100, 1000), (511, 2), (0, 512), (512, 1024), (0, 1), (511, 1), (1, 510),
     (BOUNDARY - 300, 600),       # across the end of the first target
     (BOUNDARY - 1, 2), (BOUNDARY, 1), (BOUNDARY - 512, 1024),
     (0, DEV_BYTES), (1, DEV_BYTES - 2), (DEV_BYTES - 1, 1), (DEV_BYTES - 700, 700)],
)
async def test_unaligned_write_is_byte_exact(env: Env, off: int, length: int) -> None:
    fh = await env.open("d")
    data = pattern(off * 7919 + length, length)
    assert await env.fs.write(fh, off, data) == length
    env.model[off : off + length] = data
    assert env.device_bytes() == bytes(env.model)


async def test_sequence_of_writes_matches_model(env: Env) -> None:
    fh = await env.open("d")
    rng = random.Random(5)
    for _ in range(40):
        off = rng.randrange(DEV_BYTES)
        length = rng.randint(1, min(1500, DEV_BYTES - off))
        data = rng.randbytes(length)
        assert await env.fs.write(fh, off, data) == length
        env.model[off : off + length] = data
    assert env.device_bytes() == bytes(env.model)


@pytest.mark.parametrize(
    ("off", "size"),
    [(0, DEV_BYTES), (100, 1000), (511, 2), (1, 1), (BOUNDARY - 3, 6), (BOUNDARY, 512),
     (7, 4096), (DEV_BYTES - 1, 1), (DEV_BYTES - 100, 4096), (0, 1 << 20)],
)
async def test_unaligned_read(env: Env, off: int, size: int) -> None:
    fh = await env.open("d")
    got = await env.fs.read(fh, off, size)
    assert got == bytes(env.model[off : off + size])
    assert isinstance(got, (bytes, bytearray, memoryview))


@pytest.mark.parametrize("off", [DEV_BYTES, DEV_BYTES + 1, DEV_BYTES + 4096, 1 << 40])
async def test_read_past_end_is_eof(env: Env, off: int) -> None:
    fh = await env.open("d")
    assert await env.fs.read(fh, off, 4096) == b""


async def test_read_zero_bytes(env: Env) -> None:
    fh = await env.open("d")
    assert await env.fs.read(fh, 100, 0) == b""


@pytest.mark.parametrize("off", [DEV_BYTES, DEV_BYTES + 1, DEV_BYTES + 512, 1 << 40])
async def test_write_past_end_is_enospc(env: Env, off: int) -> None:
    fh = await env.open("d")
    with pytest.raises(pyfuse3.FUSEError) as info:
        await env.fs.write(fh, off, b"x" * 10)
    assert fuse_errno(info) == errno.ENOSPC
    assert env.device_bytes() == bytes(env.model)


@pytest.mark.parametrize(("off", "length"), [(DEV_BYTES - 100, 500), (DEV_BYTES - 512, 1024)])
async def test_write_across_end_is_short(env: Env, off: int, length: int) -> None:
    fh = await env.open("d")
    data = pattern(off, length)
    n = await env.fs.write(fh, off, data)
    assert n == DEV_BYTES - off
    env.model[off:] = data[:n]
    assert env.device_bytes() == bytes(env.model)


async def test_error_target_maps_to_eio(env: Env) -> None:
    fh = await env.open("e")
    for call in (env.fs.read(fh, 0, 512), env.fs.read(fh, 3, 10),
                 env.fs.write(fh, 0, b"x" * 512), env.fs.write(fh, 3, b"x" * 10)):
        with pytest.raises(pyfuse3.FUSEError) as info:
            await call
        assert fuse_errno(info) == errno.EIO
    await env.fs.fsync(fh, True)  # an empty flush succeeds on error
    await env.fs.flush(fh)


async def test_zero_target_via_fuse(env: Env) -> None:
    fh = await env.open("z")
    assert await env.fs.write(fh, 10, b"\xff" * 100) == 100
    assert await env.fs.read(fh, 0, 8 * S) == bytes(8 * S)
    await env.fs.fsync(fh, False)


async def test_fsync_and_flush_linear(env: Env) -> None:
    fh = await env.open("d")
    await env.fs.write(fh, 5, b"abc")
    await env.fs.fsync(fh, True)
    await env.fs.flush(fh)
    env.model[5:8] = b"abc"
    assert env.device_bytes() == bytes(env.model)


async def test_backing_failure_maps_to_errno(env: Env) -> None:
    fh = await env.open("d")
    # make the backing file unreadable through its fd: close it under the table
    dev = env.mgr.get("d").live.targets[0].dev  # type: ignore[union-attr]
    fd, dev.fd = dev.fd, -1
    try:
        with pytest.raises(pyfuse3.FUSEError) as info:
            await env.fs.read(fh, 0, 512)
        assert fuse_errno(info) == errno.EBADF
        # the second target still works
        assert await env.fs.read(fh, BOUNDARY, 512) == bytes(env.model[BOUNDARY : BOUNDARY + 512])
    finally:
        dev.fd = fd


@pytest.mark.parametrize("seed", range(6))
async def test_concurrent_unaligned_writes_lose_nothing(env: Env, seed: int) -> None:
    """Many tasks write disjoint byte ranges that share sectors; every byte must land."""
    rng = random.Random(seed)
    fh = await env.open("d")
    lo = rng.randrange(0, 2 * S)
    hi = rng.randrange(DEV_BYTES - 2 * S, DEV_BYTES + 1)
    cuts = sorted(rng.sample(range(lo + 1, hi), 40))
    ranges = list(zip([lo, *cuts], [*cuts, hi], strict=True))
    rng.shuffle(ranges)
    writes = [(start, rng.randbytes(end - start)) for start, end in ranges]
    for start, data in writes:
        env.model[start : start + len(data)] = data

    async def writer(start: int, data: bytes) -> None:
        assert await env.fs.write(fh, start, data) == len(data)

    async with trio.open_nursery() as nursery:
        for start, data in writes:
            nursery.start_soon(writer, start, data)
    assert env.device_bytes() == bytes(env.model)
    node = env.fs._handles[fh]
    assert range_lock(node.md).held() == 0


async def test_concurrent_reads_and_writes_same_sector(env: Env) -> None:
    """Single bytes of one sector written concurrently, interleaved with reads."""
    fh = await env.open("d")
    base = BOUNDARY - S  # last sector of the first target
    values = pattern(9, S)
    reads: list[bytes] = []

    async def writer(i: int) -> None:
        await env.fs.write(fh, base + i, values[i : i + 1])

    async def reader() -> None:
        reads.append(await env.fs.read(fh, base, S))

    async with trio.open_nursery() as nursery:
        for i in range(0, S, 3):
            nursery.start_soon(writer, i)
            if i % 30 == 0:
                nursery.start_soon(reader)
    for i in range(0, S, 3):
        env.model[base + i] = values[i]
    assert env.device_bytes() == bytes(env.model)
    assert all(len(r) == S for r in reads)


@pytest.mark.parametrize(
    ("exc", "want"),
    [(OSError(errno.ENOSPC, "full"), errno.ENOSPC), (OSError("no errno"), errno.EIO),
     (RuntimeError("bug"), errno.EIO), (KeyError("bug"), errno.EIO)],
)
async def test_unexpected_errors_become_fuse_errors(env: Env,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    exc: Exception, want: int) -> None:
    await env.mgr.create("p", "0 8 unit-probe 0", "/")

    async def broken_map(self: object, bio: object) -> None:
        raise exc

    monkeypatch.setattr(ProbeTarget, "map", broken_map)
    fh = await env.open("p")
    with pytest.raises(pyfuse3.FUSEError) as info:
        await env.fs.read(fh, 0, 512)
    assert fuse_errno(info) == want
    with pytest.raises(pyfuse3.FUSEError) as info:
        await env.fs.write(fh, 1, b"ab")
    assert fuse_errno(info) == want
    assert range_lock(env.fs._handles[fh].md).held() == 0, "a failed write must drop its range lock"
