#!/usr/bin/env python3
"""Inline or worker thread?  Measure what dmuser's I/O policy trades off.

``dmuser/blockdev.py`` runs a backing-file ``pread``/``pwrite`` of at most
``POLICY.inline_max_bytes`` directly in the trio thread and hands larger ones
to a worker thread (``trio.to_thread.run_sync``).  This script measures, per
call and for several sizes on a page-cached file:

* ``syscall``  -- the bare ``os.preadv``/``os.pwritev`` (no trio at all);
* ``inline``   -- ``await trio.lowlevel.checkpoint()`` then the syscall
  (what ``_run`` did inline before the policy was tuned);
* ``inline-nc``-- ``await trio.lowlevel.checkpoint_if_cancelled()`` then the
  syscall (inline without a scheduler round trip);
* ``nowait``   -- reads only: ``preadv2(RWF_NOWAIT)`` inline, which fails with
  EAGAIN instead of blocking when the data is not cached;
* ``thread``   -- ``trio.to_thread.run_sync`` under a CapacityLimiter(16).

The ``thread - inline-nc`` column is the price of the thread hop; the
``syscall`` column is how long an inline call blocks the event loop.

``--e2e`` then runs ``tools/bench`` (dmuser ``linear`` only) once per
``DMUSER_INLINE_MAX_BYTES`` value and prints the end-to-end table.

Usage::

    .venv/bin/python tools/bench_inline.py                   # per-call table
    .venv/bin/python tools/bench_inline.py --e2e --thresholds 0,4096,65536,131072,1048576
    .venv/bin/python tools/bench_inline.py --json inline.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

try:
    import trio
except ImportError:
    sys.exit("bench_inline: trio is not importable; run it with .venv/bin/python")

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = [512, 4096, 64 << 10, 128 << 10, 1 << 20]
FILE_SIZE = 64 << 20


def human(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def offsets(size: int, count: int, seed: int) -> list[int]:
    import random
    rnd = random.Random(seed)
    slots = FILE_SIZE // size
    return [rnd.randrange(slots) * size for _ in range(count)]


async def measure(fd: int, op: str, size: int, mode: str, calls: int, rounds: int,
                  limiter: trio.CapacityLimiter) -> float:
    """Median over ``rounds`` of the mean microseconds per call."""
    buf = bytearray(os.urandom(size))
    view = memoryview(buf)

    if op == "read":
        def call(off: int) -> int:
            return os.preadv(fd, [view], off)

        def call_nowait(off: int) -> int:
            return os.preadv(fd, [view], off, os.RWF_NOWAIT)
    else:
        def call(off: int) -> int:
            return os.pwritev(fd, [view], off)
        call_nowait = call

    checkpoint = trio.lowlevel.checkpoint
    checkpoint_if_cancelled = trio.lowlevel.checkpoint_if_cancelled
    run_sync = trio.to_thread.run_sync
    results = []
    for r in range(rounds):
        offs = offsets(size, calls, seed=r)
        t0 = time.perf_counter()
        if mode == "syscall":
            for off in offs:
                call(off)
        elif mode == "inline":
            for off in offs:
                await checkpoint()
                call(off)
        elif mode == "inline-nc":
            for off in offs:
                await checkpoint_if_cancelled()
                call(off)
        elif mode == "nowait":
            for off in offs:
                await checkpoint_if_cancelled()
                call_nowait(off)
        elif mode == "thread":
            for off in offs:
                await run_sync(call, off, limiter=limiter)
        else:
            raise ValueError(mode)
        results.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(results)


MODES = {"read": ["syscall", "inline", "inline-nc", "nowait", "thread"],
         "write": ["syscall", "inline", "inline-nc", "thread"]}


async def per_call(path: str, sizes: list[int], rounds: int, budget: int) -> list[dict[str, Any]]:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    limiter = trio.CapacityLimiter(16)
    out = []
    try:
        for op in ("read", "write"):
            for size in sizes:
                calls = max(200, min(20000, budget // size))
                # warm up: page cache, thread cache, code paths
                await measure(fd, op, size, "thread", min(calls, 200), 1, limiter)
                row: dict[str, Any] = {"op": op, "size": size, "calls": calls}
                for mode in MODES[op]:
                    row[mode] = await measure(fd, op, size, mode, calls, rounds, limiter)
                row["thread_hop"] = row["thread"] - row["inline-nc"]
                out.append(row)
                cells = "  ".join(f"{m} {row[m]:8.2f}" for m in MODES[op])
                print(f"bench_inline: {op:5} {human(size):>8}  {cells}", file=sys.stderr)
    finally:
        os.close(fd)
    return out


def print_per_call(rows: list[dict[str, Any]]) -> None:
    cols = ["syscall", "inline", "inline-nc", "nowait", "thread", "thread_hop"]
    head = ["op", "size", *cols]
    table = [head]
    for row in rows:
        table.append([row["op"], human(row["size"]),
                      *[f"{row[c]:.1f}" if c in row else "-" for c in cols]])
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print("microseconds per call (median of rounds), page-cached file:")
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in
                        enumerate(zip(r, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def e2e(args: argparse.Namespace) -> list[dict[str, Any]]:
    """tools/bench on dmuser linear, once per threshold; returns the medians."""
    rows = []
    for thr in [int(t) for t in args.thresholds.split(",")]:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [sys.executable, os.path.join(HERE, "bench"), "--setups", args.setups,
                   "--inline-max-bytes", str(thr), "--json", tmp.name,
                   "--repeat", str(args.repeat), *args.bench_args]
            print(f"bench_inline: {' '.join(cmd)}", file=sys.stderr)
            res = subprocess.run(cmd, stdout=subprocess.DEVNULL)
            if res.returncode != 0:
                raise SystemExit(f"bench_inline: tools/bench failed ({res.returncode})")
            with open(tmp.name) as f:
                report = json.load(f)
        row: dict[str, Any] = {"inline_max_bytes": thr, "units": {}, "cpu_us_per_io": {}}
        for job in report["jobs"]:
            for setup in report["setups"]:
                key = job["name"] if setup == "linear" else f"{setup}:{job['name']}"
                row[key] = report["median"][setup][job["name"]]
                cpu = [s["server_cpu_us_per_io"] for s in report["samples"][setup][job["name"]]
                       if s.get("server_cpu_us_per_io") is not None]
                if cpu:
                    row["cpu_us_per_io"][key] = statistics.median(cpu)
            row["units"][job["name"]] = job["unit"]
        rows.append(row)
    jobs = list(rows[0]["units"]) if rows else []
    print("end to end (tools/bench, dmuser linear): value  [daemon CPU us per I/O]")
    head = ["inline_max_bytes", *[f"{j} ({rows[0]['units'][j]})" for j in jobs]]
    table = [head]
    for row in rows:
        table.append([str(row["inline_max_bytes"]),
                      *[f"{row[j]:.0f}  [{row['cpu_us_per_io'].get(j, 0):.0f}]" for j in jobs]])
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for i, r in enumerate(table):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Arguments after -- go to tools/bench (with --e2e).")
    p.add_argument("--dir", default="/var/tmp", help="where the scratch file goes")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--rounds", type=int, default=5, help="rounds per cell (median)")
    p.add_argument("--budget", type=int, default=256 << 20,
                   help="bytes moved per round (bounds the number of calls)")
    p.add_argument("--e2e", action="store_true", help="also run tools/bench per threshold")
    p.add_argument("--e2e-only", action="store_true", help="only the end-to-end runs")
    p.add_argument("--thresholds", default="0,4096,65536,131072,1048576")
    p.add_argument("--setups", default="linear", help="tools/bench --setups for --e2e")
    p.add_argument("--repeat", type=int, default=3, help="tools/bench --repeat for --e2e")
    p.add_argument("--json", metavar="FILE", help="save the results")
    p.add_argument("bench_args", nargs="*", help="extra tools/bench arguments (after --)")
    args = p.parse_args()

    report: dict[str, Any] = {"cpus": os.cpu_count()}
    if not args.e2e_only:
        sizes = [int(s) for s in args.sizes.split(",")]
        fd, path = tempfile.mkstemp(prefix="bench-inline-", suffix=".img", dir=args.dir)
        try:
            chunk = os.urandom(1 << 20)
            for off in range(0, FILE_SIZE, 1 << 20):
                os.pwrite(fd, chunk, off)
            os.fdatasync(fd)
            for off in range(0, FILE_SIZE, 1 << 20):  # make sure it is cached
                os.pread(fd, 1 << 20, off)
            os.close(fd)
            rows = trio.run(per_call, path, sizes, args.rounds, args.budget)
        finally:
            os.unlink(path)
        print_per_call(rows)
        report["per_call"] = rows
    if args.e2e or args.e2e_only:
        if not args.e2e_only:
            print()
        report["e2e"] = e2e(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
