"""Damaged mirror disk logs: refused clearly, or trusted exactly as the kernel trusts them.

A valid disk log is written by a first mirror, then corrupted at random
(header magic, version and region count, the clean bitset, truncation) and a
mirror is created on it again, in process, beside a canary device:

* creating the mirror either fails with a table error (a log device too small
  for the region count) or succeeds; nothing else may be raised;
* a mirror that loads resyncs to completion, and afterwards every region the
  log could not vouch for holds the same data on both legs, while a region
  the log calls clean is left alone (the kernel trusts the log: with a bad
  magic or version, or past the header's region count, nothing is clean);
* the canary device reads back what was written to it.

The log is decoded with the independent reader written from the spec
(``oracles.read_disk_log``), not with the code under test.
"""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from support.fuzz import FuzzCounts, fuzz_rng, iterations
from support.oracles import read_disk_log  # the independent reader
from support.targets import make_manager

from dmuser.control import dispatch
from dmuser.core.config import Config
from dmuser.core.errors import DmError
from dmuser.core.manager import DeviceManager

S = 512
REGION = 16                  # sectors
REGIONS = 32
LEN = REGION * REGIONS       # sectors of the mirror
MAGIC = 0x4D695272
TABLE = f"0 {LEN} mirror disk 2 log.img {REGION} 2 leg0.img 0 leg1.img 0"


@pytest.fixture
async def mgr(nursery: trio.Nursery) -> AsyncIterator[DeviceManager]:
    manager = make_manager(config=Config(mirror_clean_delay=0.0))
    manager.service_nursery = nursery
    yield manager
    await manager.remove_all()


async def verb(mgr: DeviceManager, tmp: Path, **req: Any) -> Any:
    return await dispatch(mgr, {"cwd": str(tmp), **req})


async def wait_in_sync(mgr: DeviceManager, tmp: Path) -> None:
    """Wait until the mirror's status says every region is in sync."""
    with trio.fail_after(20):
        while True:
            line = (await verb(mgr, tmp, verb="status", name="m")).data["m"][0]
            if line.split()[6] == f"{REGIONS}/{REGIONS}":
                return
            await trio.sleep(0.005)


def legs(tmp: Path) -> tuple[bytes, bytes]:
    return ((tmp / "leg0.img").read_bytes()[: LEN * S], (tmp / "leg1.img").read_bytes()[: LEN * S])


def mutate(rng: random.Random, log: bytearray) -> tuple[str, bytearray]:
    kind = rng.choice(["magic", "version", "regions", "bits", "flip", "truncate", "zero"])
    if kind == "magic":
        struct.pack_into("<I", log, 0, rng.choice([0, MAGIC ^ 1, rng.getrandbits(32)]))
    elif kind == "version":
        struct.pack_into("<I", log, 4, rng.choice([0, 1, 2, 3, 0xFFFFFFFF]))
    elif kind == "regions":
        struct.pack_into("<Q", log, 8, rng.choice([0, 1, REGIONS // 2, REGIONS, REGIONS + 1,
                                                   2**64 - 1, rng.getrandbits(64)]))
    elif kind == "bits":
        log[1024 : 1024 + REGIONS // 8] = rng.randbytes(REGIONS // 8)
    elif kind == "flip":
        where = rng.randrange(len(log))
        log[where] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        return "truncated", log[: rng.choice([0, 512, 1024, 1025])]
    else:
        log[:] = bytes(len(log))
    return kind, log


def vouched_clean(log_path: Path) -> set[int]:
    """The regions the kernel would take as clean from this log image."""
    decoded = read_disk_log(log_path, REGIONS)
    if decoded.magic != MAGIC or decoded.version not in (1, 2):
        return set()
    return {r for r, clean in enumerate(decoded.clean) if clean and r < decoded.nr_regions}


async def test_random_disk_log_corruption(tmp_path: Path, mgr: DeviceManager,
                                          fuzz_counts: FuzzCounts) -> None:
    rng = fuzz_rng("disklog")
    (tmp_path / "canary.img").write_bytes(bytes(64 * S))
    await verb(mgr, tmp_path, verb="create", name="canary", table="0 64 linear canary.img 0")
    canary = rng.randbytes(64 * S)
    await mgr.get("canary").write(0, canary)
    (tmp_path / "log.img").write_bytes(bytes(2048))
    (tmp_path / "leg0.img").write_bytes(bytes(LEN * S))
    (tmp_path / "leg1.img").write_bytes(bytes(LEN * S))
    await verb(mgr, tmp_path, verb="create", name="m", table=TABLE)
    await wait_in_sync(mgr, tmp_path)
    await verb(mgr, tmp_path, verb="remove", name="m")
    valid_log = (tmp_path / "log.img").read_bytes()

    for i in range(iterations(40)):
        what, log = mutate(rng, bytearray(valid_log))
        label = f"input {i} ({what})"
        (tmp_path / "log.img").write_bytes(bytes(log))
        leg0, leg1 = rng.randbytes(LEN * S), rng.randbytes(LEN * S)
        (tmp_path / "leg0.img").write_bytes(leg0)
        (tmp_path / "leg1.img").write_bytes(leg1)
        clean = vouched_clean(tmp_path / "log.img") if len(log) >= 1024 + REGIONS // 8 \
            else set()
        try:
            await verb(mgr, tmp_path, verb="create", name="m", table=TABLE)
        except DmError as exc:
            assert exc.message and "\n" not in exc.message, label
            assert len(log) < 2048, f"{label}: refused a full-size log: {exc.message}"
            fuzz_counts.add("disk log", "rejected")
            continue
        fuzz_counts.add("disk log", "loaded")
        await wait_in_sync(mgr, tmp_path)
        await verb(mgr, tmp_path, verb="remove", name="m")
        a, b = legs(tmp_path)
        for r in range(REGIONS):
            part = slice(r * REGION * S, (r + 1) * REGION * S)
            if r in clean:
                assert (a[part], b[part]) == (leg0[part], leg1[part]), f"{label}: region {r}"
            else:
                assert a[part] == b[part] == leg0[part], f"{label}: region {r} not resynced"
    assert bytes(await mgr.get("canary").read(0, 64)) == canary
