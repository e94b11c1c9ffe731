"""DeviceManager: names, remove, stacking, holders, cycles, remove_all (driven through
control.dispatch as the daemon does)."""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path

import pytest
from support.data import make_image, pattern
from support.system import fds_open_on
from support.targets import ProbeTarget, make_manager, remove_all_checked
from support.targets import run_verb as run

from dmuser.core.errors import (
    DeviceBusyError,
    DeviceExistsError,
    DmError,
    NoSuchDeviceError,
    TableError,
)
from dmuser.core.manager import MAX_NAME_LEN, DeviceManager

S = 512


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "a.img"
    make_image(path, 64 * S, seed=11)
    return path


# -- remove ---------------------------------------------------------------------------------


async def test_remove(mgr: DeviceManager, tmp_path: Path, img: Path) -> None:
    await run(mgr, "create", name="v", table="0 8 linear a.img 0", cwd=str(tmp_path))
    assert fds_open_on(img) == 1
    await run(mgr, "remove", name="v")
    assert "v" not in mgr.devices and mgr._backing == {}
    assert fds_open_on(img) == 0
    with pytest.raises(NoSuchDeviceError):
        await run(mgr, "remove", name="v")


async def test_remove_busy_unless_forced(mgr: DeviceManager, tmp_path: Path, img: Path) -> None:
    await run(mgr, "create", name="v", table="0 8 linear a.img 0", cwd=str(tmp_path))
    md = mgr.get("v")
    md.open_count = 1
    with pytest.raises(DeviceBusyError) as info:
        await run(mgr, "remove", name="v")
    assert info.value.errno == errno.EBUSY
    assert mgr.get("v") is md and md.live is not None and not md.suspended
    await run(mgr, "remove", name="v", force=True)
    assert "v" not in mgr.devices
    assert md.live is None
    assert mgr._backing == {} and fds_open_on(img) == 0


async def test_on_change_called(mgr: DeviceManager) -> None:
    calls: list[int] = []
    mgr.on_change = lambda: calls.append(len(mgr.devices))
    await mgr.create("a", "0 8 zero", "/")
    await mgr.remove("a")
    assert calls == [1, 0]


# -- names, failed loads ----------------------------------------------------------------------


async def test_duplicate_name_and_uuid(mgr: DeviceManager) -> None:
    await run(mgr, "create", name="v", table="0 8 zero", uuid="U1")
    first = mgr.get("v")
    with pytest.raises(DeviceExistsError, match="Device v already exists."):
        await run(mgr, "create", name="v", table="0 16 zero")
    assert mgr.get("v") is first and first.nr_sectors == 8
    with pytest.raises(DeviceExistsError) as info:
        await run(mgr, "create", name="w", table="0 8 zero", uuid="U1")
    assert info.value.errno == errno.EEXIST
    assert "w" not in mgr.devices


@pytest.mark.parametrize("name", ["", "a/b", "/", ".", "..", "x" * 200, "x" * (MAX_NAME_LEN + 1),
                                  "a\0b", "tab\there", "new\nline"])
async def test_invalid_names(mgr: DeviceManager, name: str) -> None:
    with pytest.raises(TableError, match="invalid device name"):
        await run(mgr, "create", name=name, table="0 8 zero")
    assert mgr.devices == {}


async def test_longest_name_and_odd_names_ok(mgr: DeviceManager) -> None:
    for name in ["x" * MAX_NAME_LEN, "...", "a b", "-dash", "ünï"]:
        await run(mgr, "create", name=name, table="0 8 zero")
    assert len(mgr.devices) == 5


async def test_failed_create_leaves_nothing(mgr: DeviceManager, tmp_path: Path, img: Path) -> None:
    with pytest.raises(TableError, match="Gap in table"):
        await run(mgr, "create", name="v", table="0 8 linear a.img 0\n9 8 zero",
                  cwd=str(tmp_path))
    assert mgr.devices == {} and mgr._backing == {} and fds_open_on(img) == 0


async def test_failed_reload_keeps_state(mgr: DeviceManager, tmp_path: Path, img: Path) -> None:
    await run(mgr, "create", name="v", table="0 8 linear a.img 0", cwd=str(tmp_path))
    await run(mgr, "reload", name="v", table="0 4 zero")
    with pytest.raises(TableError, match="No arguments required"):
        await run(mgr, "reload", name="v", table="0 8 zero x")
    md = mgr.get("v")
    assert md.inactive is not None and md.inactive.nr_sectors == 4  # previous inactive kept
    (entry,) = mgr._backing.values()
    assert entry[1] == 1


# -- stacking ------------------------------------------------------------------------------


async def test_stack_by_name(mgr: DeviceManager, tmp_path: Path, img: Path) -> None:
    await run(mgr, "create", name="lower", table="0 32 linear a.img 16", cwd=str(tmp_path))
    await run(mgr, "create", name="upper", table="0 8 linear lower 4", cwd=str(tmp_path))
    lower, upper = mgr.get("lower"), mgr.get("upper")
    assert lower.holders == 1 and upper.holders == 0
    assert (await run(mgr, "table", name="upper")).output == "0 8 linear lower 4\n"
    data = pattern(12, 8 * S)
    await upper.write(0, data)
    assert img.read_bytes()[20 * S : 28 * S] == data
    with pytest.raises(DeviceBusyError, match="in use by another mapped device"):
        await run(mgr, "remove", name="lower")
    with pytest.raises(DeviceBusyError):
        await run(mgr, "remove", name="lower", force=True)
    assert lower.live is not None and not lower.suspended
    await run(mgr, "remove", name="upper")
    assert lower.holders == 0
    await run(mgr, "remove", name="lower")


async def test_stack_by_mount_path(tmp_path: Path, img: Path) -> None:
    mnt = tmp_path / "mnt"
    mgr = make_manager(str(mnt))
    try:
        reply = await run(mgr, "create", name="lower", table="0 32 linear a.img 0",
                          cwd=str(tmp_path))
        assert reply.data == {"name": "lower", "path": str(mnt / "lower")}
        await run(mgr, "create", name="rel", table="0 8 linear mnt/lower 8", cwd=str(tmp_path))
        await run(mgr, "create", name="abs", table=f"0 8 linear {mnt}/lower 16", cwd="/")
        await run(mgr, "create", name="dot", table="0 8 linear ./lower 24", cwd=str(mnt))
        lower = mgr.get("lower")
        assert lower.holders == 3
        assert (await run(mgr, "table", name="rel")).output == f"0 8 linear {mnt}/lower 8\n"
        assert (await run(mgr, "ls")).output.startswith(f"abs\t({mnt}/abs)\n")
        data = pattern(13, 8 * S)
        await mgr.get("abs").write(0, data)
        assert img.read_bytes()[16 * S : 24 * S] == data
        with pytest.raises(TableError, match="Device lookup failed"):
            await run(mgr, "create", name="bad", table="0 8 linear mnt/nope 0", cwd=str(tmp_path))
        assert "bad" not in mgr.devices
    finally:
        await remove_all_checked(mgr)


async def test_self_reference_rejected(mgr: DeviceManager, tmp_path: Path, img: Path) -> None:
    await run(mgr, "create", name="a", table="0 8 linear a.img 0", cwd=str(tmp_path))
    with pytest.raises(TableError, match="a: linear: Device lookup failed") as info:
        await run(mgr, "reload", name="a", table="0 8 linear a 0")
    assert "its own device" in info.value.message
    md = mgr.get("a")
    assert md.holders == 0 and md.inactive is None


async def test_cycle_rejected(mgr: DeviceManager, tmp_path: Path, img: Path) -> None:
    await run(mgr, "create", name="a", table="0 16 linear a.img 0", cwd=str(tmp_path))
    await run(mgr, "create", name="b", table="0 8 linear a 0")
    await run(mgr, "create", name="c", table="0 8 linear b 0")
    a, b, c = mgr.get("a"), mgr.get("b"), mgr.get("c")
    for user in ("b", "c"):
        with pytest.raises(TableError, match="Device lookup failed"):
            await run(mgr, "reload", name="a", table=f"0 8 linear {user} 0")
    assert (a.holders, b.holders, c.holders) == (1, 1, 0)
    assert a.inactive is None
    # an inactive table counts too: d loads a table on a, then a may not use d
    await run(mgr, "create", name="d", table="0 8 zero")
    await run(mgr, "reload", name="d", table="0 8 linear a 0")
    with pytest.raises(TableError, match="Device lookup failed"):
        await run(mgr, "reload", name="a", table="0 8 linear d 0")
    assert a.holders == 2  # b's live table, d's inactive table
    await run(mgr, "clear", name="d")
    assert a.holders == 1
    # a fresh, unrelated device may use a, and a may use it in a second table
    await run(mgr, "create", name="z", table="0 8 zero")
    await run(mgr, "reload", name="a", table="0 8 linear z 0")
    assert mgr.get("z").holders == 1


async def test_failed_stacked_build_releases_holders(mgr: DeviceManager) -> None:
    await run(mgr, "create", name="low", table="0 8 zero")
    with pytest.raises(TableError):
        await run(mgr, "create", name="up", table="0 8 linear low 0\n8 8 linear missing 0")
    assert mgr.get("low").holders == 0
    with pytest.raises(TableError, match="too small for target"):
        await run(mgr, "create", name="up", table="0 16 linear low 0")
    assert mgr.get("low").holders == 0


class SpinGuard(dict):  # type: ignore[type-arg]
    """Stands in for DeviceManager.devices; fails instead of letting remove_all spin forever."""

    checks = 0

    def __len__(self) -> int:
        self.checks += 1
        if self.checks > 1000:
            raise AssertionError("remove_all is spinning: no remaining device is free")
        return super().__len__()


async def test_remove_all_removes_users_first(mgr: DeviceManager) -> None:
    await run(mgr, "create", name="a", table="0 8 zero")
    await run(mgr, "create", name="b", table="0 8 linear a 0")
    await run(mgr, "create", name="c", table="0 8 linear b 0")
    await run(mgr, "create", name="d", table="0 8 linear b 0")
    assert [mgr.get(n).holders for n in "abcd"] == [1, 2, 0, 0]
    mgr.get("c").open_count = 1  # remove_all forces
    mgr.devices = SpinGuard(mgr.devices)
    await mgr.remove_all()
    assert not mgr.devices and mgr._backing == {}


async def test_remove_all_terminates_with_leaked_holders(mgr: DeviceManager) -> None:
    await run(mgr, "create", name="a", table="0 8 zero")
    md = mgr.get("a")
    md.holders = 1  # as left behind by a leak
    mgr.devices = SpinGuard(mgr.devices)
    try:
        with contextlib.suppress(DmError):
            await mgr.remove_all()
    finally:
        md.holders = 0


async def test_create_with_failing_resume_releases_everything(
        mgr: DeviceManager, tmp_path: Path, img: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(self: object) -> None:
        raise DmError("preresume refused")

    monkeypatch.setattr(ProbeTarget, "preresume", refuse)
    with pytest.raises(DmError, match="preresume refused"):
        await run(mgr, "create", name="v", table="0 8 unit-probe 0 a.img 0", cwd=str(tmp_path))
    assert "v" not in mgr.devices
    assert ProbeTarget.instances[0].closed
    assert mgr._backing == {} and fds_open_on(img) == 0
