"""Daemon shutdown quiesces stacks top-down (regression: name order hung forever)."""

from __future__ import annotations

import os
from pathlib import Path

import trio
import trio.testing
from support.targets import make_manager

from dmuser.control import dispatch
from dmuser.core.manager import DeviceManager


async def _stack(tmp_path: Path) -> DeviceManager:
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    mgr = make_manager(str(tmp_path / "mnt"))
    # name order (a-bottom, b-mid, z-top) is the reverse of stack order.
    await dispatch(mgr, {"verb": "create", "name": "a-bottom", "cwd": str(tmp_path),
                         "table": "0 2048 linear a.img 0"})
    await dispatch(mgr, {"verb": "create", "name": "b-mid", "cwd": str(tmp_path),
                         "table": "0 2048 linear a-bottom 0"})
    await dispatch(mgr, {"verb": "create", "name": "z-top", "cwd": str(tmp_path),
                         "table": "0 2048 linear b-mid 0"})
    return mgr


async def test_stack_order_puts_users_before_what_they_use(tmp_path: Path) -> None:
    mgr = await _stack(tmp_path)
    assert [md.name for md in mgr.stack_order()] == ["z-top", "b-mid", "a-bottom"]
    await mgr.remove_all()


async def test_quiesce_all_flushes_every_level_and_returns(tmp_path: Path) -> None:
    mgr = await _stack(tmp_path)
    # Route the bottom device's flushes through a counter.
    flushes = []
    bottom_dev = mgr.get("a-bottom").live.targets[0].dev  # type: ignore[union-attr]
    real_submit = bottom_dev.submit

    async def counting_submit(bio):  # type: ignore[no-untyped-def]
        if bio.is_empty_flush:
            flushes.append(bio)
        await real_submit(bio)

    bottom_dev.submit = counting_submit  # type: ignore[method-assign]
    await mgr.get("z-top").write(8, os.urandom(4096))
    with trio.fail_after(5):  # hung forever before the fix
        await mgr.quiesce_all()
    assert all(md.suspended for md in mgr)
    # top, mid and bottom flushes all reach the backing file
    assert len(flushes) == 3
    with trio.fail_after(5):
        await mgr.remove_all()
    assert not mgr.devices


async def test_quiesce_all_with_a_lower_device_left_suspended(tmp_path: Path) -> None:
    """A user-suspended lower device must not hold the daemon's shutdown forever."""
    mgr = await _stack(tmp_path)
    await mgr.get("a-bottom").suspend()
    data = os.urandom(4096)
    done: list[bool] = []
    async with trio.open_nursery() as nursery:
        async def held_write() -> None:
            await mgr.get("z-top").write(16, data)
            done.append(True)

        nursery.start_soon(held_write)
        await trio.testing.wait_all_tasks_blocked()
        assert not done  # held at the suspended bottom device
        with trio.fail_after(5):
            await mgr.quiesce_all()
    assert done  # the held write completed before shutdown
    assert (tmp_path / "a.img").read_bytes()[16 * 512:16 * 512 + 4096] == data
    with trio.fail_after(5):
        await mgr.remove_all()
