"""DeviceManager and control.dispatch: the dmsetup verbs, names, stacking, holders, cycles."""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support.targets import make_manager

from dmuser.control import Reply, dispatch
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
def img(tmp_path: Path, h: SimpleNamespace) -> Path:
    path = tmp_path / "a.img"
    h.make_file(path, 64, seed=11)
    return path


async def run(mgr: DeviceManager, verb: str, **req: Any) -> Reply:
    return await dispatch(mgr, {"verb": verb, **req})


# -- create / ls / table / status / info ---------------------------------------------------


async def test_ls_empty_and_populated(mgr: DeviceManager, tmp_path: Path, img: Path) -> None:
    assert (await run(mgr, "ls")).output == "No devices found\n"
    await run(mgr, "create", name="zz", table="0 8 zero")
    reply = await run(mgr, "create", name="aa", table="0 8 linear a.img 0", cwd=str(tmp_path))
    assert reply.data == {"name": "aa", "path": "aa"}
    reply = await run(mgr, "ls")
    assert reply.output == "aa\t(aa)\nzz\t(zz)\n"
    assert reply.data == [{"name": "aa", "path": "aa"}, {"name": "zz", "path": "zz"}]


async def test_table_and_status_verbs(mgr: DeviceManager, tmp_path: Path, img: Path) -> None:
    await run(mgr, "create", name="v", table="0 8 linear a.img 16\n8 8 zero", cwd=str(tmp_path))
    await run(mgr, "create", name="e", table="0 4 error")
    assert (await run(mgr, "table", name="v")).output == f"0 8 linear {img} 16\n8 8 zero \n"
    assert (await run(mgr, "status", name="v")).output == "0 8 linear \n8 8 zero \n"
    all_tables = await run(mgr, "table")
    assert all_tables.output == f"e: 0 4 error \nv: 0 8 linear {img} 16\nv: 8 8 zero \n"
    assert all_tables.data == {"e": ["0 4 error "], "v": [f"0 8 linear {img} 16", "8 8 zero "]}
    with pytest.raises(NoSuchDeviceError, match="Device nope does not exist."):
        await run(mgr, "table", name="nope")


async def test_table_verb_empty_manager(mgr: DeviceManager) -> None:
    assert (await run(mgr, "table")).output == "No devices found\n"
    assert (await run(mgr, "status")).output == "No devices found\n"
    assert (await run(mgr, "info")).output == "No devices found\n"


async def test_create_without_table_then_reload_resume(mgr: DeviceManager, tmp_path: Path,
                                                       img: Path) -> None:
    await run(mgr, "create", name="v")
    md = mgr.get("v")
    assert md.live is None
    assert (await run(mgr, "table", name="v")).output == ""
    await run(mgr, "reload", name="v", table="0 8 linear a.img 0", cwd=str(tmp_path))
    assert (await run(mgr, "table", name="v")).output == ""
    assert (await run(mgr, "table", name="v", inactive=True)).output == \
        f"0 8 linear {img} 0\n"
    await run(mgr, "resume", name="v")
    assert (await run(mgr, "table", name="v")).output == f"0 8 linear {img} 0\n"
    assert md.nr_sectors == 8
    await run(mgr, "suspend", name="v")
    assert md.suspended
    await run(mgr, "reload", name="v", table="0 16 zero")
    await run(mgr, "clear", name="v")
    assert md.inactive is None
    await run(mgr, "resume", name="v")
    assert not md.suspended and md.nr_sectors == 8


async def test_info_verb(mgr: DeviceManager) -> None:
    await run(mgr, "create", name="v", table="0 8 zero\n8 8 error", uuid="UU")
    mgr.get("v").open_count = 3
    reply = await run(mgr, "info", name="v")
    assert reply.output == (
        "Name:              v\n"
        "State:             ACTIVE\n"
        "Tables present:    LIVE\n"
        "Open count:        3\n"
        "Event number:      0\n"
        "Number of targets: 2\n"
        "Size:              16 sectors\n"
        "File:              v\n"
        "UUID:              UU\n")
    (data,) = reply.data
    assert data["name"] == "v" and data["nr_sectors"] == 16 and data["open_count"] == 3
    assert data["uuid"] == "UU" and data["suspended"] is False
    await run(mgr, "suspend", name="v")
    await run(mgr, "reload", name="v", table="0 8 zero")
    out = (await run(mgr, "info", name="v")).output
    assert "State:             SUSPENDED\n" in out
    assert "Tables present:    LIVE & INACTIVE\n" in out


async def test_info_no_table(mgr: DeviceManager) -> None:
    await run(mgr, "create", name="v")
    out = (await run(mgr, "info", name="v")).output
    assert "Tables present:    None\n" in out
    assert "Size:              0 sectors\n" in out
    assert "UUID" not in out


# -- message --------------------------------------------------------------------------------


async def test_message_errors(mgr: DeviceManager, tmp_path: Path, img: Path) -> None:
    await run(mgr, "create", name="v", table="0 8 linear a.img 0\n8 8 zero", cwd=str(tmp_path))
    with pytest.raises(TableError, match=r"^Empty message received\.$"):
        await run(mgr, "message", name="v", sector="0", message=[])
    for sector in ("16", "100", 16):
        with pytest.raises(TableError, match=r"^Target message sector outside device\.$"):
            await run(mgr, "message", name="v", sector=sector, message=["hello"])
    for sector in ("-1", "x", "", "12abc", "0x1"):  # "%llu%c" fails
        with pytest.raises(TableError, match=r"^Invalid target message parameters\.$"):
            await run(mgr, "message", name="v", sector=sector, message=["hello"])
    for sector in ("0", "7", "8", "15", 15):
        with pytest.raises(DmError, match="^Target type does not support messages$") as info:
            await run(mgr, "message", name="v", sector=sector, message=["hello", "x"])
        assert info.value.errno == errno.EINVAL


async def test_message_to_tableless_device(mgr: DeviceManager) -> None:
    await run(mgr, "create", name="v")
    with pytest.raises(TableError, match="Target message sector outside device."):
        await run(mgr, "message", name="v", sector="0", message=["x"])


async def test_message_reaches_target(mgr: DeviceManager, probe_cls: type,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    await run(mgr, "create", name="v", table="0 8 zero\n8 8 unit-probe 0")
    got: list[list[str]] = []

    async def message(self: Any, args: list[str]) -> str:
        got.append(list(args))
        return "reply"

    monkeypatch.setattr(probe_cls, "message", message)
    reply = await run(mgr, "message", name="v", sector="9", message=["a", "b"])
    assert got == [["a", "b"]]
    assert reply.output == "reply\n"


# -- remove ---------------------------------------------------------------------------------


async def test_remove(mgr: DeviceManager, tmp_path: Path, img: Path, h: SimpleNamespace) -> None:
    await run(mgr, "create", name="v", table="0 8 linear a.img 0", cwd=str(tmp_path))
    assert h.fds_open_on(img) == 1
    await run(mgr, "remove", name="v")
    assert "v" not in mgr.devices and mgr._backing == {}
    assert h.fds_open_on(img) == 0
    with pytest.raises(NoSuchDeviceError):
        await run(mgr, "remove", name="v")


async def test_remove_busy_unless_forced(mgr: DeviceManager, tmp_path: Path, img: Path,
                                         h: SimpleNamespace) -> None:
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
    assert mgr._backing == {} and h.fds_open_on(img) == 0


async def test_on_change_called(mgr: DeviceManager) -> None:
    calls: list[int] = []
    mgr.on_change = lambda: calls.append(len(mgr.devices))
    await mgr.create("a", "0 8 zero", "/")
    await mgr.remove("a")
    assert calls == [1, 0]


# -- verbs, names ---------------------------------------------------------------------------


async def test_unknown_verb(mgr: DeviceManager) -> None:
    with pytest.raises(DmError, match="unknown verb 'frobnicate'"):
        await run(mgr, "frobnicate")
    with pytest.raises(DmError, match="unknown verb None"):
        await dispatch(mgr, {})


async def test_targets_and_ping(mgr: DeviceManager) -> None:
    reply = await run(mgr, "targets")
    assert reply.data["linear"] == [1, 5, 0]
    assert reply.data["zero"] == [1, 2, 0]
    assert reply.data["error"] == [1, 7, 0]
    assert "linear           v1.5.0\n" in reply.output
    assert "pid" in (await run(mgr, "ping")).data


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


async def test_failed_create_leaves_nothing(mgr: DeviceManager, tmp_path: Path, img: Path,
                                            h: SimpleNamespace) -> None:
    with pytest.raises(TableError, match="Gap in table"):
        await run(mgr, "create", name="v", table="0 8 linear a.img 0\n9 8 zero",
                  cwd=str(tmp_path))
    assert mgr.devices == {} and mgr._backing == {} and h.fds_open_on(img) == 0


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


async def test_stack_by_name(mgr: DeviceManager, tmp_path: Path, img: Path,
                             h: SimpleNamespace) -> None:
    await run(mgr, "create", name="lower", table="0 32 linear a.img 16", cwd=str(tmp_path))
    await run(mgr, "create", name="upper", table="0 8 linear lower 4", cwd=str(tmp_path))
    lower, upper = mgr.get("lower"), mgr.get("upper")
    assert lower.holders == 1 and upper.holders == 0
    assert (await run(mgr, "table", name="upper")).output == "0 8 linear lower 4\n"
    data = h.pattern(8, 12)
    await upper.write(0, data)
    assert h.read_file(img)[20 * S : 28 * S] == data
    with pytest.raises(DeviceBusyError, match="in use by another mapped device"):
        await run(mgr, "remove", name="lower")
    with pytest.raises(DeviceBusyError):
        await run(mgr, "remove", name="lower", force=True)
    assert lower.live is not None and not lower.suspended
    await run(mgr, "remove", name="upper")
    assert lower.holders == 0
    await run(mgr, "remove", name="lower")


async def test_stack_by_mount_path(tmp_path: Path, img: Path, h: SimpleNamespace) -> None:
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
        data = h.pattern(8, 13)
        await mgr.get("abs").write(0, data)
        assert h.read_file(img)[16 * S : 24 * S] == data
        with pytest.raises(TableError, match="Device lookup failed"):
            await run(mgr, "create", name="bad", table="0 8 linear mnt/nope 0", cwd=str(tmp_path))
        assert "bad" not in mgr.devices
    finally:
        await h.remove_all_checked(mgr)


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
        mgr: DeviceManager, tmp_path: Path, img: Path, h: SimpleNamespace, probe_cls: type,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse(self: object) -> None:
        raise DmError("preresume refused")

    monkeypatch.setattr(probe_cls, "preresume", refuse)
    with pytest.raises(DmError, match="preresume refused"):
        await run(mgr, "create", name="v", table="0 8 unit-probe 0 a.img 0", cwd=str(tmp_path))
    assert "v" not in mgr.devices
    assert probe_cls.instances[0].closed
    assert mgr._backing == {} and h.fds_open_on(img) == 0
