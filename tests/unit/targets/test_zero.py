"""zero (dm-spec §2.2): reads zeros, drops writes, op support, status strings."""

from __future__ import annotations

from typing import Any

import pytest
from support.vectors import status_examples

from dmuser.control import dispatch
from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.errors import DmIOError, NotSupportedError
from dmuser.core.manager import DeviceManager
from dmuser.core.mapped_device import MappedDevice

S = 512


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


# -- status and table strings (the statuses vector, a 6.1 kernel) --------------------------


@pytest.mark.parametrize("example", status_examples("zero"), ids=lambda ex: ex["device"])
async def test_table_and_status_match_kernel(mgr: DeviceManager, example: dict[str, Any]) -> None:
    await dispatch(mgr, {"verb": "create", "name": example["device"],
                         "table": example["table_given"], "cwd": "/"})
    got_table = await dispatch(mgr, {"verb": "table", "name": example["device"]})
    got_status = await dispatch(mgr, {"verb": "status", "name": example["device"]})
    assert got_table.output == example["dmsetup_table"]
    assert got_status.output == example["dmsetup_status_right_after_create"]
