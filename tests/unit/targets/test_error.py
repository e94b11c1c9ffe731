"""error (dm-spec §2.3): every mapped bio fails, an empty flush succeeds, status strings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support.vectors import status_examples

from dmuser.control import dispatch
from dmuser.core.bio import Bio, Op
from dmuser.core.errors import DmIOError, NotSupportedError
from dmuser.core.manager import DeviceManager

S = 512


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


async def test_mixed_table_fails_only_error_half(tmp_path: Path, mgr: DeviceManager,
                                                 two_files: SimpleNamespace) -> None:
    md = await mgr.create("m", "0 8 linear a.img 0\n8 8 error\n16 8 zero", str(tmp_path))
    assert await md.read(0, 8) == two_files.a0[: 8 * S]
    assert await md.read(16, 8) == bytes(8 * S)
    with pytest.raises(DmIOError):
        await md.read(6, 4)


# -- status and table strings (the statuses vector, a 6.1 kernel) --------------------------


@pytest.mark.parametrize("example", status_examples("error"), ids=lambda ex: ex["device"])
async def test_table_and_status_match_kernel(mgr: DeviceManager, example: dict[str, Any]) -> None:
    await dispatch(mgr, {"verb": "create", "name": example["device"],
                         "table": example["table_given"], "cwd": "/"})
    got_table = await dispatch(mgr, {"verb": "table", "name": example["device"]})
    got_status = await dispatch(mgr, {"verb": "status", "name": example["device"]})
    assert got_table.output == example["dmsetup_table"]
    assert got_status.output == example["dmsetup_status_right_after_create"]


async def test_error_table_shows_no_parameters(tmp_path: Path, mgr: DeviceManager,
                                               two_files: SimpleNamespace) -> None:
    await mgr.create("e", "0 8 error a.img 0", str(tmp_path))
    reply = await dispatch(mgr, {"verb": "table", "name": "e"})
    assert reply.output == "0 8 error \n"
