"""mirror's direct writes and delayed cleaning, on real files with legs written in threads.

The kernel's guarantees must survive both dmuser shortcuts:

* a write never reaches a leg before its region's dirty mark is on the log
  device (log written, then flushed) — also when the legs are written by
  worker threads and when the write skips the daemon;
* a region is marked clean in the log only after every leg was flushed;
* a leg that fails a write gets its own error (status char), the other leg
  none, and the region is resynced.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import trio
import trio.testing
from support.fakes import Entry, RecordingFileDevice
from support.targets import TYPES

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.config import Config
from dmuser.core.errors import DmIOError
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.table import Table, TargetServices, parse_table
from dmuser.core.target import StatusType
from dmuser.targets.mirror.target import MirrorTarget

S = 512
MiB = 1 << 20
REGION = 2048  # 1 MiB regions
LEN = 4 * REGION


class FileRig:
    def __init__(self, tmp_path: Path, nursery: trio.Nursery) -> None:
        self.journal: list[Entry] = []
        self.paths = {}
        for name, size in (("a", LEN), ("b", LEN), ("log", 8)):
            p = tmp_path / name
            p.write_bytes(bytes(size * S))
            self.paths[name] = p
        self.devs = {n: RecordingFileDevice(str(p), n, self.journal)
                     for n, p in self.paths.items()}
        self.nursery = nursery
        self.md = MappedDevice("m")
        self.config = Config()

    async def start(self, args: str) -> MirrorTarget:
        table = await Table.build("m", parse_table(f"0 {LEN} mirror {args}"),
                                  lambda w: self.devs[w], lambda d: None,
                                  TargetServices(nursery=self.nursery, config=self.config),
                                  types=TYPES)
        await self.md.load(table)
        await self.md.resume()
        assert self.md.live is not None
        target = self.md.live.targets[0]
        assert isinstance(target, MirrorTarget)
        await target.ms.flush_daemon()  # the first pass (it writes the log) is over
        return target

    def log_bits(self) -> int:
        return self.paths["log"].read_bytes()[1024]

    def entries(self) -> list[tuple[str, str]]:
        return [(e.dev, e.kind) for e in self.journal]

    async def close(self) -> None:
        await self.md.close()
        for dev in self.devs.values():
            dev.close()


@pytest.fixture
def rig(tmp_path: Path, nursery: trio.Nursery) -> FileRig:
    return FileRig(tmp_path, nursery)


def before_first_leg_write(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    first = next(i for i, (n, k) in enumerate(entries) if n in "ab" and k == "write")
    return entries[:first]


async def test_mark_is_durable_before_leg_writes(rig: FileRig) -> None:
    await rig.start("disk 3 log 2048 nosync 2 a 0 b 0")
    assert rig.log_bits() == 0x0F
    rig.journal.clear()
    data = os.urandom(MiB)
    await rig.md.write(REGION, data)  # region 1, clean: through the daemon
    assert before_first_leg_write(rig.entries()) == [("log", "write"), ("log", "flush")]
    legs = [(e.dev, e.thread) for e in rig.journal if e.dev in "ab" and e.kind == "write"]
    assert sorted(n for n, _ in legs) == ["a", "b"]
    assert rig.log_bits() == 0x0D  # region 1 dirty on the log device
    for name in "ab":
        assert rig.paths[name].read_bytes()[REGION * S : REGION * S + MiB] == data
    await rig.close()


async def test_write_to_a_marked_region_skips_daemon_and_log(rig: FileRig) -> None:
    target = await rig.start("disk 3 log 2048 nosync 2 a 0 b 0")
    await rig.md.write(0, os.urandom(MiB))
    rig.journal.clear()

    async def daemon_write(io: object) -> None:
        raise AssertionError("a write to a marked region went through the daemon")

    target.ms.writer._do_write = daemon_write  # type: ignore[method-assign]
    await rig.md.write(0, os.urandom(MiB))  # region 0 still marked: direct
    assert sorted(rig.entries()) == [("a", "write"), ("b", "write")]  # no log I/O
    await rig.close()


async def test_clean_mark_waits_for_leg_flushes_and_the_delay(rig: FileRig) -> None:
    rig.config = Config(mirror_clean_delay=0.2)
    await rig.start("disk 3 log 2048 nosync 2 a 0 b 0")
    await rig.md.write(0, os.urandom(MiB))
    rig.journal.clear()
    await trio.sleep(0.05)
    assert rig.log_bits() == 0x0E  # still dirty: not clean for 0.2 s yet
    assert rig.entries() == []
    with trio.fail_after(5):
        while rig.log_bits() != 0x0F:
            await trio.sleep(0.01)
    entries = rig.entries()
    log_write = entries.index(("log", "write"))
    assert sorted(entries[:log_write]) == [("a", "flush"), ("b", "flush")]
    await rig.close()


async def test_suspend_cleans_at_once(rig: FileRig) -> None:
    await rig.start("disk 3 log 2048 nosync 2 a 0 b 0")
    await rig.md.write(0, os.urandom(MiB))
    await rig.md.write(3 * REGION, os.urandom(MiB))
    assert rig.log_bits() == 0x06
    rig.journal.clear()
    await rig.md.suspend()
    assert rig.log_bits() == 0x0F  # a clean deactivation leaves a clean log
    entries = rig.entries()
    log_write = entries.index(("log", "write"))
    assert {("a", "flush"), ("b", "flush")} <= set(entries[:log_write])
    await rig.close()


@pytest.mark.parametrize("features", ["", "1 handle_errors"])
async def test_leg_failure_fails_only_that_leg(rig: FileRig, features: str) -> None:
    target = await rig.start(f"disk 3 log 2048 nosync 2 a 0 b 0 {features}")
    await rig.md.write(0, os.urandom(MiB))  # region 0 marked: the next write is direct
    rig.devs["b"].fail_write = True
    data = os.urandom(MiB)
    if features:
        errors: list[Exception] = []

        async def writer() -> None:
            try:
                await rig.md.write(0, data)
            except DmIOError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:  # held until suspend, then EIO
            nursery.start_soon(writer)
            with trio.fail_after(5):
                while not target.ms.writer.holds:
                    await trio.sleep(0.005)
            assert target.status(StatusType.INFO).split()[5] == "AD"
            rig.devs["b"].fail_write = False
            await rig.md.suspend()
        assert len(errors) == 1
    else:
        await rig.md.write(0, data)  # reached leg a: success, region out of sync
        assert target.status(StatusType.INFO).split()[3:6] == ["3/4", "1", "AD"]
        assert rig.paths["a"].read_bytes()[:MiB] == data
    await rig.close()


async def test_fua_is_passed_to_every_leg(rig: FileRig) -> None:
    await rig.start("core 2 2048 nosync 2 a 0 b 0")
    rig.journal.clear()
    await rig.md.submit(Bio(Op.WRITE, 0, 2048, memoryview(bytearray(MiB)), ReqFlag.FUA))
    assert sorted(rig.entries()) == [("a", "write"), ("b", "write")]
    await rig.close()


async def test_cancelled_direct_write_reaches_every_leg(rig: FileRig) -> None:
    """Cancelling the submitter never leaves one leg written and the other not."""
    await rig.start("core 2 2048 nosync 2 a 0 b 0")
    data = os.urandom(MiB)
    with trio.CancelScope() as scope:
        scope.cancel()
        with contextlib.suppress(trio.Cancelled):  # depends on where it was noticed
            await rig.md.write(0, data)
    a, b = (rig.paths[n].read_bytes()[:MiB] for n in "ab")
    assert a == b
    await rig.close()



async def test_inline_direct_write_never_yields_between_legs(
        rig: FileRig, monkeypatch: pytest.MonkeyPatch) -> None:
    """On file legs a direct write is one pwrite per leg with no checkpoint
    between them and no dm-io: a task running at every scheduler step never
    sees the legs differ, nor the region's write count raised."""
    import dmuser.targets.mirror.writes as writes

    target = await rig.start("core 2 2048 nosync 2 a 0 b 0")
    await rig.md.write(0, os.urandom(MiB))
    rh = target.ms.rh

    async def no_dm_io(*args: object) -> int:
        raise AssertionError("an inline direct write went through dm-io")

    monkeypatch.setattr(writes, "dm_io_wait", no_dm_io)
    seen: list[tuple[bool, int]] = []
    done = False

    async def spy() -> None:
        while not done:
            a, b = (rig.paths[n].read_bytes()[:MiB] for n in "ab")
            reg = rh.regions.get(0)
            seen.append((a == b, reg.pending if reg is not None else 0))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(spy)
        await trio.lowlevel.checkpoint()  # the spy has run once
        for i in range(100):  # > IoPolicy.yield_every: the periodic yields happen
            await rig.md.write(i * 8 % REGION, os.urandom(4096))
        done = True
    assert len(seen) > 4  # the writer did yield, before its writes
    assert all(equal and pending == 0 for equal, pending in seen)
    assert rig.entries().count(("a", "write")) == 101
    await rig.close()
