"""dmuser's ``log-writes`` against the real kernel's dm-log-writes (kvm-dm): one short VM run.

The guest runs a workload of O_DIRECT writes of several sizes, fsyncs, an
O_DSYNC write (the kernel sees a FUA write and then a flush), a discard and
marks on ``log-writes /dev/vda /dev/vdb``, printing the status after each
step, and removes the device.  The same steps run in process against dmuser as
bios; the statuses must match, and so must both images, byte for byte: the
log dmuser writes is the kernel's log.  kvm-dm's initramfs lacks the module,
so the host's ``dm-log-writes.ko`` of the same kernel is loaded into the guest
(skipped when the host has none).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from support.data import pattern
from support.fakes import MemDevice
from support.targets import DictResolver

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.target import StatusType
from dmuser.targets.log_writes import LogWritesTarget

pytestmark = [pytest.mark.kernel,
              pytest.mark.timeout(int(os.environ.get("DMUSER_KVM_TEST_TIMEOUT", "1800")))]

S = 512
SIZE = 8192
LW = "/dev/mapper/lw"


class Step(NamedTuple):
    """``w``: a write (``dsync``: with O_DSYNC), ``f``: an fsync, ``d``: a discard,
    ``m``: a mark."""

    kind: str
    sector: int = 0
    n: int = 0
    dsync: bool = False
    text: str = ""


OPS = [Step("w", 0, 1), Step("w", 700, 64), Step("f"), Step("w", 3, 7), Step("m", text="first"),
       Step("w", 4000, 128, True), Step("d", 64, 32), Step("w", 64, 8), Step("f"),
       Step("w", 9, 2), Step("m", text="second"), Step("w", 8000, 16, True), Step("w", 1, 1)]


def _guest() -> str:
    out = ["dmsetup targets | grep -q '^log-writes ' || insmod /files/dm-log-writes-$(uname -r).ko",
           "dmsetup create lw --table '0 8192 log-writes /dev/vda /dev/vdb'"]
    for i, op in enumerate(OPS):
        if op.kind == "w":
            flag = ",dsync" if op.dsync else ""
            out.append(f"gdd if=/files/w{i} of={LW} bs={op.n * S} count=1 "
                       f"seek={op.sector * S} oflag=direct,seek_bytes{flag} status=none")
        elif op.kind == "f":
            out.append(f"gdd if=/dev/null of={LW} count=0 conv=notrunc,fsync status=none")
        elif op.kind == "d":
            out.append(f"blkdiscard -o {op.sector * S} -l {op.n * S} {LW}")
        else:
            out.append(f"dmsetup message lw 0 mark {op.text}")
        out.append(f'echo "STATUS{i} $(dmsetup status lw)"')
    out += ["dmsetup remove lw", "exit 0"]
    return "\n".join(out) + "\n"


def _data(i: int) -> bytes:
    return pattern(f"lw-kernel-{i}", OPS[i].n * S)


async def _dmuser_side() -> tuple[list[str], bytes, bytes]:
    devs: dict[str, MemDevice] = {"254:0": MemDevice(SIZE, "254:0"),
                                  "254:16": MemDevice(SIZE, "254:16")}
    table = await DictResolver(devs).build(f"0 {SIZE} log-writes 254:0 254:16")
    target = table.targets[0]
    assert isinstance(target, LogWritesTarget)
    statuses = []
    for i, op in enumerate(OPS):
        if op.kind == "w":
            flags = ReqFlag.FUA if op.dsync else ReqFlag.NONE
            await table.submit(Bio.write(op.sector, _data(i), flags))
            if op.dsync:
                await table.submit(Bio.flush())  # O_DSYNC: FUA, then generic_write_sync
        elif op.kind == "f":
            await table.submit(Bio.flush())
        elif op.kind == "d":
            await table.submit(Bio(Op.DISCARD, op.sector, op.n))
        else:
            await target.message(["mark", op.text])
        statuses.append(f"0 {SIZE} log-writes {target.status(StatusType.INFO)}")
    await table.close()
    return statuses, bytes(devs["254:0"].buf), bytes(devs["254:16"].buf)


async def test_log_writes_matches_kernel(tmp_path: Path, kvm_dm: Callable[..., object]) -> None:
    modules = sorted(Path("/usr/lib/modules").glob("*/kernel/drivers/md/dm-log-writes.ko"))
    if not modules:
        pytest.skip("no dm-log-writes.ko on the host to load into the guest")
    images = [tmp_path / "a.img", tmp_path / "b.img"]
    for path in images:
        with open(path, "wb") as f:
            f.truncate(SIZE * S)
    files = {f"w{i}": _data(i) for i, op in enumerate(OPS) if op.kind == "w"}
    for ko in modules:  # the guest loads the one of its kernel version
        files[f"dm-log-writes-{ko.parents[3].name}.ko"] = ko.read_bytes()
    result = kvm_dm(_guest(), [str(p) for p in images], files)
    kernel = [result.marker(f"STATUS{i}") for i in range(len(OPS))]  # type: ignore[attr-defined]
    statuses, data, log = await _dmuser_side()
    assert statuses == kernel
    assert data == images[0].read_bytes()
    assert log == images[1].read_bytes()
