"""Random table lines against the table parser, every target constructor and the manager.

Each input is one to three table lines built from a vocabulary of the words
real tables use (target names, numbers small, huge and malformed, image files
that exist and that do not, option words of every target) with random
mutations.  It is loaded in process beside a canary device:

* loading either raises :class:`DmError` with a one-line message, or succeeds;
* a table that loads round-trips: ``dmuser table`` prints a table that loads
  again (reload and resume) and prints the same, a read of its first sectors returns, and it is
  removed cleanly;
* after every input the canary reads back what was written to it, and no
  device and no backing file is left behind.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from support.fuzz import FuzzCounts, fuzz_rng, iterations
from support.targets import make_manager

from dmuser.control import dispatch
from dmuser.core.config import Config
from dmuser.core.errors import DmError
from dmuser.core.manager import DeviceManager

S = 512
IMAGES = {"a.img": 4096, "b.img": 4096, "cow.img": 2048, "log.img": 8}
TARGETS = ["linear", "zero", "error", "flakey", "snapshot-origin", "snapshot", "snapshot-merge",
           "mirror", "striped", "thin", "", "LINEAR", "linear\x00", "zer0"]
NUMBERS = ["0", "1", "2", "8", "16", "32", "64", "512", "1024", "4096", "-1", "0x10", "1e3",
           "18446744073709551615", "18446744073709551616", "99999999999999999999999", "+8",
           "08", " 8", "8.0", "nan"]
WORDS = ["a.img", "b.img", "cow.img", "log.img", "missing.img", "/dev/null", "/", "7:0",
         "99:99", "canary", "P", "PO", "N", "Px", "core", "disk", "sync", "nosync",
         "handle_errors", "keep_log", "discard_zeroes_cow", "discard_passdown_origin",
         "error_reads", "error_writes", "drop_writes", "corrupt_bio_byte", "r", "w",
         "random_read_corrupt", "random_write_corrupt", "\u00e9", "a b", "%s", "--", ";"]


def random_args(rng: random.Random) -> list[str]:
    return [rng.choice(NUMBERS if rng.random() < 0.45 else WORDS)
            for _ in range(rng.choice([0, 1, 2, 3, 4, 5, 6, 8, 12]))]


#: Tables close to valid ones, so that mutations reach deep into the constructors.
TEMPLATES = [
    "0 4096 linear a.img 0",
    "0 2048 linear a.img 0\n2048 2048 linear b.img 0",
    "0 4096 zero",
    "0 4096 error",
    "0 4096 flakey a.img 0 10 5 1 drop_writes",
    "0 4096 flakey a.img 0 0 1 5 corrupt_bio_byte 32 r 1 0",
    "0 4096 snapshot-origin a.img",
    "0 4096 snapshot a.img cow.img P 8",
    "0 4096 snapshot a.img cow.img N 16 1 discard_zeroes_cow",
    "0 4096 mirror core 2 64 nosync 2 a.img 0 b.img 0",
    "0 4096 mirror disk 2 log.img 64 2 a.img 0 b.img 0 1 handle_errors",
]


def random_table(rng: random.Random) -> str:
    if rng.random() < 0.7:
        words = rng.choice(TEMPLATES).split(" ")
        for _ in range(rng.choice([0, 0, 1, 1, 1, 2, 3])):
            i = rng.randrange(len(words))
            op = rng.randrange(3)
            pool = NUMBERS if rng.random() < 0.5 else WORDS
            if op == 0:
                words[i] = rng.choice(pool)
            elif op == 1:
                words.insert(i, rng.choice(pool))
            elif len(words) > 1:
                del words[i]
        return " ".join(words)
    lines, start = [], 0
    for _ in range(rng.randrange(1, 4)):
        length = rng.choice([0, 8, 64, 2048, 4096, 4097, 1 << 54, (1 << 54) - 1, 1 << 64])
        first = str(start) if rng.random() < 0.8 else rng.choice(NUMBERS)
        lines.append(" ".join([first, str(length) if rng.random() < 0.9 else rng.choice(NUMBERS),
                               rng.choice(TARGETS), *random_args(rng)]))
        start += length
    return "\n".join(lines)


@pytest.fixture
async def mgr(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[DeviceManager]:
    manager = make_manager(config=Config(mirror_clean_delay=0.0))
    manager.service_nursery = nursery
    for name, sectors in IMAGES.items():
        (tmp_path / name).write_bytes(bytes(sectors * S))
    yield manager
    await manager.remove_all()


async def verb(mgr: DeviceManager, tmp: Path, **req: Any) -> Any:
    return await dispatch(mgr, {"cwd": str(tmp), **req})


async def test_random_tables(tmp_path: Path, mgr: DeviceManager,
                             fuzz_counts: FuzzCounts) -> None:
    rng = fuzz_rng("table")
    (tmp_path / "canary.img").write_bytes(bytes(64 * S))
    await verb(mgr, tmp_path, verb="create", name="canary", table="0 64 linear canary.img 0")
    canary = rng.randbytes(64 * S)
    await mgr.get("canary").write(0, canary)
    files_open = len(mgr.open_backing_files())
    for i in range(iterations(400)):
        text = random_table(rng)
        label = f"input {i} {text!r}"
        try:
            await verb(mgr, tmp_path, verb="create", name="t", table=text)
        except DmError as exc:
            assert exc.message and "\n" not in exc.message and "Traceback" not in exc.message, \
                label
            fuzz_counts.add("table", "rejected")
        else:
            fuzz_counts.add("table", "loaded")
            with trio.fail_after(10):
                shown = (await verb(mgr, tmp_path, verb="table", name="t")).output
                # (an inactive snapshot table on a live COW shows chunk size 0 until
                # the resume hands the exceptions over, as the kernel's does)
                await verb(mgr, tmp_path, verb="reload", name="t", table=shown)
                await verb(mgr, tmp_path, verb="resume", name="t")
                assert (await verb(mgr, tmp_path, verb="table", name="t")).output == shown, \
                    label
                # error targets, invalid snapshots: an I/O error is a fine answer
                with contextlib.suppress(DmError):
                    await mgr.get("t").read(0, 8)
                await verb(mgr, tmp_path, verb="remove", name="t")
        assert [md.name for md in mgr] == ["canary"], label
        assert len(mgr.open_backing_files()) == files_open, label
        assert bytes(await mgr.get("canary").read(0, 64)) == canary, label
