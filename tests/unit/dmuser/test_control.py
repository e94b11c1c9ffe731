"""control.dispatch: the dmsetup verbs (ls, table, status, info, create/reload/suspend/
resume/clear, message, targets, ping) and their exact output, over a DeviceManager."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from support.data import make_image
from support.targets import ProbeTarget
from support.targets import run_verb as run

from dmuser.control import dispatch
from dmuser.core.errors import DmError, NoSuchDeviceError, TableError
from dmuser.core.manager import DeviceManager

S = 512


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "a.img"
    make_image(path, 64 * S, seed=11)
    return path


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


async def test_message_reaches_target(mgr: DeviceManager,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    await run(mgr, "create", name="v", table="0 8 zero\n8 8 unit-probe 0")
    got: list[list[str]] = []

    async def message(self: Any, args: list[str]) -> str:
        got.append(list(args))
        return "reply"

    monkeypatch.setattr(ProbeTarget, "message", message)
    reply = await run(mgr, "message", name="v", sector="9", message=["a", "b"])
    assert got == [["a", "b"]]
    assert reply.output == "reply\n"


# -- other verbs ---------------------------------------------------------------------------


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


# -- wait ---------------------------------------------------------------------------------


async def test_wait_returns_on_an_event_times_out_and_ends_on_removal(
        mgr: DeviceManager) -> None:
    import trio

    await run(mgr, "create", name="w", table="0 8 zero")
    md = mgr.get("w")
    md.table_event()
    assert (await run(mgr, "wait", name="w")).data == {"event_nr": 1}  # 1 > 0: at once
    with pytest.raises(DmError, match="Timed out after 0.05 s") as e:
        await run(mgr, "wait", name="w", event_nr=1, timeout=0.05)
    assert e.value.errno == errno.ETIMEDOUT
    for bad in ({"event_nr": "x"}, {"event_nr": -1}, {"timeout": -1}, {"timeout": "1"}):
        with pytest.raises(TableError):
            await run(mgr, "wait", name="w", **bad)

    results: list[object] = []

    async def waiter(after: int) -> None:
        try:
            results.append((await run(mgr, "wait", name="w", event_nr=after)).data)
        except DmError as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, 1)
        await trio.testing.wait_all_tasks_blocked()
        assert results == []
        md.table_event()
    assert results == [{"event_nr": 2}]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, 2)
        await trio.testing.wait_all_tasks_blocked()
        await run(mgr, "remove", name="w")  # takes no lock the waiter holds
    assert isinstance(results[-1], NoSuchDeviceError)
    assert str(results[-1]) == "Device w was removed."
