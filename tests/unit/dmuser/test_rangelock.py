"""RangeLock: overlapping holders exclude each other, disjoint ones run concurrently."""

from __future__ import annotations

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from dmuser.rangelock import RangeLock


class Holder:
    """A task that takes [start, end) and keeps it until ``leave`` is set."""

    def __init__(self, lock: RangeLock, start: int, end: int) -> None:
        self.lock, self.start, self.end = lock, start, end
        self.inside = False
        self.entered = False
        self.leave = trio.Event()

    async def run(self) -> None:
        async with self.lock.hold(self.start, self.end):
            self.inside = self.entered = True
            await self.leave.wait()
            self.inside = False


@pytest.mark.parametrize(("a", "b"), [((0, 8), (4, 12)), ((0, 8), (0, 8)), ((0, 8), (7, 8)),
                                      ((2, 3), (0, 100)), ((5, 10), (0, 6))])
async def test_overlapping_holders_exclude(a: tuple[int, int], b: tuple[int, int]) -> None:
    lock = RangeLock()
    first, second = Holder(lock, *a), Holder(lock, *b)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.run)
        await wait_all_tasks_blocked()
        assert first.inside
        nursery.start_soon(second.run)
        await wait_all_tasks_blocked()
        assert not second.entered, "an overlapping range must wait"
        assert lock.held() == 1
        first.leave.set()
        await wait_all_tasks_blocked()
        assert second.inside and not first.inside
        second.leave.set()
    assert lock.held() == 0


@pytest.mark.parametrize(("a", "b"), [((0, 8), (8, 16)), ((8, 16), (0, 8)), ((0, 1), (5, 6))])
async def test_disjoint_holders_run_concurrently(a: tuple[int, int], b: tuple[int, int]) -> None:
    lock = RangeLock()
    first, second = Holder(lock, *a), Holder(lock, *b)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.run)
        nursery.start_soon(second.run)
        await wait_all_tasks_blocked()
        assert first.inside and second.inside
        assert lock.held() == 2
        first.leave.set()
        second.leave.set()
    assert lock.held() == 0


async def test_waiters_on_same_holder_still_exclude_each_other() -> None:
    lock = RangeLock()
    blocker = Holder(lock, 0, 16)
    b, c = Holder(lock, 0, 4), Holder(lock, 2, 6)   # overlap each other and the blocker
    d = Holder(lock, 10, 12)                        # overlaps only the blocker
    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocker.run)
        await wait_all_tasks_blocked()
        for w in (b, c, d):
            nursery.start_soon(w.run)
        await wait_all_tasks_blocked()
        assert not (b.entered or c.entered or d.entered)
        blocker.leave.set()
        await wait_all_tasks_blocked()
        assert d.inside
        assert b.inside != c.inside, "exactly one of two overlapping waiters may enter"
        first, other = (b, c) if b.inside else (c, b)
        first.leave.set()
        await wait_all_tasks_blocked()
        assert other.inside
        other.leave.set()
        d.leave.set()
    assert lock.held() == 0


async def test_released_on_exception() -> None:
    lock = RangeLock()
    with pytest.raises(ValueError):
        async with lock.hold(0, 4):
            assert lock.held() == 1
            raise ValueError("boom")
    assert lock.held() == 0
    with trio.fail_after(1):
        async with lock.hold(0, 4):
            pass


async def test_cancelled_waiter_leaves_no_entry() -> None:
    lock = RangeLock()
    blocker = Holder(lock, 0, 8)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocker.run)
        await wait_all_tasks_blocked()
        scope = trio.CancelScope()

        async def waiter() -> None:
            with scope:
                async with lock.hold(4, 6):
                    pytest.fail("entered a held range")

        nursery.start_soon(waiter)
        await wait_all_tasks_blocked()
        scope.cancel()
        await wait_all_tasks_blocked()
        assert scope.cancelled_caught
        assert lock.held() == 1
        blocker.leave.set()
    assert lock.held() == 0


async def test_many_tasks_never_overlap() -> None:
    lock = RangeLock()
    inside: list[tuple[int, int]] = []
    max_seen = 0

    async def worker(start: int, end: int) -> None:
        nonlocal max_seen
        async with lock.hold(start, end):
            assert all(not (s < end and start < e) for s, e in inside)
            inside.append((start, end))
            max_seen = max(max_seen, len(inside))
            await trio.sleep(0)
            await trio.sleep(0)
            inside.remove((start, end))

    async with trio.open_nursery() as nursery:
        for i in range(60):
            start = (i * 7) % 40
            nursery.start_soon(worker, start, start + 1 + i % 5)
    assert lock.held() == 0
    assert max_seen > 1  # disjoint ranges did run at the same time
