"""log-writes (dm-log-writes.c): the ordering rule (flush, FUA, discard, marks), the log's
bytes, replay at every flush point, status and errors; the kernel's run replayed byte for
byte (vector ``log-writes``, Debian 6.1)."""

from __future__ import annotations

import lzma
import random
import re

import pytest
import trio
from support.data import pattern
from support.fakes import MemDevice, RecordingDevice
from support.targets import DictResolver
from support.vectors import VECTORS, load_manifest, vector_pattern

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.errors import NotSupportedError, TableError, TargetArgError
from dmuser.core.table import Table
from dmuser.core.target import StatusType
from dmuser.formats.logwrites import (
    LOG_DISCARD_FLAG,
    LOG_FLUSH_FLAG,
    LOG_FUA_FLAG,
    LOG_MARK_FLAG,
    LOG_METADATA_FLAG,
    WRITE_LOG_MAGIC,
    Entry,
    LogFormatError,
    Super,
    decode_log,
    decode_super,
    encode_record,
    encode_super,
    iter_entries,
    replay,
)
from dmuser.targets.log_writes import LogWritesTarget

S = 512


def _devices(log_sectors: int = 2048, discard: bool = True) -> dict[str, MemDevice]:
    return {"254:0": RecordingDevice(256, "254:0", discard=discard),
            "254:16": RecordingDevice(log_sectors, "254:16")}


async def build(args: str = "254:0 254:16", length: int = 256,
                devices: dict[str, MemDevice] | None = None,
                ) -> tuple[Table, LogWritesTarget, dict[str, MemDevice]]:
    devices = devices or _devices()
    table = await DictResolver(devices).build(f"0 {length} log-writes {args}")
    target = table.targets[0]
    assert isinstance(target, LogWritesTarget)
    return table, target, devices


def logged(target: LogWritesTarget, logdev: MemDevice) -> list[Entry]:
    """The entries logged so far (the super block is only written after a FUA or mark)."""
    sup = Super(WRITE_LOG_MAGIC, 1, target.logged_entries, S)
    return list(iter_entries(logdev.buf, sup))


def summary(entries: list[Entry]) -> list[tuple[int, int, int]]:
    return [(e.sector, e.nr_sectors, e.flags) for e in entries]


# -- constructor and status -----------------------------------------------------------------


@pytest.mark.parametrize(("args", "error"), [
    ("", "Invalid argument count"),
    ("254:0", "Invalid argument count"),
    ("nodev 254:16", "Device lookup failed"),
    ("254:0 nodev", "Log device lookup failed"),
])
async def test_constructor_errors(args: str, error: str) -> None:
    resolver = DictResolver(_devices())
    with pytest.raises(TableError) as info:
        await resolver.build(f"0 256 log-writes {args}")
    assert info.value.message == f"t: log-writes: {error}"
    assert resolver.outstanding() == 0


async def test_status_and_extra_words_ignored() -> None:
    table, target, _ = await build("254:0 254:16 extra words")
    assert target.status(StatusType.TABLE) == "254:0 254:16"
    assert target.status(StatusType.INFO) == "0 0"
    await table.close()


# -- the ordering rule ------------------------------------------------------------------------


async def test_write_is_logged_only_after_a_later_flush() -> None:
    table, target, devs = await build()
    data = pattern(1, 8 * S)
    await table.submit(Bio.write(8, data))
    assert devs["254:0"].buf[8 * S:16 * S] == data          # passed through at once
    assert target.status(StatusType.INFO) == "0 0"           # ... but not logged
    assert devs["254:16"].buf == bytes(len(devs["254:16"].buf))
    await table.submit(Bio.flush())
    assert target.status(StatusType.INFO) == "2 10"          # 1 + 8 + 1 sectors used
    entries = logged(target, devs["254:16"])
    assert summary(entries) == [(8, 8, 0), (0, 0, LOG_FLUSH_FLAG)]
    assert entries[0].data == data and entries[0].offset == S
    assert devs["254:16"].buf[:S] == bytes(S)                # a flush does not write the super
    await table.close()


async def test_write_completing_during_a_flush_waits_for_the_next_flush() -> None:
    table, target, devs = await build()
    dev = devs["254:0"]
    await table.submit(Bio.write(0, pattern(1, S)))
    gate = trio.Event()
    dev.flush_gate = gate
    async with trio.open_nursery() as nursery:
        nursery.start_soon(table.submit, Bio.flush())        # takes [A] when mapped
        await trio.testing.wait_all_tasks_blocked()
        await table.submit(Bio.write(1, pattern(2, S)))      # B completes meanwhile
        gate.set()
    assert summary(logged(target, devs["254:16"])) == [(0, 1, 0), (0, 0, LOG_FLUSH_FLAG)]
    await table.submit(Bio.flush())
    assert summary(logged(target, devs["254:16"]))[2:] == [(1, 1, 0), (0, 0, LOG_FLUSH_FLAG)]
    await table.close()


async def test_completion_order_not_submission_order() -> None:
    table, target, devs = await build()
    dev = devs["254:0"]
    gate = dev.write_gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(table.submit, Bio.write(0, pattern(1, S)))
        await trio.testing.wait_all_tasks_blocked()
        dev.write_gate = None                                # the second write overtakes
        await table.submit(Bio.write(5, pattern(2, S)))
        gate.set()
    await table.submit(Bio.flush())
    assert [e.sector for e in logged(target, devs["254:16"])] == [5, 0, 0]
    await table.close()


async def test_fua_is_logged_at_completion_and_writes_the_super() -> None:
    table, target, devs = await build()
    log = devs["254:16"]
    await table.submit(Bio.write(3, pattern(1, S)))          # unflushed
    await table.submit(Bio.write(40, pattern(2, 2 * S), ReqFlag.FUA | ReqFlag.META))
    assert target.status(StatusType.INFO) == "1 3"
    assert decode_super(log.buf).nr_entries == 1
    assert summary(logged(target, log)) == [(40, 2, LOG_FUA_FLAG | LOG_METADATA_FLAG)]
    await table.submit(Bio.flush())
    assert summary(logged(target, log))[1:] == [(3, 1, 0), (0, 0, LOG_FLUSH_FLAG)]
    assert decode_super(log.buf).nr_entries == 1             # flushes leave the super alone
    await table.close()


async def test_flushes_completing_out_of_order_keep_completion_order() -> None:
    """A takes [old], B (mapped later) takes [new] and completes first: B covers old
    too (it completed before B was mapped), so old is logged before new, not after
    (the kernel's order, which a replay would end with old data in)."""
    table, target, devs = await build()
    dev = devs["254:0"]
    await table.submit(Bio.write(0, pattern(1, S)))          # old
    gate = dev.flush_gate = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(table.submit, Bio.flush())        # A: held at the device
        await trio.testing.wait_all_tasks_blocked()
        dev.flush_gate = None
        await table.submit(Bio.write(0, pattern(2, S)))      # new, same sector
        await table.submit(Bio.flush())                      # B overtakes A
        gate.set()
    entries = logged(target, devs["254:16"])
    assert summary(entries) == [(0, 1, 0), (0, 1, 0), (0, 0, LOG_FLUSH_FLAG),
                                (0, 0, LOG_FLUSH_FLAG)]
    assert [e.data for e in entries[:2]] == [pattern(1, S), pattern(2, S)]
    blank = bytearray(len(dev.buf))
    replay(entries, blank, limit=3)
    assert blank == dev.buf
    await table.close()


async def test_fua_write_cuts_its_sectors_out_of_older_unflushed_writes() -> None:
    table, target, devs = await build()
    dev, log = devs["254:0"], devs["254:16"]
    await table.submit(Bio.write(10, pattern(1, 8 * S)))     # 10..17, unflushed
    await table.submit(Bio(Op.DISCARD, 20, 4))               # 20..23, unflushed
    await table.submit(Bio.write(12, pattern(2, 10 * S), ReqFlag.FUA))  # 12..21
    await table.submit(Bio.flush())
    entries = logged(target, log)
    assert summary(entries) == [(12, 10, LOG_FUA_FLAG), (10, 2, 0),
                                (22, 2, LOG_DISCARD_FLAG), (0, 0, LOG_FLUSH_FLAG)]
    assert entries[1].data == pattern(1, 8 * S)[:2 * S]
    blank = bytearray(len(dev.buf))
    replay(entries, blank)
    assert blank == dev.buf
    await table.close()


async def test_reads_are_not_logged() -> None:
    table, target, devs = await build()
    await table.submit(Bio.read(0, bytearray(4 * S)))
    await table.submit(Bio.flush())
    assert summary(logged(target, devs["254:16"])) == [(0, 0, LOG_FLUSH_FLAG)]
    await table.close()


async def test_data_is_copied_when_mapped() -> None:
    table, target, devs = await build()
    buf = bytearray(pattern(1, S))
    await table.submit(Bio.write(2, buf))
    buf[:] = bytes(S)
    await table.submit(Bio.flush())
    assert logged(target, devs["254:16"])[0].data == pattern(1, S)
    await table.close()


# -- discards and marks -----------------------------------------------------------------------


@pytest.mark.parametrize("supported", [True, False])
async def test_discard_logged_without_data_at_the_next_flush(supported: bool) -> None:
    table, target, devs = await build(devices=_devices(discard=supported))
    dev = devs["254:0"]
    dev.buf[:] = pattern(3, len(dev.buf))
    await table.submit(Bio(Op.DISCARD, 16, 8))
    assert target.status(StatusType.INFO) == "0 0"
    await table.submit(Bio.flush())
    assert summary(logged(target, devs["254:16"])) == [(16, 8, LOG_DISCARD_FLAG),
                                                       (0, 0, LOG_FLUSH_FLAG)]
    assert target.status(StatusType.INFO) == "2 2"           # a discard record is one sector
    assert (dev.buf[16 * S:24 * S] == bytes(8 * S)) is supported
    with pytest.raises(NotSupportedError):
        await table.submit(Bio(Op.WRITE_ZEROES, 0, 1))
    await table.close()


async def test_mark_is_logged_at_once_with_its_text_and_the_super() -> None:
    table, target, devs = await build()
    log = devs["254:16"]
    await table.submit(Bio.write(0, pattern(1, S)))
    assert await target.message(["MARK", "one"]) is None
    assert target.status(StatusType.INFO) == "1 1"           # the write is still unflushed
    (mark,) = logged(target, log)
    assert (mark.flags, mark.nr_sectors, mark.data_len, mark.mark) == (LOG_MARK_FLAG, 0, 3, b"one")
    assert log.buf[S:2 * S] == encode_record(0, 0, LOG_MARK_FLAG, mark=b"one")
    assert log.buf[:S] == encode_super(1)
    await target.message(["mark", "x" * 600])
    assert logged(target, log)[1].mark == b"x" * 479         # kstrndup(maxsize - 1)
    await table.close()


@pytest.mark.parametrize(("words", "error"), [
    (["mark"], "Invalid log-writes message arguments, expect 2 arguments, got 1"),
    (["mark", "a", "b"], "Invalid log-writes message arguments, expect 2 arguments, got 3"),
    (["unmark", "x"], "Unrecognised log writes target message received: unmark"),
])
async def test_bad_messages(words: list[str], error: str) -> None:
    table, target, _ = await build()
    with pytest.raises(TargetArgError, match=f"^{re.escape(error)}$"):
        await target.message(words)
    assert target.status(StatusType.INFO) == "0 0"
    await table.close()


async def test_close_logs_unflushed_writes_and_the_end_mark() -> None:
    table, target, devs = await build()
    await table.submit(Bio.write(4, pattern(1, 2 * S)))
    await table.close()
    sup, entries = decode_log(devs["254:16"].buf)
    assert sup == Super(WRITE_LOG_MAGIC, 1, 2, S)
    assert [(e.sector, e.flags, e.mark) for e in entries] == [
        (4, 0, None), (0, LOG_MARK_FLAG, b"dm-log-writes-end")]


# -- limits and failures ------------------------------------------------------------------------


async def test_out_of_space_disables_logging() -> None:
    table, target, devs = await build(devices=_devices(log_sectors=12))
    await table.submit(Bio.write(0, pattern(1, 4 * S)))
    await table.submit(Bio.flush())                          # 1 + 5 + 1 = 7 < 12
    await table.submit(Bio.write(0, pattern(2, 4 * S)))
    await table.submit(Bio.flush())                          # 7 + 5 = 12: refused
    assert target.status(StatusType.INFO) == "2 11 logging_disabled"
    await table.submit(Bio.write(9, pattern(3, S)))          # still passes through
    assert devs["254:0"].buf[9 * S:10 * S] == pattern(3, S)
    await table.close()
    assert target.status(StatusType.INFO) == "2 11 logging_disabled"


async def test_log_write_failure_disables_logging() -> None:
    table, target, devs = await build()
    devs["254:16"].fail_write = True
    await table.submit(Bio.write(0, pattern(1, S)))
    await table.submit(Bio.flush())                          # the flush itself succeeds
    assert target.status(StatusType.INFO) == "1 2 logging_disabled"
    await table.close()


async def test_failed_writes_are_logged_too() -> None:
    table, target, devs = await build()
    devs["254:0"].fail_write = True
    with pytest.raises(Exception, match="injected"):
        await table.submit(Bio.write(0, pattern(1, S)))
    await table.submit(Bio.flush())
    assert summary(logged(target, devs["254:16"])) == [(0, 1, 0), (0, 0, LOG_FLUSH_FLAG)]
    await table.close()


async def test_sectors_are_not_shifted_by_the_target_start() -> None:
    devs = _devices()
    devs["254:32"] = MemDevice(256, "254:32")
    table = await DictResolver(devs).build(
        "0 64 linear 254:32 0\n64 128 log-writes 254:0 254:16")
    target = table.targets[1]
    assert isinstance(target, LogWritesTarget)
    await table.submit(Bio.write(70, pattern(1, S)))
    await table.submit(Bio.flush())
    assert devs["254:0"].buf[70 * S:71 * S] == pattern(1, S)  # as normal_map_bio: no remap
    assert logged(target, devs["254:16"])[0].sector == 70
    await table.close()


# -- replay ---------------------------------------------------------------------------------------


async def test_replay_reproduces_the_device_at_every_flush_and_mark() -> None:
    table, target, devs = await build()
    dev = devs["254:0"]
    rng = random.Random(7)
    snapshots: list[bytes] = []
    for step in range(60):
        choice = rng.random()
        if choice < 0.6:
            sector, n = rng.randrange(250), rng.randrange(1, 7)
            n = min(n, 256 - sector)
            await table.submit(Bio.write(sector, pattern(step, n * S)))
        elif choice < 0.7:
            sector = rng.randrange(240)
            await table.submit(Bio(Op.DISCARD, sector, rng.randrange(1, 16)))
        elif choice < 0.9:
            await table.submit(Bio.flush())
            snapshots.append(bytes(dev.buf))
        else:
            await target.message(["mark", f"m{step}"])
    await table.close()
    sup, entries = decode_log(devs["254:16"].buf)
    points = [e.index for e in entries if e.flags & LOG_FLUSH_FLAG]
    assert len(points) == len(snapshots) >= 5
    for index, want in zip(points, snapshots, strict=True):
        blank = bytearray(len(dev.buf))
        replay(entries, blank, limit=index + 1)
        assert blank == want
    blank = bytearray(len(dev.buf))
    replay(entries, blank)
    assert blank == dev.buf                                   # close logged the rest


def test_decoder_rejects_what_replay_log_rejects() -> None:
    log = bytearray(encode_super(2) + encode_record(1, 1, 0, pattern(1, S))
                    + bytes(S))
    with pytest.raises(LogFormatError, match="Malformed entry @3"):
        decode_log(log)                                      # all-zero second header
    log[2 * S + S:2 * S + S + 32] = encode_record(0, 0, LOG_FLUSH_FLAG)[:32]
    log[2 * S + S + 32] = 1
    with pytest.raises(LogFormatError, match="Malformed"):
        decode_log(log)                                      # header not zero padded
    with pytest.raises(LogFormatError, match="Magic"):
        decode_super(bytes(S))


# -- the kernel's log (vector log-writes, Debian 6.1) ------------------------------------------

VECTOR = load_manifest("log-writes")


def _kernel_image(name: str) -> bytes:
    return lzma.decompress((VECTORS / "log-writes" / f"{name}.xz").read_bytes())


def _status(step: int) -> str:
    return VECTOR["steps"][step]["output"].strip().splitlines()[-1].split(" ", 3)[3]


def _w(seed: int) -> Bio:
    w = VECTOR["writes"][f"w{seed}"]
    return Bio.write(w["sector"], vector_pattern(seed, w["sector"], w["nr_sectors"]))


async def test_kernel_log_decodes_and_replays_to_the_kernel_data_device() -> None:
    sup, entries = decode_log(_kernel_image("b.img"))
    assert sup.nr_entries == 11 and sup.sectorsize == S
    assert [e.mark for e in entries if e.mark] == [b"one", b"two", b"dm-log-writes-end"]
    blank = bytearray(4 << 20)
    replay(entries, blank)
    assert blank == _kernel_image("a.img")


async def test_same_workload_writes_the_kernel_log_byte_for_byte() -> None:
    """The guest's steps as bios (its O_DSYNC write arrived as FUA, its fsyncs as empty
    flushes; see the vector's manifest): the same status after each step, and at the end
    the same bytes on both devices."""
    devs = {"254:0": MemDevice(8192, "254:0"), "254:16": MemDevice(8192, "254:16")}
    table, target, _ = await build(length=8192, devices=devs)
    steps = VECTOR["steps"]
    assert steps[0]["output"].split() == ["log-writes", "v1.1.0"]
    assert steps[2]["output"].strip() == f"0 8192 log-writes {target.status(StatusType.TABLE)}"
    assert steps[3]["output"].strip() == f"0 8192 log-writes {target.status(StatusType.INFO)}"
    actions = {
        4: [_w(1)], 5: [_w(2), Bio.flush()], 6: ["one"], 7: [Bio(Op.DISCARD, 128, 16)],
        8: [_w(3), Bio.flush()], 9: [Bio.flush()], 10: [_w(4)], 11: ["two"],
    }
    actions[8][0].flags = ReqFlag.FUA
    for step, items in actions.items():
        for item in items:
            if isinstance(item, str):
                await target.message(["mark", item])
            else:
                await table.submit(item)
        assert _status(step) == target.status(StatusType.INFO), steps[step]["command"]
    await table.close()
    assert devs["254:16"].buf == _kernel_image("b.img")
    assert devs["254:0"].buf == _kernel_image("a.img")


def test_kernel_constructor_and_message_errors() -> None:
    steps = VECTOR["steps"]
    kernel = [re.sub(r" \(-E[A-Z]+\)$", "", steps[i]["output"].strip().splitlines()[-1])
              .split("log-writes: ", 1)[1] for i in (15, 16, 17)]
    assert kernel == ["Invalid argument count", "Device lookup failed",
                      "Log device lookup failed"]
    assert steps[18]["rc"] == 0
    warnings = [line.split("log-writes: ", 1)[1]
                for line in steps[12]["output"].splitlines() if "log-writes: " in line]
    assert warnings == [
        "Invalid log-writes message arguments, expect 2 arguments, got 1",
        "Unrecognised log writes target message received: unmark",
        "Invalid log-writes message arguments, expect 2 arguments, got 3"]
