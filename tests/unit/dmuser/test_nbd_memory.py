"""What the NBD server holds while its device stalls: the daemon's byte budget.

The exported device is suspended (its requests wait, as behind a stalled
backing file) while NBD client devices of the same process send more than
the budget on several connections.  What the server holds is counted by
wrapping ``nbd_session.execute`` (the payload of every request in it), and
by the budget's own books (a dm-io ``PagePool`` counted in pages); quiescence
is ``wait_all_tasks_blocked``, not time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from support.data import make_image, pattern
from support.targets import nbd_manager
from support.targets import run_verb as run

from dmuser import nbd_session
from dmuser.core.manager import DeviceManager
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.units import PAGE_SIZE
from dmuser.formats import nbd
from dmuser.nbd_server import server_for
from dmuser.services.dm_io_mem import PagePool

S = 512
KiB = 1024
REQ = 64 * KiB
BUDGET = 512 * KiB


@pytest.fixture
async def mgr(nursery: trio.Nursery) -> DeviceManager:
    return await nbd_manager(nursery)


def held_bytes(pool: PagePool) -> int:
    return pool.statistics().pages_in_use * PAGE_SIZE


class Held:
    """The payload bytes of the requests in ``nbd_session.execute`` (now and at most)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = self.peak = 0
        real = nbd_session.execute

        async def counting(md: MappedDevice, exp: nbd_session.Export, req: nbd.Request,
                           payload: bytearray | None,
                           ) -> tuple[int, bytearray | memoryview | None]:
            n = req.length if req.type in (nbd.Cmd.READ, nbd.Cmd.WRITE) else 0
            self.now += n
            self.peak = max(self.peak, self.now)
            try:
                return await real(md, exp, req, payload)
            finally:
                self.now -= n

        monkeypatch.setattr(nbd_session, "execute", counting)


async def test_a_stalled_device_holds_the_budget_and_no_more(
        mgr: DeviceManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conns, writes, reads = 6, 6, 2  # each connection: 8 requests of 64 KiB
    region = (writes + reads) * REQ
    path = tmp_path / "a.img"
    data = make_image(path, conns * region, seed=9)
    held = Held(monkeypatch)
    server_for(mgr).budget = budget = PagePool(BUDGET // PAGE_SIZE)
    share = BUDGET // nbd_session.CONN_SHARE
    await run(mgr, "create", name="src", table=f"0 {len(data) // S} linear {path} 0")
    uri = (await run(mgr, "export", name="src", address=str(tmp_path / "s.sock"))).data["uri"]
    remotes = []
    for i in range(conns):  # one connection per table
        await run(mgr, "create", name=f"r{i}", table=f"0 {len(data) // S} linear {uri} 0")
        remotes.append(mgr.get(f"r{i}"))
    await run(mgr, "suspend", name="src")  # every request now waits in the device
    got: dict[tuple[int, int], bytes] = {}

    async def read(i: int, k: int, sector: int) -> None:
        got[i, k] = bytes(await remotes[i].read(sector, REQ // S))

    async def load(nursery: trio.Nursery, i: int) -> None:
        base = i * region // S
        for k in range(writes):
            nursery.start_soon(remotes[i].write, base + k * REQ // S, pattern(f"{i}.{k}", REQ))
        for k in range(reads):
            nursery.start_soon(read, i, k, base + (writes + k) * REQ // S)

    async with trio.open_nursery() as nursery:
        await load(nursery, 0)
        await trio.testing.wait_all_tasks_blocked()
        assert held.now == share  # one connection: its share, then TCP holds the rest
        for i in range(1, conns):
            await load(nursery, i)
        await trio.testing.wait_all_tasks_blocked()
        assert held.now == held_bytes(budget) == BUDGET  # all of them: the budget, no more
        await run(mgr, "resume", name="src")
    assert held.peak == BUDGET and held_bytes(budget) == 0
    expect = bytearray(data)
    for i in range(conns):
        for k in range(writes):
            pos = i * region + k * REQ
            expect[pos:pos + REQ] = pattern(f"{i}.{k}", REQ)
        for k in range(reads):
            pos = i * region + (writes + k) * REQ
            assert got[i, k] == data[pos:pos + REQ]
    assert path.read_bytes() == bytes(expect)
    for i in range(conns):
        await run(mgr, "remove", name=f"r{i}")
    await run(mgr, "unexport", name="src")


async def test_a_request_larger_than_the_budget_runs_alone(
        mgr: DeviceManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "b.img"
    make_image(path, 4 * BUDGET, seed=3)
    held = Held(monkeypatch)
    server_for(mgr).budget = budget = PagePool(BUDGET // PAGE_SIZE)
    await run(mgr, "create", name="src", table=f"0 {4 * BUDGET // S} linear {path} 0")
    uri = (await run(mgr, "export", name="src", address=str(tmp_path / "s.sock"))).data["uri"]
    await run(mgr, "create", name="r", table=f"0 {4 * BUDGET // S} linear {uri} 0")
    remote = mgr.get("r")
    await run(mgr, "suspend", name="src")
    big = pattern("big", 2 * BUDGET)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(remote.write, 0, big)
        await trio.testing.wait_all_tasks_blocked()
        assert held.now == len(big) and held_bytes(budget) == BUDGET
        nursery.start_soon(remote.write, 2 * BUDGET // S, pattern("small", REQ))
        await trio.testing.wait_all_tasks_blocked()
        assert held.now == len(big)  # the small one waits for the big one
        await run(mgr, "resume", name="src")
    assert path.read_bytes()[:2 * BUDGET + REQ] == big + pattern("small", REQ)
    assert held_bytes(budget) == 0
    await run(mgr, "remove", name="r")
    await run(mgr, "unexport", name="src")

