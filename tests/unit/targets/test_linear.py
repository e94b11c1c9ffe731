"""linear (dm-spec §2.1): data routing across targets and files, discard and
write-zeroes, flush/FUA, status strings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support.data import pattern
from support.vectors import status_examples

from dmuser.control import dispatch
from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.errors import TableError
from dmuser.core.manager import DeviceManager

S = 512


async def test_two_segment_linear_routes_bytes(tmp_path: Path, mgr: DeviceManager,
                                               two_files: SimpleNamespace) -> None:
    md = await mgr.create("vol", "0 16 linear a.img 4\n16 8 linear b.img 2", str(tmp_path))
    assert md.nr_sectors == 24
    data = pattern(3, 24 * S)
    await md.write(0, data)
    a, b = two_files.a.read_bytes(), two_files.b.read_bytes()
    assert a[4 * S : 20 * S] == data[: 16 * S]
    assert b[2 * S : 10 * S] == data[16 * S :]
    # nothing outside the mapped ranges changed
    assert a[: 4 * S] == two_files.a0[: 4 * S] and a[20 * S :] == two_files.a0[20 * S :]
    assert b[: 2 * S] == two_files.b0[: 2 * S] and b[10 * S :] == two_files.b0[10 * S :]
    # a read spanning the boundary gets the two halves from the two files
    got = await md.read(13, 6)
    assert got == a[17 * S : 20 * S] + b[2 * S : 5 * S]


async def test_linear_write_spanning_boundary(tmp_path: Path, mgr: DeviceManager,
                                              two_files: SimpleNamespace) -> None:
    md = await mgr.create("vol", "0 16 linear a.img 4\n16 8 linear b.img 2", str(tmp_path))
    data = pattern(4, 4 * S)
    await md.write(14, data)
    a, b = two_files.a.read_bytes(), two_files.b.read_bytes()
    assert a[18 * S : 20 * S] == data[: 2 * S]
    assert b[2 * S : 4 * S] == data[2 * S :]
    assert a[: 18 * S] == two_files.a0[: 18 * S]
    assert b[4 * S :] == two_files.b0[4 * S :]


async def test_linear_discard_punches_and_write_zeroes(tmp_path: Path, mgr: DeviceManager,
                                                       two_files: SimpleNamespace) -> None:
    md = await mgr.create("vol", "0 16 linear a.img 4", str(tmp_path))
    await md.submit(Bio(Op.DISCARD, 8, 8))   # 4096-byte aligned in the file: 12..20
    assert await md.read(8, 8) == bytes(8 * S)
    a = two_files.a.read_bytes()
    assert a[12 * S : 20 * S] == bytes(8 * S)
    assert a[: 12 * S] == two_files.a0[: 12 * S]
    assert a[20 * S :] == two_files.a0[20 * S :]
    await md.submit(Bio(Op.WRITE_ZEROES, 1, 2))
    a = two_files.a.read_bytes()
    assert a[5 * S : 7 * S] == bytes(2 * S)
    assert a[4 * S : 5 * S] == two_files.a0[4 * S : 5 * S]
    assert a[7 * S : 12 * S] == two_files.a0[7 * S : 12 * S]


async def test_linear_flush_and_fua(tmp_path: Path, mgr: DeviceManager,
                                    two_files: SimpleNamespace) -> None:
    md = await mgr.create("vol", "0 16 linear a.img 4", str(tmp_path))
    await md.flush()
    data = pattern(5, 1 * S)
    await md.submit(Bio.write(0, data, ReqFlag.FUA | ReqFlag.PREFLUSH))
    assert two_files.a.read_bytes()[4 * S : 5 * S] == data


async def test_linear_offset_beyond_file(tmp_path: Path, mgr: DeviceManager,
                                         two_files: SimpleNamespace) -> None:
    with pytest.raises(TableError, match=r"a\.img too small for target: start=30, len=4, "
                                        r"dev_size=32"):
        await mgr.create("vol", "0 4 linear a.img 30", str(tmp_path))
    assert "vol" not in mgr.devices
    assert mgr._backing == {}


# -- status and table strings (the statuses vector, a 6.1 kernel) --------------------------


@pytest.mark.parametrize("example", status_examples("linear"), ids=lambda ex: ex["device"])
async def test_table_and_status_match_kernel(tmp_path: Path, mgr: DeviceManager,
                                             example: dict[str, Any]) -> None:
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
