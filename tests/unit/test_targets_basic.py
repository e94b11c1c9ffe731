"""linear, zero and error (dm-spec §2.1-§2.3): data routing, op support, status strings."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from dmuser.control import dispatch
from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.errors import DmIOError, NotSupportedError, TableError
from dmuser.core.manager import DeviceManager
from dmuser.core.mapped_device import MappedDevice

STATUSES = Path("/work/shared/vectors/statuses/statuses.json")
S = 512


@pytest.fixture
def two_files(tmp_path: Path, h: SimpleNamespace) -> SimpleNamespace:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    return SimpleNamespace(a=a, b=b, a0=h.make_file(a, 32, seed=1), b0=h.make_file(b, 16, seed=2))


async def test_two_segment_linear_routes_bytes(tmp_path: Path, h: SimpleNamespace,
                                               mgr: DeviceManager,
                                               two_files: SimpleNamespace) -> None:
    md = await mgr.create("vol", "0 16 linear a.img 4\n16 8 linear b.img 2", str(tmp_path))
    assert md.nr_sectors == 24
    data = h.pattern(24, 3)
    await md.write(0, data)
    a, b = h.read_file(two_files.a), h.read_file(two_files.b)
    assert a[4 * S : 20 * S] == data[: 16 * S]
    assert b[2 * S : 10 * S] == data[16 * S :]
    # nothing outside the mapped ranges changed
    assert a[: 4 * S] == two_files.a0[: 4 * S] and a[20 * S :] == two_files.a0[20 * S :]
    assert b[: 2 * S] == two_files.b0[: 2 * S] and b[10 * S :] == two_files.b0[10 * S :]
    # a read spanning the boundary gets the two halves from the two files
    got = await md.read(13, 6)
    assert got == a[17 * S : 20 * S] + b[2 * S : 5 * S]


async def test_linear_write_spanning_boundary(tmp_path: Path, h: SimpleNamespace,
                                              mgr: DeviceManager,
                                              two_files: SimpleNamespace) -> None:
    md = await mgr.create("vol", "0 16 linear a.img 4\n16 8 linear b.img 2", str(tmp_path))
    data = h.pattern(4, 4)
    await md.write(14, data)
    a, b = h.read_file(two_files.a), h.read_file(two_files.b)
    assert a[18 * S : 20 * S] == data[: 2 * S]
    assert b[2 * S : 4 * S] == data[2 * S :]
    assert a[: 18 * S] == two_files.a0[: 18 * S]
    assert b[4 * S :] == two_files.b0[4 * S :]


async def test_linear_discard_punches_and_write_zeroes(tmp_path: Path, h: SimpleNamespace,
                                                       mgr: DeviceManager,
                                                       two_files: SimpleNamespace) -> None:
    md = await mgr.create("vol", "0 16 linear a.img 4", str(tmp_path))
    await md.submit(Bio(Op.DISCARD, 8, 8))   # 4096-byte aligned in the file: 12..20
    assert await md.read(8, 8) == bytes(8 * S)
    a = h.read_file(two_files.a)
    assert a[12 * S : 20 * S] == bytes(8 * S)
    assert a[: 12 * S] == two_files.a0[: 12 * S]
    assert a[20 * S :] == two_files.a0[20 * S :]
    await md.submit(Bio(Op.WRITE_ZEROES, 1, 2))
    a = h.read_file(two_files.a)
    assert a[5 * S : 7 * S] == bytes(2 * S)
    assert a[4 * S : 5 * S] == two_files.a0[4 * S : 5 * S]
    assert a[7 * S : 12 * S] == two_files.a0[7 * S : 12 * S]


async def test_linear_flush_and_fua(tmp_path: Path, h: SimpleNamespace, mgr: DeviceManager,
                                    two_files: SimpleNamespace) -> None:
    md = await mgr.create("vol", "0 16 linear a.img 4", str(tmp_path))
    await md.flush()
    data = h.pattern(1, 5)
    await md.submit(Bio.write(0, data, ReqFlag.FUA | ReqFlag.PREFLUSH))
    assert h.read_file(two_files.a)[4 * S : 5 * S] == data


async def test_linear_offset_beyond_file(tmp_path: Path, mgr: DeviceManager,
                                         two_files: SimpleNamespace) -> None:
    with pytest.raises(TableError, match=r"a\.img too small for target: start=30, len=4, "
                                        r"dev_size=32"):
        await mgr.create("vol", "0 4 linear a.img 30", str(tmp_path))
    assert "vol" not in mgr.devices
    assert mgr._backing == {}


# -- zero ---------------------------------------------------------------------------------


async def zero_device(mgr: DeviceManager) -> MappedDevice:
    return await mgr.create("z", "0 16 zero", "/")


async def test_zero_reads_zeros_and_drops_writes(mgr: DeviceManager) -> None:
    md = await zero_device(mgr)
    buf = bytearray(b"\xff" * 16 * S)
    await md.submit(Bio.read(0, buf))
    assert buf == bytes(16 * S)
    await md.write(3, b"\xaa" * 2 * S)
    assert await md.read(3, 2) == bytes(2 * S)


async def test_zero_rahead_read_fails(mgr: DeviceManager) -> None:
    md = await zero_device(mgr)
    with pytest.raises(DmIOError):
        await md.submit(Bio.read(0, bytearray(S), ReqFlag.RAHEAD))


async def test_zero_flush_discard_ok_write_zeroes_unsupported(mgr: DeviceManager) -> None:
    md = await zero_device(mgr)
    await md.flush()
    await md.submit(Bio(Op.DISCARD, 0, 16))
    with pytest.raises(NotSupportedError):
        await md.submit(Bio(Op.WRITE_ZEROES, 0, 1))
    with pytest.raises(NotSupportedError):
        await md.submit(Bio(Op.SECURE_ERASE, 0, 1))


# -- error --------------------------------------------------------------------------------


async def test_error_fails_reads_and_writes(mgr: DeviceManager) -> None:
    md = await mgr.create("e", "0 16 error", "/")
    buf = bytearray(b"\xff" * S)
    with pytest.raises(DmIOError) as info:
        await md.submit(Bio.read(0, buf))
    assert info.value.errno == 5  # EIO
    with pytest.raises(DmIOError):
        await md.write(15, b"\0" * S)


async def test_error_discard_fails_flush_succeeds(mgr: DeviceManager) -> None:
    # dm-spec §2.3: every bio reaching the map fails, discards included (1 discard bio);
    # an empty flush never reaches it (0 flush bios) and succeeds.
    md = await mgr.create("e", "0 16 error", "/")
    await md.flush()
    with pytest.raises(DmIOError) as info:
        await md.submit(Bio(Op.DISCARD, 0, 4))
    assert not isinstance(info.value, NotSupportedError)
    with pytest.raises(NotSupportedError):
        await md.submit(Bio(Op.WRITE_ZEROES, 0, 1))


async def test_mixed_table_fails_only_error_half(tmp_path: Path, h: SimpleNamespace,
                                                 mgr: DeviceManager,
                                                 two_files: SimpleNamespace) -> None:
    md = await mgr.create("m", "0 8 linear a.img 0\n8 8 error\n16 8 zero", str(tmp_path))
    assert await md.read(0, 8) == two_files.a0[: 8 * S]
    assert await md.read(16, 8) == bytes(8 * S)
    with pytest.raises(DmIOError):
        await md.read(6, 4)


# -- status and table strings (statuses.json, a 6.1 kernel) -------------------------------


def kernel_examples() -> list[dict]:
    doc = json.loads(STATUSES.read_text())
    wanted = {"lin", "zero", "err"}
    return [ex for ex in doc["examples"] if ex["device"] in wanted]


@pytest.mark.parametrize("example", kernel_examples(), ids=lambda ex: ex["device"])
async def test_table_and_status_match_kernel(tmp_path: Path, mgr: DeviceManager,
                                             example: dict) -> None:
    vda = tmp_path / "vda.img"
    with open(vda, "wb") as f:
        f.truncate(32768 * S)  # /dev/vda in the vectors: 32768 sectors
    table = example["table_given"].replace("/dev/vda", str(vda))
    await dispatch(mgr, {"verb": "create", "name": example["device"], "table": table,
                         "cwd": str(tmp_path)})
    got_table = await dispatch(mgr, {"verb": "table", "name": example["device"]})
    got_status = await dispatch(mgr, {"verb": "status", "name": example["device"]})
    # the kernel prints MAJ:MIN (254:0 is /dev/vda); we print the file's absolute path
    assert got_table.output == example["dmsetup_table"].replace("254:0", str(vda))
    assert got_status.output == example["dmsetup_status_right_after_create"]


async def test_error_table_shows_no_parameters(tmp_path: Path, mgr: DeviceManager,
                                               two_files: SimpleNamespace) -> None:
    await mgr.create("e", "0 8 error a.img 0", str(tmp_path))
    reply = await dispatch(mgr, {"verb": "table", "name": "e"})
    assert reply.output == "0 8 error \n"
