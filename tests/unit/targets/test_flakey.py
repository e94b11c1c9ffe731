"""flakey (dm-spec §2.4): constructor checks, up/down clock, error/drop/corrupt, status strings."""

from __future__ import annotations

import random

import pytest
import trio
from support.data import pattern
from support.fakes import MemDevice
from support.targets import DictResolver
from support.vectors import status_examples

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.errors import DmIOError, TableError
from dmuser.core.table import Table
from dmuser.core.target import StatusType
from dmuser.targets.flakey import MAX_CORRUPT_SECTORS, FlakeyTarget

S = 512


def _devices(nr_sectors: int = 64) -> dict[str, MemDevice]:
    return {"254:0": MemDevice(nr_sectors, "254:0", seed=7)}


async def build(args: str, length: int = 32,
                devices: dict[str, MemDevice] | None = None) -> tuple[Table, MemDevice]:
    devices = devices or _devices()
    table = await DictResolver(devices).build(f"0 {length} flakey {args}")
    return table, devices["254:0"]


def flakey(table: Table) -> FlakeyTarget:
    target = table.targets[0]
    assert isinstance(target, FlakeyTarget)
    return target


async def ctr_error(args: str) -> str:
    with pytest.raises(TableError) as info:
        await build(args)
    prefix = "t: flakey: "
    assert info.value.message.startswith(prefix)
    return info.value.message[len(prefix):]


# -- constructor ---------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "error"), [
    ("254:0 0 5", "Invalid argument count"),
    ("254:0 x 5 5", "Invalid device sector"),
    ("254:0 -1 5 5", "Invalid device sector"),
    (f"254:0 {1 << 64} 5 5", "Invalid device sector"),
    ("254:0 0 x 5", "Invalid up interval"),
    (f"254:0 0 {1 << 32} 5", "Invalid up interval"),
    ("254:0 0 5 5x", "Invalid down interval"),
    ("254:0 0 0 0", "Total (up + down) interval is zero"),
    (f"254:0 0 {(1 << 32) - 1} 1", "Total (up + down) interval is zero"),
    (f"254:0 0 {(1 << 32) - 1} 2", "Interval overflow"),
    ("254:0 0 5 5 12", "Invalid number of feature args"),
    ("254:0 0 5 5 2 drop_writes", "Invalid number of feature args"),
    ("254:0 0 5 5 x", "Invalid number of feature args"),
    ("254:0 0 5 5 2 error_reads ERROR_READS", "Feature error_reads duplicated"),
    ("254:0 0 5 5 2 drop_writes drop_writes", "Feature drop_writes duplicated"),
    ("254:0 0 5 5 2 error_writes error_writes", "Feature error_writes duplicated"),
    ("254:0 0 0 10 2 drop_writes error_writes",
     "Feature error_writes conflicts with feature drop_writes"),
    ("254:0 0 0 10 2 error_writes drop_writes",
     "Feature drop_writes conflicts with feature error_writes"),
    ("254:0 0 5 5 4 corrupt_bio_byte 1 w 0", "Feature corrupt_bio_byte requires 4 parameters"),
    ("254:0 0 5 5 10 corrupt_bio_byte 1 w 0 0 corrupt_bio_byte 1 w 0 0",
     "Feature corrupt_bio_byte duplicated"),
    ("254:0 0 5 5 5 corrupt_bio_byte 0 w 0 0", "Invalid corrupt bio byte"),
    ("254:0 0 5 5 5 corrupt_bio_byte 1 x 0 0", "Invalid corrupt bio direction (r or w)"),
    ("254:0 0 5 5 5 corrupt_bio_byte 1 w 256 0",
     "Invalid corrupt value to write into bio byte (0-255)"),
    (f"254:0 0 5 5 5 corrupt_bio_byte 1 w 0 {1 << 32}", "Invalid corrupt bio flags mask"),
    ("254:0 0 5 5 1 random_read_corrupt", "Feature random_read_corrupt requires a parameter"),
    ("254:0 0 5 5 1 random_write_corrupt", "Feature random_write_corrupt requires a parameter"),
    ("254:0 0 5 5 2 random_read_corrupt 1000000001", "Invalid random corrupt argument"),
    ("254:0 0 5 5 4 random_read_corrupt 5 random_read_corrupt 6",
     "Feature random_read_corrupt duplicated"),
    ("254:0 0 5 5 4 random_write_corrupt 5 random_write_corrupt 6",
     "Feature random_write_corrupt duplicated"),
    ("254:0 0 5 5 1 frobnicate", "Unrecognised flakey feature requested"),
    ("254:0 0 5 5 6 drop_writes corrupt_bio_byte 1 W 0 0",
     "drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the "
     "WRITE flag set"),
    ("254:0 0 5 5 3 drop_writes random_write_corrupt 1",
     "drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the "
     "WRITE flag set"),
    ("254:0 0 5 5 3 error_writes random_write_corrupt 1",
     "error_writes is incompatible with random_write_corrupt or corrupt_bio_byte with the "
     "WRITE flag set"),
    ("254:0 0 5 5 6 error_reads corrupt_bio_byte 1 r 0 0",
     "error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with the "
     "READ flag set"),
    ("254:0 0 5 5 3 random_read_corrupt 1 error_reads",
     "error_reads is incompatible with random_read_corrupt or corrupt_bio_byte with the "
     "READ flag set"),
    ("nodev 0 5 5 1 drop_writes", "Device lookup failed"),
])
async def test_constructor_errors(args: str, error: str) -> None:
    assert (await ctr_error(args)).startswith(error)


async def test_feature_errors_take_precedence_over_device_lookup() -> None:
    assert await ctr_error("nodev 0 5 5 1 bogus") == "Unrecognised flakey feature requested"


async def test_duplicate_random_corrupt_of_zero_is_not_detected() -> None:
    table, _ = await build("254:0 0 5 5 4 random_read_corrupt 0 random_read_corrupt 7")
    assert flakey(table).feature_args.random_read_corrupt == 7
    await table.close()


# -- status strings -------------------------------------------------------------------------


@pytest.mark.parametrize("example", status_examples("flakey"), ids=lambda e: str(e["device"]))
async def test_golden_statuses(example: dict[str, object]) -> None:
    words = str(example["table_given"]).split()
    length = int(words[1])
    args = " ".join(words[3:]).replace("/dev/vda", "254:0")
    if example["create_rc"] != 0:
        with pytest.raises(TableError):
            await build(args, length, _devices(length))
        return
    table, _ = await build(args, length, _devices(length))
    assert table.lines(StatusType.TABLE)[0] + "\n" == example["dmsetup_table"]
    assert table.lines(StatusType.INFO)[0] + "\n" == example["dmsetup_status_right_after_create"]
    await table.close()


@pytest.mark.parametrize(("args", "table_status"), [
    ("254:0 0 5 5", "254:0 0 5 5 0 "),
    ("254:0 0 5 5 0", "254:0 0 5 5 0 "),
    ("254:0 7 5 5 2 random_read_corrupt 0", "254:0 7 5 5 0 "),
    ("254:0 0 5 5 2 error_writes ERROR_READS", "254:0 0 5 5 2 error_reads error_writes "),
    ("254:0 0 1 2 8 random_write_corrupt 9 corrupt_bio_byte 32 W 1 4 error_reads",
     "254:0 0 1 2 8 error_reads corrupt_bio_byte 32 w 1 4 random_write_corrupt 9 "),
    ("254:0 0 1 2 6 corrupt_bio_byte 32 R 1 4 error_writes",
     "254:0 0 1 2 6 error_writes corrupt_bio_byte 32 r 1 4 "),
    ("254:0 0 1 2 4 random_write_corrupt 3 random_read_corrupt 2",
     "254:0 0 1 2 4 random_read_corrupt 2 random_write_corrupt 3 "),
])
async def test_table_status_round_trips(args: str, table_status: str) -> None:
    table, _ = await build(args)
    assert flakey(table).status(StatusType.TABLE) == table_status
    assert flakey(table).status(StatusType.INFO) == ""
    again, _ = await build(table_status)
    assert flakey(again).status(StatusType.TABLE) == table_status
    await table.close()
    await again.close()


# -- the clock ------------------------------------------------------------------------------


async def test_up_then_down_then_up(autojump_clock: trio.abc.Clock) -> None:
    table, dev = await build("254:0 8 2 3")
    seen = []
    for _ in range(11):
        try:
            await table.submit(Bio.read(0, bytearray(S)))
            seen.append("up")
        except DmIOError:
            seen.append("down")
        await trio.sleep(1)
    assert seen == ["up", "up", "down", "down", "down"] * 2 + ["up"]
    await table.close()


async def test_clock_starts_at_construction(autojump_clock: trio.abc.Clock) -> None:
    table, _ = await build("254:0 0 3 1")
    await trio.sleep(3.5)
    with pytest.raises(DmIOError):
        await table.submit(Bio.read(0, bytearray(S)))
    await trio.sleep(0.6)
    await table.submit(Bio.read(0, bytearray(S)))
    await table.close()


@pytest.mark.parametrize(("up", "down", "always_down"), [(0, 5, True), (5, 0, False)])
async def test_zero_intervals(autojump_clock: trio.abc.Clock,
                              up: int, down: int, always_down: bool) -> None:
    table, _ = await build(f"254:0 0 {up} {down}")
    for _ in range(12):
        assert flakey(table).is_down() is always_down
        await trio.sleep(0.7)
    await table.close()


# -- I/O while up and down ------------------------------------------------------------------


async def test_up_is_linear() -> None:
    table, dev = await build("254:0 16 5 5", length=32)
    data = pattern(1, 4 * S)
    await table.submit(Bio.write(3, data))
    assert dev.buf[19 * S : 23 * S] == data
    buf = bytearray(4 * S)
    await table.submit(Bio.read(3, buf))
    assert buf == data
    await table.close()


async def test_default_errors_everything_while_down() -> None:
    table, dev = await build("254:0 0 0 1")
    before = bytes(dev.buf)
    for bio in (Bio.read(0, bytearray(S)), Bio.write(0, bytes(S)), Bio.flush(),
                Bio(Op.DISCARD, 0, 8)):
        with pytest.raises(DmIOError):
            await table.submit(bio)
    assert dev.buf == before
    await table.close()


async def test_drop_writes() -> None:
    table, dev = await build("254:0 0 0 1 1 drop_writes")
    before = bytes(dev.buf)
    await table.submit(Bio.write(0, b"\xaa" * 2 * S))
    await table.submit(Bio(Op.DISCARD, 0, 8))
    await table.submit(Bio.flush())
    assert dev.buf == before
    buf = bytearray(2 * S)
    await table.submit(Bio.read(0, buf))  # reads pass while down
    assert buf == before[: 2 * S]
    await table.close()


async def test_error_writes_lets_reads_pass() -> None:
    table, dev = await build("254:0 0 0 1 1 error_writes")
    with pytest.raises(DmIOError):
        await table.submit(Bio.write(0, bytes(S)))
    buf = bytearray(S)
    await table.submit(Bio.read(1, buf))
    assert buf == dev.buf[S : 2 * S]
    await table.close()


async def test_error_reads_lets_writes_pass() -> None:
    table, dev = await build("254:0 4 0 1 1 error_reads")
    with pytest.raises(DmIOError):
        await table.submit(Bio.read(0, bytearray(S)))
    await table.submit(Bio.write(0, b"\x11" * S))
    assert dev.buf[4 * S : 5 * S] == b"\x11" * S
    await table.close()


async def test_corrupt_write_uses_a_copy() -> None:
    table, dev = await build("254:0 2 0 1 5 corrupt_bio_byte 32 w 1 0")
    data = bytearray(b"\x55" * 2 * S)
    await table.submit(Bio.write(0, data))
    expected = bytearray(data)
    expected[31] = 1
    assert dev.buf[2 * S : 4 * S] == expected
    assert data == b"\x55" * 2 * S, "the caller's buffer must not change"
    await table.close()


async def test_corrupt_byte_beyond_bio_does_nothing() -> None:
    table, dev = await build(f"254:0 0 0 1 5 corrupt_bio_byte {S + 1} w 1 0")
    await table.submit(Bio.write(0, b"\x55" * S))
    assert dev.buf[:S] == b"\x55" * S
    await table.close()


@pytest.mark.parametrize(("flags_mask", "bio_flags", "corrupted"), [
    (0, ReqFlag.NONE, True),
    (1, ReqFlag.NONE, True),                 # op WRITE = 1 is in bi_opf's low byte
    (int(ReqFlag.FUA), ReqFlag.NONE, False),
    (int(ReqFlag.FUA), ReqFlag.FUA, True),
    (int(ReqFlag.FUA) | 1, ReqFlag.FUA, True),
    (2, ReqFlag.FUA, False),
])
async def test_corrupt_flags_mask_against_bi_opf(flags_mask: int,
                                                 bio_flags: ReqFlag, corrupted: bool) -> None:
    table, dev = await build(f"254:0 0 0 1 5 corrupt_bio_byte 1 w 9 {flags_mask}")
    await table.submit(Bio.write(0, b"\x55" * S, bio_flags))
    assert (dev.buf[0] == 9) is corrupted
    assert dev.buf[1:S] == b"\x55" * (S - 1)
    await table.close()


async def test_corrupt_read_at_completion() -> None:
    table, dev = await build("254:0 0 0 1 5 corrupt_bio_byte 3 r 7 0")
    buf = bytearray(2 * S)
    await table.submit(Bio.read(0, buf))
    expected = bytearray(dev.buf[: 2 * S])
    expected[2] = 7
    assert buf == expected
    await table.submit(Bio.write(0, b"\x01" * S))  # writes are not corrupted
    assert dev.buf[:S] == b"\x01" * S
    await table.close()


async def test_read_corruption_only_while_down(autojump_clock: trio.abc.Clock) -> None:
    table, dev = await build("254:0 0 1 1 5 corrupt_bio_byte 1 r 0 0")
    dev.buf[0] = 0xEE
    buf = bytearray(S)
    await table.submit(Bio.read(0, buf))
    assert buf[0] == 0xEE
    await trio.sleep(1)
    await table.submit(Bio.read(0, buf))
    assert buf[0] == 0
    await table.close()


async def test_random_corruption_probabilities() -> None:
    table, dev = await build("254:0 0 0 1 4 random_read_corrupt 1000000000 "
                                "random_write_corrupt 0")
    target = flakey(table)
    target.rng = random.Random(3)
    data = b"\x00" * 4 * S
    changed = 0
    for _ in range(20):
        dev.buf[: 4 * S] = data
        buf = bytearray(4 * S)
        await table.submit(Bio.read(0, buf))
        changed += buf != data
        assert sum(a != b for a, b in zip(buf, data, strict=True)) <= 1
        await table.submit(Bio.write(0, data))  # p = 0 for writes: never corrupted
        assert dev.buf[: 4 * S] == data
    assert changed >= 18  # a random byte may happen to be 0
    await table.close()


async def test_large_corrupted_write_is_cut_into_uio_maxiov_pieces() -> None:
    n = MAX_CORRUPT_SECTORS * 2 + 8
    devices = {"254:0": MemDevice(n, "254:0")}
    table = await DictResolver(devices).build(
        f"0 {n} flakey 254:0 0 0 1 5 corrupt_bio_byte 1 w 255 0")
    await table.submit(Bio.write(0, bytes(n * S)))
    buf = devices["254:0"].buf
    hits = [i for i in range(0, len(buf), S) if buf[i]]
    assert buf.count(0) == len(buf) - 3
    piece = MAX_CORRUPT_SECTORS * S
    assert hits == [0, piece, 2 * piece]
    await table.close()


async def test_empty_flush_while_down() -> None:
    table, dev = await build("254:0 0 0 1 1 error_reads")
    await table.submit(Bio.flush())  # write direction, no data: mapped normally
    assert dev.flushes == 1
    await table.close()


async def test_iterate_devices() -> None:
    table, dev = await build("254:0 16 5 5", length=32)
    assert flakey(table).iterate_devices() == [(dev, 16, 32)]
    await table.close()
    with pytest.raises(TableError, match="too small"):
        await build("254:0 40 5 5", length=32)
