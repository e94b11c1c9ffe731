"""dust (dm-dust.c): constructor checks, bad-block messages and replies, reads failing on
bad blocks, writes clearing them, status strings.

Debian's kernels are built without CONFIG_DM_DUST, so kvm-dm cannot run dm-dust: the
expected texts here are dm-dust.c's (torvalds/linux, drivers/md/dm-dust.c, target 1.0.0):
its ``ti->error`` strings, ``DMEMIT`` replies and ``DMERR`` texts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.data import pattern
from support.fakes import Entry, MemDevice, RecordingDevice
from support.targets import DictResolver

from dmuser.control import dispatch
from dmuser.core.bio import Bio, Op
from dmuser.core.errors import DmIOError, TableError, TargetArgError
from dmuser.core.manager import DeviceManager
from dmuser.core.table import Table
from dmuser.core.target import StatusType
from dmuser.targets.dust import DustTarget

S = 512


async def build(args: str, length: int = 64, dev_sectors: int = 128,
                journal: list[Entry] | None = None) -> tuple[Table, DustTarget, MemDevice]:
    dev = RecordingDevice(dev_sectors, "254:0", seed=5,
                          journal=journal if journal is not None else [])
    table = await DictResolver({"254:0": dev}).build(f"0 {length} dust {args}")
    target = table.targets[0]
    assert isinstance(target, DustTarget)
    return table, target, dev


async def ctr_error(args: str, length: int = 64) -> str:
    with pytest.raises(TableError) as info:
        await build(args, length)
    prefix = "t: dust: "
    assert info.value.message.startswith(prefix)
    return info.value.message[len(prefix):]


async def msg(target: DustTarget, text: str) -> str | None:
    return await target.message(text.split())


async def msg_error(target: DustTarget, text: str) -> str:
    with pytest.raises(TargetArgError) as info:
        await target.message(text.split())
    assert info.value.errno == 22  # EINVAL
    return info.value.message


# -- constructor ---------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "error"), [
    ("254:0 0", "Invalid argument count"),
    ("254:0 0 512 x", "Invalid argument count"),
    ("254:0 0 x", "Invalid block size parameter"),
    ("254:0 0 0", "Invalid block size parameter"),
    ("254:0 0 -512", "Invalid block size parameter"),
    (f"254:0 0 {1 << 32}", "Invalid block size parameter"),
    ("254:0 0 256", "Block size must be at least 512"),
    ("254:0 0 1000", "Block size must be a power of 2"),
    ("254:0 0 65536", "Block size is too large"),          # 128 sectors > 64-sector target
    ("254:0 x 512", "Invalid device offset sector"),
    ("254:0 -1 512", "Invalid device offset sector"),
    ("nodev 0 512", "Device lookup failed"),
    ("nodev x 1000", "Block size must be a power of 2"),   # block size first, then offset
])
async def test_constructor_errors(args: str, error: str) -> None:
    assert await ctr_error(args) == error


async def test_block_size_bounds() -> None:
    table, target, _ = await build("254:0 0 +32768", length=64)
    assert target.blksz == 32768 and target.ti.max_io_len == 64
    await table.close()
    assert await ctr_error("254:0 0 2147483648", length=1 << 23) == "Block size is too large"


async def test_status_strings() -> None:
    table, target, _ = await build("254:0 8 4096")
    assert target.status(StatusType.TABLE) == "254:0 8 4096"
    assert target.status(StatusType.INFO) == "254:0 bypass verbose"
    assert await msg(target, "enable") is None
    assert await msg(target, "quiet") is None
    assert target.status(StatusType.INFO) == "254:0 fail_read_on_bad_block quiet"
    assert await msg(target, "QUIET") is None
    assert await msg(target, "Disable") is None
    assert target.status(StatusType.INFO) == "254:0 bypass verbose"
    await table.close()


# -- messages ------------------------------------------------------------------------------


async def test_message_replies() -> None:
    table, target, _ = await build("254:0 0 512")
    assert await msg(target, "countbadblocks") == "countbadblocks: 0 badblock(s) found"
    assert await msg(target, "listbadblocks") == "No blocks in badblocklist"
    assert await msg(target, "clearbadblocks") == "dust_clear_badblocks: no badblocks found"
    assert await msg(target, "addbadblock 60") is None
    assert await msg(target, "addbadblock 7") is None
    assert await msg(target, "AddBadBlock 9 3") is None
    assert await msg(target, "queryblock 7") == "dust_query_block: block 7 found in badblocklist"
    assert await msg(target, "queryblock 8") == \
        "dust_query_block: block 8 not found in badblocklist"
    assert await msg(target, "countbadblocks") == "countbadblocks: 3 badblock(s) found"
    assert await msg(target, "listbadblocks") == "7\n9\n60"
    assert await msg(target, "removebadblock 60") is None
    assert await msg(target, "clearbadblocks") == "dust_clear_badblocks: badblocks cleared"
    assert await msg(target, "countbadblocks") == "countbadblocks: 0 badblock(s) found"
    await table.close()


async def test_message_errors() -> None:
    table, target, _ = await build("254:0 0 4096", dev_sectors=128)  # 16 blocks
    assert await msg(target, "addbadblock 16") is None        # the kernel's bound is inclusive
    assert await msg_error(target, "addbadblock 17") == "selected block value out of range"
    assert await msg_error(target, "addbadblock 16") == \
        "dust_add_block: block 16 already in badblocklist"
    assert await msg_error(target, "removebadblock 3") == \
        "dust_remove_block: block 3 not found in badblocklist"
    assert await msg_error(target, "addbadblock") == "addbadblock requires an additional argument"
    assert await msg_error(target, "QueryBlock") == "QueryBlock requires an additional argument"
    assert await msg_error(target, "removebadblock") == \
        "removebadblock requires an additional argument"
    assert await msg_error(target, "frob") == "unrecognized message 'frob' received"
    assert await msg_error(target, "frob 1") == "unrecognized message 'frob' received"
    assert await msg_error(target, "queryblock 1 1") == "unrecognized message 'queryblock' received"
    assert await msg_error(target, "addbadblock 1 256") == "selected write fail count out of range"
    assert await msg_error(target, "addbadblock 99 1") == "selected block value out of range"
    assert await msg_error(target, "addbadblock x") == "Invalid argument"
    assert await msg_error(target, "frob x") == "Invalid argument"       # number parsed first
    assert await msg_error(target, "addbadblock 1 x") == "Invalid argument"
    assert await msg_error(target, "a b c d") == "invalid number of arguments '4'"
    assert await msg(target, "countbadblocks") == "countbadblocks: 1 badblock(s) found"
    await table.close()


async def test_message_through_the_control_verb(tmp_path: Path, mgr: DeviceManager) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(bytes(64 * S))
    await mgr.create("dd", "0 64 dust a.img 0 512", str(tmp_path))

    async def message(*words: str) -> str:
        reply = await dispatch(mgr, {"verb": "message", "name": "dd", "sector": "0",
                                     "message": list(words)})
        return str(reply.output)

    assert await message("addbadblock", "3") == ""
    assert await message("addbadblock", "1") == ""
    # dmsetup prints the kernel's "1\n3\n" as it is
    assert await message("listbadblocks") == "1\n3\n"
    assert await message("countbadblocks") == "countbadblocks: 2 badblock(s) found\n"
    status = await dispatch(mgr, {"verb": "status", "name": "dd"})
    assert status.output == f"0 64 dust {img} bypass verbose\n"
    table = await dispatch(mgr, {"verb": "table", "name": "dd"})
    assert table.output == f"0 64 dust {img} 0 512\n"


# -- I/O -----------------------------------------------------------------------------------


async def test_bypass_until_enabled() -> None:
    table, target, dev = await build("254:0 0 512")
    await msg(target, "addbadblock 2")
    buf = bytearray(S)
    await table.submit(Bio.read(2, buf))
    assert bytes(buf) == dev.buf[2 * S:3 * S]
    await msg(target, "enable")
    with pytest.raises(DmIOError):
        await table.submit(Bio.read(2, buf))
    await table.submit(Bio.read(1, buf))
    await msg(target, "disable")
    await table.submit(Bio.read(2, buf))
    await table.close()


async def test_read_spanning_a_bad_block_fails_but_others_pass() -> None:
    journal: list[Entry] = []
    table, target, dev = await build("254:0 0 1024", journal=journal)  # 2 sectors a block
    await msg(target, "addbadblock 2")
    await msg(target, "enable")
    with pytest.raises(DmIOError):
        await table.submit(Bio.read(0, bytearray(8 * S)))
    # split at every block: blocks 0, 1 and 3 were read, block 2 never reached the device
    assert sorted((e.sector, e.nr_sectors) for e in journal) == [(0, 2), (2, 2), (6, 2)]
    await table.close()


async def test_write_clears_a_bad_block_and_succeeds() -> None:
    table, target, dev = await build("254:0 0 512")
    await msg(target, "addbadblock 5")
    await msg(target, "enable")
    data = pattern(9, S)
    await table.submit(Bio.write(5, data))
    assert dev.buf[5 * S:6 * S] == data
    assert await msg(target, "queryblock 5") == \
        "dust_query_block: block 5 not found in badblocklist"
    buf = bytearray(S)
    await table.submit(Bio.read(5, buf))
    assert bytes(buf) == data
    await table.close()


async def test_write_in_bypass_leaves_the_block_listed() -> None:
    table, target, _ = await build("254:0 0 512")
    await msg(target, "addbadblock 5")
    await table.submit(Bio.write(5, bytes(S)))
    assert await msg(target, "countbadblocks") == "countbadblocks: 1 badblock(s) found"
    await table.close()


async def test_write_fail_count() -> None:
    table, target, dev = await build("254:0 0 512")
    await msg(target, "addbadblock 4 2")
    await msg(target, "enable")
    before = bytes(dev.buf[4 * S:5 * S])
    for _ in range(2):
        with pytest.raises(DmIOError):
            await table.submit(Bio.write(4, bytes(S)))
    assert dev.buf[4 * S:5 * S] == before
    await table.submit(Bio.write(4, bytes(S)))
    assert dev.buf[4 * S:5 * S] == bytes(S)
    assert await msg(target, "countbadblocks") == "countbadblocks: 0 badblock(s) found"
    await table.close()


async def test_discard_counts_as_a_write() -> None:
    table, target, _ = await build("254:0 0 512")
    await msg(target, "addbadblock 6")
    await msg(target, "enable")
    await table.submit(Bio(Op.DISCARD, 6, 1))
    assert await msg(target, "countbadblocks") == "countbadblocks: 0 badblock(s) found"
    await table.submit(Bio.flush())
    await table.close()


async def test_blocks_are_numbered_on_the_device_offset_included() -> None:
    # offset 8 sectors, 4 KiB blocks: mapped sector 0 is device block 1
    table, target, _ = await build("254:0 8 4096")
    await msg(target, "addbadblock 1")
    await msg(target, "enable")
    with pytest.raises(DmIOError):
        await table.submit(Bio.read(0, bytearray(S)))
    await table.submit(Bio.read(8, bytearray(S)))
    await msg(target, "clearbadblocks")
    await msg(target, "addbadblock 0")
    await table.submit(Bio.read(0, bytearray(S)))
    await table.close()
