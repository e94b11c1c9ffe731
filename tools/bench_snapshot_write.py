#!/usr/bin/env python3
"""Per-write cost of snapshot-origin first writes, in process (no FUSE, no fio).

Issue 12 part 2: "cut the per-exception cost; profile first".  This driver
builds, in one trio run, a ``snapshot-origin`` with one persistent snapshot
over files in the page cache, and submits first writes (each one needs
copy-outs) through the FUSE handlers' own entry point
(``dmuser.byte_io.write_bytes``, direct path offered), with a flush (what
``fsync`` sends) every ``--flush-every`` writes and at the end.  It prints the
wall time per write; every round gets a fresh snapshot (new COW header).
Two workloads:

* ``rand4k``: 4 KiB writes, one per 64 KiB chunk, in random order (the
  ``tools/bench_targets.py snapshot`` first-write job, 64 KiB chunks);
* ``seq128k``: 128 KiB sequential writes with 4 KiB chunks (32 copy-outs
  per write: what an untar on ext4 sends to ``tools/bench fs``'s origin).

``--profile`` runs cProfile over one extra round and prints the top
functions (by total time, and cumulative for the snapshot modules).

    .venv/bin/python tools/bench_snapshot_write.py --workload rand4k --rounds 3
    .venv/bin/python tools/bench_snapshot_write.py --workload seq128k --profile

The files are written once beforehand and removed afterwards.  The metadata
area writes (PREFLUSH|FUA) run ``fdatasync`` on the COW file, so the figures
include real flushes: run it under ``flock /tmp/w2/bench.lock`` for numbers.
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
from dmuser.core.bio import Bio
from dmuser.core.blockdev import FileDevice
from dmuser.core.config import Config
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.table import Table, TargetServices, parse_table
from dmuser.core.target import TargetRegistry
from dmuser.targets.snapshot import SnapshotOriginTarget, SnapshotTarget

MiB = 1 << 20
KiB = 1 << 10

#: workload -> (chunk sectors, write bytes, stride bytes, random order)
WORKLOADS = {
    "rand4k": (128, 4 * KiB, 64 * KiB, True),
    "seq128k": (8, 128 * KiB, 128 * KiB, False),
}


async def build(name: str, text: str, devs: dict[str, FileDevice],
                nursery: trio.Nursery, config: Config) -> MappedDevice:
    md = MappedDevice(name)
    table = await Table.build(name, parse_table(text), devs.__getitem__,
                              lambda d: None, TargetServices(nursery=nursery, config=config),
                              types=TargetRegistry(SnapshotOriginTarget, SnapshotTarget))
    await md.load(table)
    await md.resume()
    return md


async def one_round(args: argparse.Namespace, devs: dict[str, FileDevice],
                    nursery: trio.Nursery, offsets: list[int], data: bytes,
                    prof: cProfile.Profile | None = None) -> float:
    chunk = WORKLOADS[args.workload][0]
    with open(devs["cow"].path, "r+b") as f:  # no header: a new snapshot
        f.write(bytes(4096))
    sectors = devs["base"].nr_sectors
    config = Config()
    origin = await build("origin", f"0 {sectors} snapshot-origin base", devs, nursery, config)
    await origin.suspend()
    snap = await build("snap", f"0 {sectors} snapshot base cow P {chunk}", devs, nursery, config)
    await origin.resume()
    if prof is not None:
        prof.enable()
    t0 = time.perf_counter()
    for i, off in enumerate(offsets, 1):
        await write_bytes(origin, off, data, direct=True)
        if i % args.flush_every == 0:
            await origin.submit(Bio.flush())
    t1 = time.perf_counter()
    await origin.submit(Bio.flush())
    elapsed = time.perf_counter() - t0
    if args.verbose:
        print(f"  writes {(t1 - t0) * 1e3:.1f} ms, last flush {(elapsed - (t1 - t0)) * 1e3:.1f} ms")
    if prof is not None:
        prof.disable()
    for md in (origin, snap):
        await md.suspend()
        await md.close()
    return elapsed * 1e6 / len(offsets)


async def main_async(args: argparse.Namespace, workdir: str) -> None:
    chunk, bs, stride, rnd = WORKLOADS[args.workload]
    size = args.size * MiB
    n = size // stride
    devs: dict[str, FileDevice] = {}
    for name, nbytes in (("base", size), ("cow", size + size // 4 + MiB)):
        path = os.path.join(workdir, name)
        with open(path, "wb") as f:
            for _ in range(nbytes // MiB):
                f.write(os.urandom(MiB) if name == "base" else bytes(MiB))
        devs[name] = FileDevice(path)
    os.sync()
    offsets = [i * stride for i in range(n)]
    if rnd:
        random.Random(1).shuffle(offsets)
    data = os.urandom(bs)
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        for _ in range(args.rounds):
            times.append(await one_round(args, devs, nursery, offsets, data))
        if args.profile:
            prof = cProfile.Profile()
            await one_round(args, devs, nursery, offsets, data, prof)
            st = pstats.Stats(prof)
            st.sort_stats("tottime").print_stats(30)
            st.sort_stats("cumulative").print_stats("snapshot|kcopyd|dm_io", 40)
        nursery.cancel_scope.cancel()
    for d in devs.values():
        d.close()
    med = statistics.median(times)
    print(f"{args.workload}: {n} first writes of {bs // KiB} KiB, chunk {chunk * 512 // KiB} KiB, "
          f"flush every {args.flush_every}: {med:8.1f} µs per write "
          f"({med / (bs // (chunk * 512) or 1):.1f} µs per copy-out)  "
          f"[{', '.join(f'{x:.1f}' for x in sorted(times))}]")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="rand4k")
    p.add_argument("--size", type=int, default=64, help="MiB written per round (default 64)")
    p.add_argument("--flush-every", type=int, default=64, help="writes per flush (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (median)")
    p.add_argument("--verbose", action="store_true", help="print each round's split")
    p.add_argument("--profile", action="store_true", help="cProfile one extra round")
    p.add_argument("--dir", default="/var/tmp", help="where the files go (default /var/tmp)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dmuser-snap-write-", dir=args.dir) as workdir:
        trio.run(main_async, args, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
