#!/usr/bin/env python3
"""Benchmarks of the snapshot and mirror targets (issues 3 and 4, item 10).

Builds on ``tools/bench`` (loaded as a module: its helpers, its ``raw``,
``linear`` and ``qsd`` setups).  Subcommands:

``fio [tools/bench options]``
    ``tools/bench`` with extra setups registered: ``mirror`` (2 legs, core
    log, nosync, 2 MiB regions), ``mirror-disk`` (same with a disk log),
    ``mirror-rb`` (``mirror`` with ``dmuser message ... read_balance on``).
    Example: ``fio --setups raw,linear,mirror,mirror-rb --repeat 3``.

``snapshot``
    First write (copy-out) and rewrite of the same offsets on a
    ``snapshot-origin`` with one persistent snapshot (chunk 4 KiB and 64 KiB),
    beside ``linear`` and a qemu-storage-daemon export of a qcow2 overlay
    (``qemu-img create -f qcow2 -b base.raw -F raw``).  Every (setup, job)
    pair gets a fresh device (fresh snapshot + COW, fresh overlay), then two
    phases: *first*: each write hits a chunk never written since the snapshot
    (4 KiB random: one write per 64 KiB slot, in a random order replayed from
    an fio iolog; 1 MiB sequential: the whole area once); *rewrite*: the very
    same writes again.  Size-bound runs (no wrap-around).  ``origin-64k-n`` is
    ``origin-64k`` with a transient (N) store, ``origin-64k-sync`` the same with
    held origin writes off (``--snapshot-hold-bytes 0``, the kernel's commit
    per first write), for a side-by-side before/after; ``floor-cow`` is
    ``tools/fuse_floor.py --cow`` (pyfuse3 + trio copying each 64 KiB chunk
    before its first write, with no metadata and no crash safety: the fastest
    a snapshot-origin in this frame could be); ``--jobs`` picks jobs;
    ``--iodepth N`` runs the 4 KiB job with libaio at depth N.

``resync``
    A 1 GiB 2-leg mirror created with ``sync`` (core log, 2 MiB regions), timed
    from ``dmuser create`` until ``status`` shows N/N plus an fdatasync of the
    new leg; beside ``dd if=leg0 of=leg1 bs=1M conv=fsync`` of the same file
    on the same disk, and beside a KcopydClient copy of leg0 to leg1 (one
    1 GiB job, then fdatasync) run in this process.

Run as root from the repository: ``.venv/bin/python tools/bench_targets.py snapshot``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


sys.path.insert(0, HERE)
import toolmod  # noqa: E402  (beside this script)

bench: Any = toolmod.load("dmuser_bench", "bench")
MiB = bench.MiB
REGION = 4096  # mirror region size in sectors (2 MiB, lvm2's default)


# -- mirror setups for `fio` ------------------------------------------------------------------


class _MirrorBase(bench.DmuserSetup):
    log_kind = "core"
    read_balance = False

    def devices(self, ctx: Any) -> list[tuple[str, str]]:
        leg1 = ctx.scratch_file(f"{self.name}-leg1.img", ctx.size, fill=True)
        if self.log_kind == "disk":
            logf = ctx.scratch_file(f"{self.name}-log.img", MiB, fill=False)
            log = f"disk 3 {logf} {REGION} nosync"
        else:
            log = f"core 2 {REGION} nosync"
        return [(f"bench-{self.name}", f"0 {ctx.sectors} mirror {log} 2 {ctx.raw} 0 {leg1} 0")]

    def start(self, ctx: Any) -> str:
        path = super().start(ctx)
        if self.read_balance:
            res = self._cli("message", f"bench-{self.name}", "0", "read_balance", "on")
            if res.returncode != 0:
                raise bench.BenchError(f"read_balance message failed: {res.stderr.strip()}")
        return path


@bench.setup("mirror")
class MirrorSetup(_MirrorBase):
    description = "2-leg dmuser mirror (core log, nosync), leg 0 = the backing file"


@bench.setup("mirror-disk")
class MirrorDiskSetup(_MirrorBase):
    description = "2-leg dmuser mirror with a disk log (nosync)"
    log_kind = "disk"


@bench.setup("mirror-rb")
class MirrorRbSetup(_MirrorBase):
    description = "2-leg dmuser mirror (core log, nosync) with read_balance on"
    read_balance = True


bench.GOALS.append(("seq-write-1m", "mirror", "raw", 0.45))
bench.GOALS.append(("seq-write-1m", "mirror-disk", "raw", 0.45))


# -- snapshot first write / rewrite --------------------------------------------------------------


class _Snap(bench.DmuserSetup):
    chunk = 8
    store = "P"

    def devices(self, ctx: Any) -> list[tuple[str, str]]:
        # COW: every origin chunk may be copied once, plus metadata (16 bytes per
        # exception, 1 header chunk) and slack
        cow = ctx.scratch_file(f"{self.name}-cow.img", ctx.size + ctx.size // 8 + 4 * MiB)
        return [(f"bench-{self.name}-snap",
                 f"0 {ctx.sectors} snapshot {ctx.raw} {cow} {self.store} {self.chunk}"),
                (f"bench-{self.name}", f"0 {ctx.sectors} snapshot-origin {ctx.raw}")]


@bench.setup("origin-4k")
class Origin4k(_Snap):
    description = "snapshot-origin with one persistent snapshot, 4 KiB chunks"
    chunk = 8


@bench.setup("origin-64k")
class Origin64k(_Snap):
    description = "snapshot-origin with one persistent snapshot, 64 KiB chunks"
    chunk = 128


@bench.setup("origin-64k-sync")
class Origin64kSync(_Snap):
    description = ("origin-64k with --snapshot-hold-bytes 0: every first write waits for its "
                   "commit, the kernel's protocol (what origin-64k did before held writes)")
    chunk = 128

    def start(self, ctx: Any) -> str:
        saved = ctx.daemon_env
        ctx.daemon_env = {**saved, "DMUSER_SNAPSHOT_HOLD_BYTES": "0"}
        try:
            return str(super().start(ctx))
        finally:
            ctx.daemon_env = saved


@bench.setup("origin-64k-n")
class Origin64kN(_Snap):
    description = "snapshot-origin with one transient (N) snapshot, 64 KiB chunks"
    chunk = 128
    store = "N"


@bench.setup("floor-cow")
class FloorCow(bench.FloorSetup):
    description = ("tools/fuse_floor.py --cow: pyfuse3 + trio copying each chunk (64 KiB) "
                   "before its first write, with no metadata, flush or crash safety: the "
                   "least a snapshot-origin in this frame can do")

    def extra_args(self, ctx: Any) -> list[str]:
        cow = ctx.scratch_file("floor-cow.img", ctx.size + 4 * MiB)
        return ["--cow", cow, str(64 << 10)]


@bench.setup("qcow2")
class Qcow2Setup(bench.QsdSetup):
    description = "qemu-storage-daemon FUSE export of a qcow2 overlay on the backing file"

    def start(self, ctx: Any) -> str:
        self.mnt = os.path.join(ctx.workdir, "qcow2-export")
        self.log = os.path.join(ctx.workdir, "qcow2-qsd.log")
        self.overlay = os.path.join(ctx.workdir, "overlay.qcow2")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.overlay)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", ctx.raw, "-F", "raw",
                        self.overlay], check=True)
        with open(self.mnt, "w"):
            pass
        with open(self.log, "ab") as log_fh:
            self.proc = subprocess.Popen(
                [self.binary,
                 "--blockdev", f"driver=file,node-name=f,filename={self.overlay}",
                 "--blockdev", "driver=qcow2,node-name=q,file=f",
                 "--export", f"type=fuse,id=e,node-name=q,mountpoint={self.mnt},writable=on"],
                stdin=subprocess.DEVNULL, stdout=log_fh, stderr=log_fh, start_new_session=True)
        bench.wait_for(lambda: bench.is_mounted(self.mnt) and os.path.getsize(self.mnt)
                       == ctx.size, 30, self.proc, "qemu-storage-daemon (qcow2)", self.log)
        return self.mnt

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(FileNotFoundError, AttributeError):
            os.unlink(self.overlay)


def write_iolog(path: str, target: str, size: int, stride: int, bs: int, seed: int) -> int:
    """An fio v2 iolog: one ``bs`` write per ``stride`` slot, slots in random order."""
    slots = list(range(size // stride))
    random.Random(seed).shuffle(slots)
    with open(path, "w") as f:
        f.write(f"fio version 2 iolog\n{target} add\n{target} open\n")
        for s in slots:
            f.write(f"{target} write {s * stride} {bs}\n")
        f.write(f"{target} close\n")
    return len(slots)


def fio_once(name: str, path: str, size: int, rw: str, bs: str, extra: list[str],
             pids: list[int], iodepth: int = 1) -> dict[str, Any]:
    engine = ["--ioengine=psync", "--iodepth=1"] if iodepth == 1 else \
        ["--ioengine=libaio", f"--iodepth={iodepth}"]
    cmd = ["fio", f"--name={name}", f"--filename={path}", f"--size={size}", f"--rw={rw}",
           f"--bs={bs}", "--direct=1", *engine, "--numjobs=1",
           "--allow_file_create=0", "--output-format=json", *extra]
    cpu0 = bench.cpu_seconds(pids)
    res = subprocess.run(cmd, capture_output=True, text=True)
    cpu = bench.cpu_seconds(pids) - cpu0
    if res.returncode != 0:
        raise bench.BenchError(f"fio {name} on {path} failed: {(res.stderr or res.stdout)[-2000:]}")
    d = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]["write"]
    ios = d["total_ios"] or 1
    return {"iops": d["iops"], "mbps": d["bw_bytes"] / 1e6, "ios": d["total_ios"],
            "clat_mean_us": d.get("clat_ns", {}).get("mean", 0) / 1000,
            "server_cpu_us_per_io": cpu * 1e6 / ios if pids else None}


SNAP_JOBS = ("rand-write-4k", "seq-write-1m")


def run_snapshot(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    names = args.setups.split(",")
    results: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    peak: dict[str, int] = {}  # peak RSS (KiB) of each setup's serving process
    iolog = os.path.join(ctx.workdir, "rand.iolog")
    jobs = args.jobs.split(",")
    for rep in range(args.repeat):
        for job in jobs:
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                s = bench.SETUPS[name]()
                s.check()
                try:
                    path = s.start(ctx)
                    for phase in ("first", "rewrite"):
                        for f in os.listdir(ctx.workdir):
                            full = os.path.join(ctx.workdir, f)
                            if f.endswith((".img", ".qcow2")) and os.path.isfile(full):
                                bench.drop_cache(full)
                        if job == "rand-write-4k":
                            n = write_iolog(iolog, path, ctx.size, 64 << 10, 4096, seed=rep)
                            r = fio_once(job, path, ctx.size, "randwrite", "4k",
                                         [f"--read_iolog={iolog}", "--replay_no_stall=1"],
                                         s.pids(), args.iodepth)
                            assert r["ios"] == n, (r["ios"], n)
                            value = r["iops"]
                        else:
                            r = fio_once(job, path, ctx.size, "write", "1M",
                                         ["--end_fsync=1"], s.pids())
                            value = r["mbps"]
                        r["value"] = value
                        results.setdefault(name, {}).setdefault(job, {}).setdefault(
                            phase, []).append(r)
                        cpu = r["server_cpu_us_per_io"]
                        print(f"snapshot: [{rep + 1}/{args.repeat}] {name:>10} {job:<13} "
                              f"{phase:<7} {bench.fmt(value, 'IOPS' if '4k' in job else 'MB/s'):>7}"
                              f" {'IOPS' if '4k' in job else 'MB/s'}"
                              + (f"  server CPU {cpu:.0f} us/io" if cpu is not None else ""),
                              file=sys.stderr, flush=True)
                    rss = bench.peak_rss_kib(s.pids())  # VmHWM only grows: the run's peak
                    if rss is not None:
                        peak[name] = max(peak.get(name, 0), rss)
                finally:
                    s.stop()
                    ctx.cleanup()
                    ctx._scratch.clear()
    med = {n: {j: {p: statistics.median(x["value"] for x in rs) for p, rs in ph.items()}
               for j, ph in js.items()} for n, js in results.items()}
    print()
    head = ["job", "phase", "unit", *names]
    if "linear" in names:
        head += [f"{n}/linear" for n in names if n != "linear"]
    if "qcow2" in names:
        head += [f"{n}/qcow2" for n in names if n.startswith(("origin", "floor-cow"))]
    rows = []
    for job in jobs:
        unit = "IOPS" if "4k" in job else "MB/s"
        for phase in ("first", "rewrite"):
            row = [job, phase, unit, *[bench.fmt(med[n][job][phase], unit) for n in names]]
            for h in head[3 + len(names):]:
                a, b = h.split("/")
                row.append(f"{med[a][job][phase] / med[b][job][phase]:.2f}")
            rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w)
                        in enumerate(zip(r, widths, strict=True))))
    goals = []
    if "origin-64k" in med and "qcow2" in med and "rand-write-4k" in jobs:
        x = med["origin-64k"]["rand-write-4k"]["first"] / med["qcow2"]["rand-write-4k"]["first"]
        goals.append(("origin-64k first-write rand-write-4k / qcow2", x, 1.0))
    if "linear" in med:
        for n in names:
            if n.startswith("origin"):
                for job in jobs:
                    x = med[n][job]["rewrite"] / med["linear"][job]["rewrite"]
                    goals.append((f"{n} rewrite {job} / linear", x, 0.8))
    print()
    for text, x, need in goals:
        print(f"goal {text} = {x:.2f} (>= {need}) {'met' if x >= need else 'NOT met'}")
    return {"median": med, "samples": results,
            "goals": [{"goal": t, "ratio": x, "need": n, "met": x >= n} for t, x, n in goals],
            **rss_report(peak)}


def rss_report(peak: dict[str, int]) -> dict[str, Any]:
    """Print each serving process's peak RSS; the names over the bound go in
    ``rss_over_limit`` (main() then exits 1), as ``tools/bench`` does."""
    over = [n for n, kib in peak.items() if kib > bench.RSS_LIMIT_MIB * 1024]
    if peak:
        print("\npeak RSS (MiB): " + ", ".join(
            f"{n} {kib / 1024:.0f}{' !' if n in over else ''}" for n, kib in peak.items()))
    if over:
        print(f"bench_targets: peak RSS over the {bench.RSS_LIMIT_MIB} MiB bound: "
              f"{', '.join(over)}", file=sys.stderr)
    return {"peak_rss_kib": peak, "rss_limit_mib": bench.RSS_LIMIT_MIB, "rss_over_limit": over}


# -- resync / kcopyd / dd ------------------------------------------------------------------------


class _Empty(bench.DmuserSetup):
    name = "resync"

    def devices(self, ctx: Any) -> list[tuple[str, str]]:
        return []


def fresh_leg(path: str, size: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    bench.make_file(path, size, fill=False)
    subprocess.run(["sync"], check=True)


def time_dd(leg0: str, leg1: str, size: int) -> float:
    fresh_leg(leg1, size)
    bench.drop_cache(leg0)
    t0 = time.monotonic()
    subprocess.run(["dd", f"if={leg0}", f"of={leg1}", "bs=1M", "conv=fsync,notrunc",
                    "status=none"], check=True)
    return time.monotonic() - t0


def time_resync(ctx: Any, leg0: str, leg1: str, size: int, peak: dict[str, int]) -> float:
    fresh_leg(leg1, size)
    bench.drop_cache(leg0)
    s = _Empty()
    try:
        s.start(ctx)
        table = f"0 {size >> 9} mirror core 2 {REGION} sync 2 {leg0} 0 {leg1} 0"
        t0 = time.monotonic()
        res = s._cli("create", "bench-resync", "--table", table)
        if res.returncode != 0:
            raise bench.BenchError(f"create failed: {res.stderr}")
        w = subprocess.run([s.python, "-m", "dmuser", "status", "bench-resync", "--watch",
                            "--until-complete", "--interval", "0.1", "--socket", s.sock],
                           capture_output=True, text=True, timeout=3600, cwd=s.workdir)
        t_sync = time.monotonic() - t0
        fd = os.open(leg1, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        total = time.monotonic() - t0
        st = s._cli("status", "bench-resync").stdout.strip()
        if w.returncode != 0 or f"{(size >> 9) // REGION}/{(size >> 9) // REGION}" not in st:
            raise bench.BenchError(f"resync did not complete: {st} {w.stderr}")
        print(f"resync: in sync after {t_sync:.2f} s, + fdatasync {total - t_sync:.2f} s",
              file=sys.stderr)
        rss = bench.peak_rss_kib(s.pids())
        if rss is not None:
            peak["resync"] = max(peak.get("resync", 0), rss)
        return total
    finally:
        s.stop()


def time_kcopyd(leg0: str, leg1: str, size: int) -> float:
    fresh_leg(leg1, size)
    bench.drop_cache(leg0)
    code = f"""
import os, sys, time, trio
from dmuser.core.blockdev import FileDevice
from dmuser.services.dm_io import Region
from dmuser.services.kcopyd import KcopydClient, KcopydFlag
async def main():
    a, b = FileDevice({leg0!r}), FileDevice({leg1!r})
    t0 = time.monotonic()
    async with KcopydClient() as kc:
        res = await kc.copy_wait(Region(a, 0, {size >> 9}), [Region(b, 0, {size >> 9})],
                                 KcopydFlag.NONE)
    os.fdatasync(b.fd)
    print(time.monotonic() - t0, res)
    a.close(); b.close()
trio.run(main)
"""
    res = subprocess.run([bench.find_python(None), "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True)
    print(f"kcopyd: {res.stdout.strip()}", file=sys.stderr)
    return float(res.stdout.split()[0])


def same(a: str, b: str) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def run_resync(args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    leg0 = ctx.scratch_file("resync-leg0.img", ctx.size, fill=True)
    leg1 = os.path.join(ctx.workdir, "resync-leg1.img")
    ctx._scratch.append(leg1)
    times: dict[str, list[float]] = {"dd": [], "resync": [], "kcopyd": []}
    peak: dict[str, int] = {}  # peak RSS (KiB) of the resync daemon
    for rep in range(args.repeat):
        order = ["dd", "resync", "kcopyd"]
        order = order[rep % 3:] + order[:rep % 3]
        for what in order:
            if what == "dd":
                t = time_dd(leg0, leg1, ctx.size)
            elif what == "resync":
                t = time_resync(ctx, leg0, leg1, ctx.size, peak)
            else:
                t = time_kcopyd(leg0, leg1, ctx.size)
            if not same(leg0, leg1):
                raise bench.BenchError(f"{what}: legs differ after the copy")
            times[what].append(t)
            print(f"resync: [{rep + 1}/{args.repeat}] {what:<7} {t:6.2f} s "
                  f"{ctx.size / t / 1e6:7.1f} MB/s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mbps = {k: ctx.size / v / 1e6 for k, v in med.items()}
    print()
    print(f"{'copy of ' + str(ctx.size // MiB) + ' MiB':<24} {'seconds':>8} {'MB/s':>8} {'/dd':>6}")
    for k in ("dd", "resync", "kcopyd"):
        print(f"{k:<24} {med[k]:8.2f} {mbps[k]:8.1f} {mbps[k] / mbps['dd']:6.2f}")
    x = mbps["resync"] / mbps["dd"]
    print(f"\ngoal resync / dd = {x:.2f} (>= 0.8) {'met' if x >= 0.8 else 'NOT met'}")
    return {"seconds": times, "median_s": med, "mbps": mbps,
            "goals": [{"goal": "resync/dd", "ratio": x, "need": 0.8, "met": x >= 0.8}],
            **rss_report(peak)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fio":
        return int(bench.main(argv[1:]))
    p = argparse.ArgumentParser(prog="bench_targets", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["snapshot", "resync", "fio"])
    p.add_argument("--size", help="area size (snapshot default 256M, resync 1G)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--setups", default="linear,origin-4k,origin-64k,qcow2",
                   help="snapshot: setups in run order")
    p.add_argument("--jobs", default=",".join(SNAP_JOBS),
                   help="snapshot: jobs, a subset of " + ",".join(SNAP_JOBS))
    p.add_argument("--iodepth", type=int, default=1,
                   help="snapshot rand-write-4k: fio iodepth (> 1 uses libaio)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--dir", help="work directory (default: new one under /var/tmp)")
    args = p.parse_args(argv)
    size = bench.parse_size(args.size or ("1G" if args.what == "resync" else "256M"))
    workdir = args.dir or tempfile.mkdtemp(prefix="dmuser-bench-targets-", dir="/var/tmp")
    os.makedirs(workdir, exist_ok=True)
    ctx = bench.Context(workdir=os.path.abspath(workdir), raw="", size=size,
                        python=bench.find_python(None), daemon_env={})
    ctx.raw = os.path.join(ctx.workdir, "bench-raw.img")
    try:
        if args.what == "snapshot":
            bench.make_file(ctx.raw, size, fill=True)
            out = run_snapshot(args, ctx)
        else:
            out = run_resync(args, ctx)
    except bench.BenchError as exc:
        print(f"bench_targets: {exc}", file=sys.stderr)
        return 1
    finally:
        ctx.cleanup()
        if not args.dir:
            shutil.rmtree(ctx.workdir, ignore_errors=True)
    if args.json:
        out.update({"what": args.what, "size": size, "repeat": args.repeat,
                    "loadavg": bench.loadavg(), "cpus": os.cpu_count()})
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 1 if out["rss_over_limit"] else 0


if __name__ == "__main__":
    sys.exit(main())
