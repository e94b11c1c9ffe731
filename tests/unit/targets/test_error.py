"""error (dm-spec §2.3): every mapped bio fails, an empty flush succeeds, status strings."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from support.vectors import load_manifest, status_examples

from dmuser.control import dispatch
from dmuser.core.bio import Bio, Op
from dmuser.core.errors import DmIOError, NotSupportedError, TableError
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


# -- the <dev> <start> form (error 1.7, dm-target.c io_err_ctr) -------------------------------


@pytest.mark.parametrize(("table", "error"), [
    ("0 8 error a.img x", "Invalid device sector"),
    ("0 8 error a.img -1", "Invalid device sector"),
    ("0 8 error nodev 0", "Device lookup failed"),
    ("0 8 error nodev x", "Invalid device sector"),       # start before device
    ("0 8 error a.img 30", "too small for target: start=30, len=8, dev_size=32"),
])
async def test_error_dev_start_is_checked(tmp_path: Path, mgr: DeviceManager,
                                          two_files: SimpleNamespace, table: str,
                                          error: str) -> None:
    with pytest.raises(TableError) as info:
        await mgr.create("e", table, str(tmp_path))
    assert info.value.message.endswith(error)
    assert mgr._backing == {}


@pytest.mark.parametrize("args", ["", "a.img", "x y z", "nodev 0 1", "1 2 3 4"])
async def test_error_other_word_counts_are_ignored(tmp_path: Path, mgr: DeviceManager,
                                                   two_files: SimpleNamespace, args: str) -> None:
    await mgr.create("e", f"0 8 error {args}", str(tmp_path))
    assert (await dispatch(mgr, {"verb": "table", "name": "e"})).output == "0 8 error \n"
    assert (await dispatch(mgr, {"verb": "status", "name": "e"})).output == "0 8 error \n"
    assert mgr._backing == {}


async def test_error_dev_start_holds_the_device(tmp_path: Path, mgr: DeviceManager,
                                                two_files: SimpleNamespace) -> None:
    md = await mgr.create("e", "0 8 error a.img 4", str(tmp_path))
    assert len(mgr._backing) == 1
    with pytest.raises(DmIOError):
        await md.read(0, 1)
    await mgr.remove("e")
    assert mgr._backing == {}


#: vector delay-error ran on 6.1 (error 1.5), which ignores all arguments; error 1.7
#: (newer kernels, which dmuser follows) rejects these two-word forms
_NEWER_KERNELS_REJECT = {"e2x": "Invalid device sector", "e2n": "Device lookup failed"}


def _error_examples() -> list[dict[str, Any]]:
    steps = load_manifest("delay-error")["steps"]
    out = []
    for i, step in enumerate(steps):
        m = re.match(r"dmsetup create (\S+) --table '(0 \d+ error[^']*)'", step["command"])
        if m:
            out.append({"name": m[1], "table": m[2], "create_rc": step["rc"],
                        "table_out": steps[i + 1]["output"], "status_out": steps[i + 2]["output"]})
    return out


@pytest.mark.parametrize("example", _error_examples(), ids=lambda e: e["name"])
async def test_kernel_vector_error_forms(tmp_path: Path, mgr: DeviceManager,
                                         example: dict[str, Any]) -> None:
    vda = tmp_path / "vda.img"
    with open(vda, "wb") as f:
        f.truncate(32768 * S)
    table = example["table"].replace("/dev/vda", str(vda))
    assert example["create_rc"] == 0
    req = {"verb": "create", "name": example["name"], "table": table, "cwd": str(tmp_path)}
    if example["name"] in _NEWER_KERNELS_REJECT:
        with pytest.raises(TableError) as info:
            await dispatch(mgr, req)
        assert info.value.message.endswith(_NEWER_KERNELS_REJECT[example["name"]])
        return
    await dispatch(mgr, req)
    assert (await dispatch(mgr, {"verb": "table", "name": example["name"]})).output == \
        example["table_out"]
    assert (await dispatch(mgr, {"verb": "status", "name": example["name"]})).output == \
        example["status_out"]
