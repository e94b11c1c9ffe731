"""``suspend --noflush``: bios a target holds are requeued, not failed.

The mirror holds writes that failed on a leg (handle_errors) until userspace
reacts.  A normal suspend fails them with EIO; a noflush suspend requeues them,
and they complete on the table swapped in at resume, as dmeventd's repair of a
kernel mirror does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing
from support.targets import make_manager

from dmuser.control import dispatch
from dmuser.core.errors import DmIOError
from dmuser.core.manager import DeviceManager

SECTORS = 2048


async def _call(mgr: DeviceManager, verb: str, **kw: object) -> str:
    return (await dispatch(mgr, {"verb": verb, **kw})).output


async def _wait_status(mgr: DeviceManager, name: str, needle: str) -> None:
    with trio.fail_after(10):
        while needle not in await _call(mgr, "status", name=name):
            await trio.sleep(0.01)


@pytest.mark.parametrize("noflush", [True, False])
async def test_held_mirror_write_is_requeued_by_a_noflush_suspend(
        tmp_path: Path, noflush: bool) -> None:
    for leg in ("leg0.img", "leg1.img"):
        (tmp_path / leg).write_bytes(bytes(SECTORS * 512))
    mgr = make_manager(str(tmp_path / "mnt"))
    cwd = str(tmp_path)
    data = os.urandom(4096)
    outcome: list[object] = []
    async with trio.open_nursery() as nursery:
        mgr.service_nursery = nursery
        for i in (0, 1):
            await _call(mgr, "create", name=f"leg{i}", cwd=cwd,
                        table=f"0 {SECTORS} linear leg{i}.img 0")
        mirror = f"0 {SECTORS} mirror core 1 1024 2 leg0 0 leg1 0 1 handle_errors"
        await _call(mgr, "create", name="m", cwd=cwd, table=mirror)
        await _wait_status(mgr, "m", " 2/2 1 AA ")
        await _call(mgr, "reload", name="leg1", cwd=cwd, table=f"0 {SECTORS} error")
        await _call(mgr, "resume", name="leg1")

        async def writer() -> None:
            try:
                await mgr.get("m").write(64, data)
                outcome.append("ok")
            except DmIOError as exc:
                outcome.append(exc)

        nursery.start_soon(writer)
        await _wait_status(mgr, "m", " AD ")  # leg 1 failed; the write is held
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == []
        await dispatch(mgr, {"verb": "suspend", "name": "m", "noflush": noflush})
        await trio.testing.wait_all_tasks_blocked()
        if not noflush:
            assert len(outcome) == 1 and isinstance(outcome[0], DmIOError)
        else:
            assert outcome == []  # requeued: waits for the resume
            # the repair: the mirror becomes a plain mapping of the surviving leg
            await _call(mgr, "reload", name="m", cwd=cwd, table=f"0 {SECTORS} linear leg0 0")
            await _call(mgr, "resume", name="m")
            with trio.fail_after(10):
                while not outcome:
                    await trio.sleep(0.01)
            assert outcome == ["ok"]
            assert (tmp_path / "leg0.img").read_bytes()[64 * 512:64 * 512 + 4096] == data
        await _call(mgr, "resume", name="m")
        await mgr.remove_all()
        nursery.cancel_scope.cancel()


