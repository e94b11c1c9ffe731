"""mirror (dm-spec §5): table checks, status strings, writes/reads/resync, leg failure, suspend."""

from __future__ import annotations

import logging
import random

import pytest
import trio
import trio.testing
from support.data import pattern
from support.fakes import Entry, RecordingDevice
from support.targets import TYPES, DictResolver
from support.vectors import status_examples

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.config import Config
from dmuser.core.errors import DmIOError, NotSupportedError, TableError
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.table import Table, TargetServices, parse_table
from dmuser.core.target import StatusType
from dmuser.services.kcopyd import KcopydThrottle
from dmuser.targets.mirror.log.disk import DiskLog
from dmuser.targets.mirror.target import MirrorTarget

S = 512


def ops(journal: list[Entry]) -> list[tuple[str, str, int, int]]:
    """(device, kind, sector, nr_sectors) of each journal entry."""
    return [(e.dev, e.kind, e.sector, e.nr_sectors) for e in journal]


class Rig:
    """Devices named by their status names, and a mapped device on top."""

    def __init__(self, nursery: trio.Nursery | None,
                 config: Config | None = None, **sizes: int) -> None:
        self.config = config or Config()
        self.shared: dict[str, object] = {}  # TargetContext.shared of every table built here
        self.journal: list[Entry] = []  # every bio of every device, in order
        self.devs = {name: RecordingDevice(n, name, journal=self.journal)
                     for name, n in sizes.items()}
        self.resolver = DictResolver(self.devs)
        self.md = MappedDevice("m")
        self.nursery = nursery  # the service nursery tables get (TargetContext.nursery)

    async def build(self, text: str) -> Table:
        return await Table.build("t", parse_table(text), self.resolver.get, self.resolver.release,
                                 TargetServices(nursery=self.nursery, config=self.config,
                                                shared=self.shared),
                                 types=TYPES)

    def seed(self, name: str, seed: int) -> None:
        self.devs[name].buf[:] = pattern(seed, len(self.devs[name].buf))

    async def start(self, table: str, settle: bool = True) -> MirrorTarget:
        await self.md.load(await self.build(table))
        await self.md.resume()
        if settle:
            await trio.testing.wait_all_tasks_blocked()
        return self.target

    @property
    def target(self) -> MirrorTarget:
        assert self.md.live is not None
        target = self.md.live.targets[0]
        assert isinstance(target, MirrorTarget)
        return target

    def status(self) -> str:
        return self.target.status(StatusType.INFO)

    def leg(self, name: str, start: int = 0, nr: int | None = None) -> bytes:
        buf = self.devs[name].buf
        end = len(buf) if nr is None else (start + nr) * S
        return bytes(buf[start * S : end])

    async def close(self) -> None:
        ms = self.target.ms
        await self.md.close()
        assert self.resolver.outstanding() == 0
        assert ms.crash_error is None


@pytest.fixture
async def svc(nursery: trio.Nursery) -> trio.Nursery:
    """The service nursery a :class:`Rig` hands to its tables."""
    return nursery


#: The kernel's cleaning: a region is cleared in the log at the next daemon pass.
KERNEL_CLEAN = Config(mirror_clean_delay=0.0)


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


# -- constructor ---------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "error"), [
    ("", "Insufficient mirror log arguments"),
    ("core", "Insufficient mirror log arguments"),
    ("core x 1024 2 a 0 b 0", "Invalid mirror log argument count"),
    ("core 5 1024 2 a 0", "Insufficient mirror log arguments"),
    ("core 1 1000 2 a 0 b 0", "Error creating mirror dirty log"),
    ("core 3 1024 sync x 2 a 0 b 0", "Error creating mirror dirty log"),
    ("cire 1 1024 2 a 0 b 0", "Error creating mirror dirty log"),
    ("disk 2 nolog 1024 2 a 0 b 0", "Error creating mirror dirty log"),
    ("disk 1 1024 2 a 0 b 0", "Error creating mirror dirty log"),
    ("disk 2 small 1024 2 a 0 b 0", "Error creating mirror dirty log"),
    ("core 1 1024", "Invalid number of mirrors"),
    ("core 1 1024 1 a 0", "Invalid number of mirrors"),
    ("core 1 1024 10 a 0 b 0", "Invalid number of mirrors"),
    ("core 1 1024 x a 0 b 0", "Invalid number of mirrors"),
    ("core 1 1024 2 a 0 b", "Too few mirror arguments"),
    ("core 1 1024 2 a x b 0", "Invalid offset"),
    ("core 1 1024 2 a 0 nodev 0", "Device lookup failure"),
    ("core 1 1024 2 nodev 0 b x", "Device lookup failure"),
    ("core 1 1024 2 a 0 b 0 x", "Invalid number of features"),
    ("core 1 1024 2 a 0 b 0 2 handle_errors", "Not enough arguments to support feature count"),
    ("core 1 1024 2 a 0 b 0 1 Handle_errors", "Unrecognised feature requested"),
    ("core 1 1024 2 a 0 b 0 1 keep_log", "keep_log feature requires the handle_errors feature"),
    ("core 1 1024 2 a 0 b 0 1 handle_errors extra", "Too many mirror arguments"),
    ("core 1 1024 2 a 0 b 0 0 extra", "Too many mirror arguments"),
])
async def test_constructor_errors(args: str, error: str) -> None:
    rig = Rig(None, a=8192, b=8192, log=16, small=2)
    with pytest.raises(TableError) as info:
        await rig.build(f"0 8192 mirror {args}")
    assert info.value.message == f"t: mirror: {error}"
    assert rig.resolver.outstanding() == 0


@pytest.mark.parametrize(("args", "warning"), [
    ("core 1 1000 2 a 0 b 0", "invalid region size 1000"),
    ("cire 1 1024 2 a 0 b 0", 'Module for logging type "cire" not found.'),
    ("disk 2 small 1024 2 a 0 b 0", "log device small too small: need 1536 bytes"),
])
async def test_log_errors_are_logged(caplog: pytest.LogCaptureFixture,
                                     args: str, warning: str) -> None:
    rig = Rig(None, a=8192, b=8192, small=2)
    with caplog.at_level(logging.WARNING), pytest.raises(TableError):
        await rig.build(f"0 8192 mirror {args}")
    assert warning in caplog.text


async def test_leg_must_fit_its_device(svc: trio.Nursery) -> None:
    rig = Rig(svc, a=8192, b=8192)
    with pytest.raises(TableError, match="too small for target"):
        await rig.build("0 8192 mirror core 1 1024 2 a 0 b 1")
    assert rig.resolver.outstanding() == 0


async def test_needs_a_service_nursery() -> None:
    rig = Rig(None, a=64, b=64)
    with pytest.raises(Exception, match="service nursery"):
        await rig.build("0 64 mirror core 1 8 2 a 0 b 0")
    assert rig.resolver.outstanding() == 0


# -- status strings -----------------------------------------------------------------------------


@pytest.mark.parametrize("example", status_examples("mirror"), ids=lambda e: str(e["device"]))
async def test_golden_statuses(svc: trio.Nursery,
                               example: dict[str, object]) -> None:
    sizes = {"254:0": 32768, "254:16": 8192, "254:32": 8192, "254:48": 2048, "254:64": 24576}
    names = {"/dev/vda": "254:0", "/dev/vdd": "254:48", "/dev/vde": "254:64"}
    words = [names.get(w, w) for w in str(example["table_given"]).split()]
    rig = Rig(svc, **sizes)
    await rig.start(" ".join(words))
    assert rig.md.table_lines(StatusType.TABLE)[0] + "\n" == example["dmsetup_table"]
    assert rig.md.table_lines(StatusType.INFO)[0] + "\n" == \
        example["dmsetup_status_right_after_create"]
    await rig.close()


@pytest.mark.parametrize(("args", "table", "info"), [
    ("core 2 8 sync 3 a 0 b 8 c 16 1 handle_errors",
     "core 2 8 sync 3 a 0 b 8 c 16 1 handle_errors", "3 a b c 4/4 1 AAA 1 core"),
    ("disk 3 log 8 nosync 2 a 0 b 0 2 handle_errors keep_log",
     "disk 3 log 8 nosync 2 a 0 b 0 2 handle_errors keep_log", "2 a b 4/4 1 AA 3 disk log A"),
    ("core 1 16 2 a 0 b 0 2 keep_log handle_errors",
     "core 1 16 2 a 0 b 0 2 handle_errors keep_log", "2 a b 2/2 1 AA 1 core"),
])
async def test_status_strings(svc: trio.Nursery, args: str, table: str,
                              info: str) -> None:
    rig = Rig(svc, a=64, b=64, c=64, log=8)
    await rig.start(f"0 32 mirror {args}")
    assert rig.target.status(StatusType.TABLE) == table
    assert rig.status() == info
    await rig.close()


# -- resync -------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [64, 60])
async def test_initial_resync_copies_leg0_in_ascending_order(svc: trio.Nursery,
                                                             length: int) -> None:
    rig = Rig(svc, a=64, b=80, c=64)
    rig.seed("a", 1)
    await rig.start(f"0 {length} mirror core 1 16 3 a 0 b 16 c 0")
    assert rig.status() == "3 a b c 4/4 1 AAA 1 core"
    assert rig.leg("b", 16, length) == rig.leg("a", 0, length) == rig.leg("c", 0, length)
    assert rig.leg("b", 0, 16) == bytes(16 * S)
    copies = [(name, sector, n) for name, kind, sector, n in ops(rig.journal)
              if kind == "write" and name == "c"]
    tail = length - 48
    assert copies == [("c", 0, 16), ("c", 16, 16), ("c", 32, 16), ("c", 48, tail)]
    await rig.close()


async def test_nosync_copies_nothing(svc: trio.Nursery) -> None:
    rig = Rig(svc, a=64, b=64)
    rig.seed("a", 1)
    target = await rig.start("0 64 mirror core 2 16 nosync 2 a 0 b 0")
    assert rig.status() == "2 a b 4/4 1 AA 1 core"
    assert rig.leg("b") == bytes(64 * S)
    assert target.event_count == 1  # the first pass after construction sets in_sync
    await rig.close()


async def test_no_resync_before_resume(svc: trio.Nursery) -> None:
    rig = Rig(svc, a=64, b=64)
    rig.seed("a", 1)
    table = await rig.build("0 64 mirror core 1 16 2 a 0 b 0")
    await settle()
    assert rig.leg("b") == bytes(64 * S)
    assert table.lines(StatusType.INFO) == ["0 64 mirror 2 a b 0/4 1 AA 1 core"]
    await table.close()


async def test_throttled_resync_still_completes(svc: trio.Nursery,
                                                autojump_clock: trio.abc.Clock,
) -> None:
    rig = Rig(svc, Config(resync_throttle=20), a=256, b=256)
    rig.seed("a", 2)
    for dev in rig.devs.values():
        dev.jitter = 0.05
    await rig.start("0 256 mirror core 1 16 2 a 0 b 0", settle=False)
    while rig.target.dirty_log.get_sync_count() < 16:
        await trio.sleep(0.1)
    throttle = rig.shared["mirror.resync_throttle"]
    assert isinstance(throttle, KcopydThrottle) and throttle.percent == 20
    assert throttle.sleeps > 0
    assert rig.leg("a") == rig.leg("b")
    await rig.close()


# -- writes and reads -----------------------------------------------------------------------------


async def test_writes_reach_every_leg_at_its_offset(svc: trio.Nursery) -> None:
    rig = Rig(svc, a=64, b=80)
    await rig.start("0 64 mirror core 1 16 2 a 0 b 16")
    data = pattern(5, 40 * S)
    await rig.md.write(10, data)  # split by the core at region boundaries
    assert rig.leg("a", 10, 40) == data == rig.leg("b", 26, 40)
    assert await rig.md.read(10, 40) == data
    await rig.close()


async def test_reads_come_from_the_default_leg(svc: trio.Nursery) -> None:
    rig = Rig(svc, a=64, b=64)
    rig.seed("a", 1)
    rig.seed("b", 2)
    await rig.start("0 64 mirror core 2 16 nosync 2 a 0 b 0")
    assert await rig.md.read(0, 64) == rig.leg("a")
    reads = {name for name, kind, *_ in ops(rig.journal) if kind == "read"}
    assert reads == {"a"}
    await rig.close()


async def test_empty_flush_and_discard_go_to_every_leg(svc: trio.Nursery) -> None:
    rig = Rig(svc, a=64, b=64)
    rig.seed("a", 1)
    await rig.start("0 64 mirror core 1 16 2 a 0 b 0")
    rig.journal.clear()
    await rig.md.flush()
    await rig.md.submit(Bio(Op.DISCARD, 16, 16))
    assert sorted((n, k) for n, k, *_ in ops(rig.journal)) == \
        [("a", "discard"), ("a", "flush"), ("b", "discard"), ("b", "flush")]
    assert rig.leg("a", 16, 16) == bytes(16 * S) == rig.leg("b", 16, 16)
    await rig.close()


async def test_failed_discard_is_notsupp_and_does_not_degrade(svc: trio.Nursery) -> None:
    rig = Rig(svc, a=64, b=64)
    await rig.start("0 64 mirror core 1 16 2 a 0 b 0 1 handle_errors")
    rig.devs["b"].fail_write = True
    with pytest.raises(NotSupportedError):
        await rig.md.submit(Bio(Op.DISCARD, 0, 16))
    assert rig.status() == "2 a b 4/4 1 AA 1 core"
    await rig.close()


async def test_disk_log_marks_dirty_before_data_and_clean_after(svc: trio.Nursery) -> None:
    rig = Rig(svc, KERNEL_CLEAN, a=64, b=64, log=8)
    await rig.start("0 64 mirror disk 2 log 16 2 a 0 b 0")
    log = rig.devs["log"]
    assert log.buf[1024] == 0x0F
    rig.journal.clear()
    await rig.md.write(20, b"\x77" * S)
    first_data = next(i for i, e in enumerate(ops(rig.journal))
                      if e[0] in "ab" and e[1] == "write")
    before = [(n, k) for n, k, *_ in ops(rig.journal)[:first_data]]
    assert before == [("log", "write"), ("log", "flush")]  # dirty mark durable first
    await settle()
    after = [(n, k) for n, k, *_ in ops(rig.journal)[first_data:]]
    # the mark of cleanliness: legs flushed, then the log written (no log flush needed)
    assert after[-3:] in ([("a", "flush"), ("b", "flush"), ("log", "write")],
                          [("b", "flush"), ("a", "flush"), ("log", "write")])
    assert log.buf[1024] == 0x0F
    await rig.close()


# -- leg failures ---------------------------------------------------------------------------------


async def test_read_failover_without_handle_errors(svc: trio.Nursery) -> None:
    rig = Rig(svc, a=64, b=64)
    rig.seed("a", 1)
    target = await rig.start("0 64 mirror core 1 16 2 a 0 b 0")
    rig.devs["a"].fail_read = True
    assert await rig.md.read(0, 8) == rig.leg("b", 0, 8)
    assert rig.status() == "2 a b 4/4 1 RA 1 core"
    assert target.ms.legs.default.index == 0  # without handle_errors the default stays
    assert await rig.md.read(8, 8) == rig.leg("b", 8, 8)
    assert [n for n, k, *_ in ops(rig.journal)[-1:]] == ["b"]  # the failed leg is skipped now
    await rig.close()


async def test_all_legs_failed_reads_and_writes_eio(svc: trio.Nursery) -> None:
    rig = Rig(svc, a=64, b=64)
    await rig.start("0 64 mirror core 1 16 2 a 0 b 0")
    for dev in rig.devs.values():
        dev.fail_read = dev.fail_write = True
    with pytest.raises(DmIOError):
        await rig.md.read(0, 8)
    with pytest.raises(DmIOError):
        await rig.md.write(0, bytes(8 * S))
    assert rig.status().split()[5] == "DD"
    with pytest.raises(DmIOError):
        await rig.md.read(16, 8)
    await rig.close()


async def test_write_failure_without_handle_errors_succeeds_and_resyncs_on_resume(
        svc: trio.Nursery) -> None:
    rig = Rig(svc, a=64, b=64)
    await rig.start("0 64 mirror core 1 16 2 a 0 b 0")
    rig.devs["b"].fail_write = True
    await rig.md.write(16, b"\x42" * 8 * S)  # reached leg a: reported as success
    await settle()
    assert rig.status() == "2 a b 3/4 1 AD 1 core"
    rig.devs["b"].fail_write = False
    await rig.md.suspend()
    await rig.md.resume()
    await settle()
    assert rig.status() == "2 a b 4/4 1 AA 1 core"  # in sync again: error counts reset
    assert rig.leg("b", 16, 16) == rig.leg("a", 16, 16)
    await rig.close()


async def test_handle_errors_moves_default_and_holds_writes(svc: trio.Nursery) -> None:
    rig = Rig(svc, a=64, b=64, c=64)
    target = await rig.start("0 64 mirror core 1 16 3 a 0 b 0 c 0 1 handle_errors")
    events = target.event_count
    hooked: list[int] = []
    target.ti.table_event = lambda: hooked.append(1)  # type: ignore[attr-defined]
    rig.devs["a"].fail_write = True
    result: list[object] = []

    async def writer() -> None:
        try:
            await rig.md.write(0, b"\x01" * S)
            result.append("ok")
        except DmIOError as exc:
            result.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await settle()
        assert result == [] and len(target.ms.writer.holds) == 1  # held for userspace
        assert target.ms.legs.default.index == 1
        assert rig.status() == "3 a b c 3/4 1 DAA 1 core"
        assert target.event_count == events + 1 and hooked == [1]
        await rig.md.suspend()  # presuspend fails held writes
    assert isinstance(result[0], DmIOError)
    rig.journal.clear()
    await rig.md.resume()
    await settle()
    # resync of region 0 from the new default leg b; reads go to b
    assert rig.leg("c", 0, 16) == rig.leg("b", 0, 16)
    assert await rig.md.read(32, 4) == rig.leg("b", 32, 4)
    assert ("b", "read", 32, 4) in ops(rig.journal)
    await rig.close()


async def test_keep_log_completes_failed_writes(svc: trio.Nursery) -> None:
    rig = Rig(svc, a=64, b=64)
    target = await rig.start("0 64 mirror core 1 16 2 a 0 b 0 2 handle_errors keep_log")
    rig.devs["b"].fail_write = True
    await rig.md.write(0, b"\x01" * S)
    assert rig.status() == "2 a b 3/4 1 AD 1 core"
    rig.journal.clear()
    await rig.md.write(1, b"\x02" * S)  # NOSYNC region: the default leg only
    assert [(n, k) for n, k, *_ in ops(rig.journal)] == [("a", "write")]
    assert target.ms.writer.holds == []
    await rig.close()


async def test_primary_failure_while_out_of_sync_keeps_default(svc: trio.Nursery,
                                                               caplog: pytest.LogCaptureFixture
                                                               ) -> None:
    rig = Rig(svc, a=64, b=64)
    rig.devs["a"].fail_read = True
    with caplog.at_level(logging.ERROR):
        target = await rig.start("0 64 mirror core 1 16 2 a 0 b 0 1 handle_errors")
    assert "Unable to read primary mirror during recovery" in caplog.text
    assert "Primary mirror (a) failed while out-of-sync" in caplog.text
    assert target.ms.legs.default.index == 0
    assert rig.status() == "2 a b 0/4 1 SA 1 core"
    with pytest.raises(DmIOError):  # not in sync, default leg has errors: no leg to read
        await rig.md.read(0, 1)
    await rig.close()


async def test_log_failure_with_handle_errors_holds_writes(svc: trio.Nursery) -> None:
    rig = Rig(svc, a=64, b=64, log=8)
    target = await rig.start("0 64 mirror disk 2 log 16 2 a 0 b 0 1 handle_errors")
    rig.devs["log"].fail_write = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.md.write, 0, b"\x01" * S)
        await settle()
        assert target.ms.writer.log_failure and len(target.ms.writer.holds) == 1
        assert rig.status() == "2 a b 4/4 1 AA 3 disk log D"
        nursery.cancel_scope.cancel()
    await rig.md.suspend()
    assert target.ms.writer.holds == []
    await rig.close()


# -- model: writes racing resync ------------------------------------------------------------------

MODEL_REGION = 16
MODEL_LEN = 256
BLOCK = 4  # sectors; writer k owns the blocks b with b % WRITERS == k
WRITERS = 4


async def _race(seed: int, nlegs: int, log_args: str, features: str,
                transient_failure: bool) -> None:
    rng = random.Random(seed)
    names = "abc"[:nlegs]
    sizes = {name: MODEL_LEN + 8 * i for i, name in enumerate(names)}
    rig = Rig(None, log=8, **sizes)
    offsets = {name: 8 * i for i, name in enumerate(names)}
    nosync = "nosync" in log_args
    for i, name in enumerate(names):
        rig.seed(name, seed if nosync else seed + i)
        if nosync:  # nosync promises identical legs: make them so
            rig.devs[name].buf[:] = bytes(8 * i * S) + rig.leg("a", 0, MODEL_LEN)
        rig.devs[name].jitter = 0.004
    model = bytearray(rig.leg("a", 0, MODEL_LEN))
    legs = " ".join(f"{name} {offsets[name]}" for name in names)
    async with trio.open_nursery() as nursery:
        rig.nursery = nursery
        await rig.start(f"0 {MODEL_LEN} mirror {log_args} {nlegs} {legs} {features}",
                        settle=False)

        async def writer(k: int) -> None:
            wrng = random.Random(seed * 31 + k)
            owned = [b for b in range(MODEL_LEN // BLOCK) if b % WRITERS == k]
            for _ in range(12):
                block = wrng.choice(owned)
                first = wrng.randrange(BLOCK)
                n = wrng.randint(1, BLOCK - first)
                sector = block * BLOCK + first
                if wrng.random() < 0.3:
                    got = await rig.md.read(sector, n)
                    assert got == model[sector * S : (sector + n) * S]
                    continue
                data = wrng.randbytes(n * S)
                await rig.md.write(sector, data)
                model[sector * S : (sector + n) * S] = data  # acknowledged
                await trio.sleep(wrng.random() * 0.01)

        async def troublemaker() -> None:
            await trio.sleep(rng.random() * 0.05)
            if transient_failure and "handle_errors" not in features:
                # Without handle_errors a resync that fails is recorded as in sync (the
                # kernel's behaviour), so only fail a leg once the initial resync is over.
                ms = rig.target.ms
                while ms.log.get_sync_count() < ms.nr_regions:
                    await trio.sleep(0.01)
            if transient_failure:
                rig.devs[names[-1]].fail_write = True
                await trio.sleep(0.02)
                rig.devs[names[-1]].fail_write = False
            await rig.md.suspend()
            await trio.sleep(0.01)
            await rig.md.resume()

        async with trio.open_nursery() as inner:
            for k in range(WRITERS):
                inner.start_soon(writer, k)
            inner.start_soon(troublemaker)
        target = rig.target
        for _ in range(10_000):
            if target.dirty_log.get_sync_count() == target.ms.nr_regions:
                break
            await trio.sleep(0.01)
        await trio.testing.wait_all_tasks_blocked()
        for name in names:
            assert rig.leg(name, offsets[name], MODEL_LEN) == model, f"leg {name} differs"
        assert await rig.md.read(0, MODEL_LEN) == model
        assert target.status(StatusType.INFO).split()[nlegs + 1:nlegs + 4] == \
            [f"{MODEL_LEN // MODEL_REGION}/{MODEL_LEN // MODEL_REGION}", "1", "A" * nlegs]
        await rig.close()
        nursery.cancel_scope.cancel()


MODEL_CONFIGS = [
    (2, "core 1 16", "", False),
    (3, "core 2 16 sync", "", False),
    (2, "core 2 16 nosync", "", False),
    (3, "disk 2 log 16", "", False),
    (2, "core 1 16", "1 handle_errors", False),
    (3, "core 1 16", "2 handle_errors keep_log", False),
    (2, "core 1 16", "", True),
    (3, "disk 2 log 16", "", True),
    (3, "core 1 16", "2 handle_errors keep_log", True),
]


@pytest.mark.parametrize(("nlegs", "log_args", "features", "transient"), MODEL_CONFIGS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_writes_racing_resync_match_the_model(seed: int, nlegs: int,
                                              log_args: str, features: str,
                                              transient: bool) -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)
    trio.run(_race, seed, nlegs, log_args, features, transient, clock=clock)


async def test_crash_with_write_in_flight_resyncs_the_region(svc: trio.Nursery) -> None:
    """The dirty mark is on the log device before any leg write; a new activation
    on the crashed images (one leg written, one not) resyncs exactly that region."""
    rig = Rig(svc, a=64, b=64, log=8)
    rig.seed("a", 1)
    await rig.start("0 64 mirror disk 2 log 16 2 a 0 b 0")
    assert rig.leg("a") == rig.leg("b") and rig.devs["log"].buf[1024] == 0x0F
    rig.devs["b"].write_gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rig.md.write, 40, b"\x99" * 4 * S)
        await settle()
        # crash now: leg a has the data, leg b not, the log says region 2 is dirty
        images = {name: bytes(dev.buf) for name, dev in rig.devs.items()}
        assert images["log"][1024] == 0x0B
        assert images["a"][40 * S : 44 * S] != images["b"][40 * S : 44 * S]
        rig.devs["b"].write_gate.set()
    await rig.close()
    after = Rig(svc, a=64, b=64, log=8)
    for name, image in images.items():
        after.devs[name].buf[:] = image
    await after.start("0 64 mirror disk 2 log 16 2 a 0 b 0")
    copies = [(n, sector) for n, kind, sector, _ in ops(after.journal)
              if kind == "write" and n == "b"]
    assert copies == [("b", 32)]  # only region 2 was resynced
    assert after.leg("a") == after.leg("b")
    assert after.leg("a", 40, 4) == b"\x99" * 4 * S
    assert after.status() == "2 a b 4/4 1 AA 3 disk log A"
    await after.close()


async def test_leg_flush_failure_dirties_the_log(svc: trio.Nursery) -> None:
    rig = Rig(svc, KERNEL_CLEAN, a=64, b=64, log=8)
    target = await rig.start("0 64 mirror disk 2 log 16 2 a 0 b 0")
    rig.devs["b"].fail_flush = True
    await rig.md.write(0, b"\x01" * S)  # the write itself succeeds on both legs
    await settle()
    # cleaning region 0 needs every leg flushed first: b fails -> every region dirty
    assert rig.status() == "2 a b 4/4 1 AF 3 disk log A"
    assert rig.devs["log"].buf[1024] == 0
    assert isinstance(target.dirty_log, DiskLog) and target.dirty_log.flush_failed
    await rig.close()


async def test_internal_error_fails_io_instead_of_the_daemon(svc: trio.Nursery,
                                                              caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    rig = Rig(svc, a=64, b=64)
    target = await rig.start("0 64 mirror core 2 16 nosync 2 a 0 b 0")

    async def broken(errors_handled: bool, retire_all: bool = True) -> None:
        raise RuntimeError("bug")

    target.ms.rh.update_states = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR), pytest.raises(DmIOError):
        await rig.md.submit(Bio(Op.WRITE, 0, 0, None, ReqFlag.PREFLUSH))  # needs the daemon
    assert isinstance(target.ms.crash_error, Exception)
    assert "mirror daemon failed" in caplog.text
    with pytest.raises(DmIOError):
        await rig.md.read(0, 1)
    target.ms.crash_error = None
    await rig.close()


async def test_suspend_of_a_crashed_mirror_does_not_hang(svc: trio.Nursery) -> None:
    rig = Rig(svc, a=64, b=64)
    rig.devs["b"].write_gate = trio.Event()  # the first copy never finishes
    target = await rig.start("0 64 mirror core 1 16 2 a 0 b 0")
    assert target.ms.rh.recovery_in_flight == 1

    async def broken(errors_handled: bool, retire_all: bool = True) -> None:
        raise RuntimeError("bug")

    target.ms.rh.update_states = broken  # type: ignore[method-assign]
    with pytest.raises(DmIOError):
        await rig.md.write(32, bytes(S))
    with trio.fail_after(5):
        await rig.md.suspend()
    target.ms.crash_error = None
    rig.devs["b"].write_gate.set()
    await rig.close()
