"""DeviceManager and MappedDevice: read-only tables (``--readonly``), deferred
remove (``remove --deferred``, ``@cancel_deferred_remove``) and the shared
backing-file claims, driven through control.dispatch as the daemon does."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import trio
from support.data import make_image
from support.targets import run_verb as run

from dmuser.core.bio import Bio
from dmuser.core.errors import DeviceBusyError, DmIOError
from dmuser.core.manager import DeviceManager

S = 512


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "a.img"
    make_image(path, 64 * S, seed=12)
    return path


async def test_read_only_table_fails_writes_with_eperm(mgr: DeviceManager, tmp_path: Path,
                                                       img: Path) -> None:
    table = "0 8 linear a.img 0"
    await run(mgr, "create", name="v", table=table, cwd=str(tmp_path), read_only=True)
    md = mgr.get("v")
    before = img.read_bytes()
    with pytest.raises(DmIOError) as exc:
        await md.submit(Bio.write(0, bytes(S)))
    assert exc.value.errno == errno.EPERM
    assert not md.write_direct(0, bytes(S))
    await md.submit(Bio.flush())  # an empty flush is no write
    buf = bytearray(S)
    await md.submit(Bio.read(0, buf))
    assert bytes(buf) == before[:S] and img.read_bytes() == before
    info = (await run(mgr, "info", name="v")).data[0]
    assert info["read_only"] is True
    # the flag belongs to the table: a read-write reload counts only once live
    await run(mgr, "reload", name="v", table=table, cwd=str(tmp_path))
    assert md.read_only
    await run(mgr, "resume", name="v")
    assert not md.read_only
    await md.submit(Bio.write(0, b"w" * S))
    assert img.read_bytes()[:S] == b"w" * S


async def test_deferred_remove_waits_for_the_last_close(mgr: DeviceManager, tmp_path: Path,
                                                        img: Path) -> None:
    async with trio.open_nursery() as nursery:
        mgr.service_nursery = nursery
        await run(mgr, "create", name="v", table="0 8 linear a.img 0", cwd=str(tmp_path))
        md = mgr.get("v")
        md.open_count = 1
        with pytest.raises(DeviceBusyError):
            await run(mgr, "remove", name="v")
        await run(mgr, "remove", name="v", deferred=True)
        assert mgr.get("v") is md and md.info().deferred_remove
        await run(mgr, "message", name="v", sector="0", message=["@cancel_deferred_remove"])
        assert not md.deferred_remove
        await run(mgr, "remove", name="v", deferred=True)
        await trio.sleep(0.5)  # several polls: still open, still there
        assert mgr.get("v") is md
        md.open_count = 0
        with trio.fail_after(10):
            while "v" in mgr.devices:
                await trio.sleep(0.05)
        assert mgr._backing == {}
        # a device that is not busy goes at once
        await run(mgr, "create", name="w", table="0 8 zero", cwd=str(tmp_path))
        await run(mgr, "remove", name="w", deferred=True)
        assert "w" not in mgr.devices
        mgr.service_nursery = None


async def test_backing_files_are_shared_and_kept_across_a_reload(
        mgr: DeviceManager, tmp_path: Path, img: Path) -> None:
    await run(mgr, "create", name="v", table="0 8 linear a.img 0", cwd=str(tmp_path))
    await run(mgr, "create", name="w", table=f"0 8 linear {img} 8", cwd=str(tmp_path))
    assert len(mgr._backing) == 1 and next(iter(mgr._backing.values()))[1] == 2
    first = next(iter(mgr._backing.values()))[0]
    await run(mgr, "reload", name="v", table="0 4 linear a.img 0", cwd=str(tmp_path))
    await run(mgr, "resume", name="v")
    assert next(iter(mgr._backing.values())) == (first, 2)  # the same open file throughout
    await run(mgr, "remove", name="v")
    await run(mgr, "remove", name="w")
    assert mgr._backing == {} and first.fd == -1
