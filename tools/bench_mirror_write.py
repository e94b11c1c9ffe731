#!/usr/bin/env python3
"""Per-write cost of the mirror write path, in process (no FUSE, no fio).

Issue 12 part 3: "cut the per-write CPU of mirror random writes; profile
first, record the per-write µs before and after".  This driver builds, in
one trio run, a ``linear`` device and a 2-leg ``mirror`` (core or disk log,
``nosync``, 2 MiB regions) over files in the page cache, then submits
``--count`` 4 KiB writes at random aligned offsets through the FUSE handlers'
own entry point (``dmuser.byte_io.write_bytes``, with the direct path offered
as ``DeviceFS.write`` does) and prints the wall time per write.  The setups
alternate ``--rounds`` times; the median round is reported.  ``--profile``
runs cProfile over one mirror round and prints the top functions.

    .venv/bin/python tools/bench_mirror_write.py --rounds 5
    .venv/bin/python tools/bench_mirror_write.py --log disk --profile

The files are written once beforehand (so the page cache holds them) and are
removed afterwards.  What it measures is the daemon's CPU per write: the two
``pwrite``s of a mirror write into the page cache cost ~7 µs each here.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import statistics
import sys
import tempfile
import time

import trio

from dmuser.byte_io import write_bytes
from dmuser.core.blockdev import FileDevice
from dmuser.core.config import Config
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.table import Table, TargetServices, parse_table
from dmuser.core.target import TargetRegistry
from dmuser.targets.linear import LinearTarget
from dmuser.targets.mirror.target import MirrorTarget

MiB = 1 << 20
REGION = 4096  # sectors: 2 MiB, lvm2's default


async def build(name: str, text: str, devs: dict[str, FileDevice],
                nursery: trio.Nursery) -> MappedDevice:
    md = MappedDevice(name)
    table = await Table.build(name, parse_table(text), lambda w: devs[w], lambda d: None,
                              TargetServices(nursery=nursery, config=Config()),
                              types=TargetRegistry(LinearTarget, MirrorTarget))
    await md.load(table)
    await md.resume()
    return md


async def one_round(md: MappedDevice, offsets: list[int], data: bytes) -> float:
    t0 = time.perf_counter()
    for off in offsets:
        await write_bytes(md, off, data, direct=True)
    return (time.perf_counter() - t0) * 1e6 / len(offsets)


async def main_async(args: argparse.Namespace, workdir: str) -> None:
    size = args.size * MiB
    sectors = size >> 9
    devs: dict[str, FileDevice] = {}
    for n in ("a", "b", "lin", "log"):
        path = os.path.join(workdir, n)
        with open(path, "wb") as f:
            f.write(os.urandom(MiB) * (size // MiB) if n != "log" else bytes(MiB))
        devs[n] = FileDevice(path)
    os.sync()  # no writeback of the set-up data during the rounds
    log = "core 2" if args.log == "core" else "disk 3 log"
    rng = random.Random(1)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(args.count)]
    data = os.urandom(4096)
    async with trio.open_nursery() as nursery:
        lin = await build("lin", f"0 {sectors} linear lin 0", devs, nursery)
        mir = await build("mir", f"0 {sectors} mirror {log} {REGION} nosync 2 a 0 b 0",
                          devs, nursery)
        for md in (lin, mir):  # every region marked once, caches warm
            await one_round(md, offsets, data)
        times: dict[str, list[float]] = {"linear": [], "mirror": []}
        for _ in range(args.rounds):
            times["linear"].append(await one_round(lin, offsets, data))
            times["mirror"].append(await one_round(mir, offsets, data))
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            await one_round(mir, offsets, data)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        for md in (lin, mir):
            await md.suspend()
            await md.close()
        nursery.cancel_scope.cancel()
    for d in devs.values():
        d.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:<7} {med[k]:7.1f} µs per 4 KiB write  "
              f"[{', '.join(f'{x:.1f}' for x in sorted(v))}]")
    print(f"mirror ({args.log} log) / linear speed ratio: {med['linear'] / med['mirror']:.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log", choices=("core", "disk"), default="core")
    p.add_argument("--size", type=int, default=256, help="MiB per file (default 256)")
    p.add_argument("--count", type=int, default=5000, help="writes per round (default 5000)")
    p.add_argument("--rounds", type=int, default=5, help="alternated rounds (median)")
    p.add_argument("--profile", action="store_true", help="cProfile one extra mirror round")
    p.add_argument("--dir", default="/var/tmp", help="where the files go (default /var/tmp)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dmuser-mirror-write-", dir=args.dir) as workdir:
        trio.run(main_async, args, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
