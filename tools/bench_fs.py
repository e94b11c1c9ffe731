#!/usr/bin/env python3
"""File-system workloads on dmuser devices, as users run them (``tools/bench fs``).

For every *setup* and workload: a fresh image file with a fresh ext4 on it
(``mkfs.ext4`` on the plain file, *before* any device is made over it), the
setup's device over it, a loop device over that device file, ext4 mounted from
the loop device, then one workload:

* ``untar``  -- ``tar -xf`` of a generated tree (a seeded, deterministic set of
  files of mixed sizes: ~2500 files, ~160 MB; ``--quick``: 300 files, ~5 MB)
  followed by ``sync -f`` of the file system; the time of both, in seconds
  (each run's line also shows the two phases, saved as ``tar_s`` and
  ``sync_s``, and the serving daemon's CPU seconds);
* ``fsync16`` -- fio on the mounted ext4: 4 KiB random buffered writes with an
  ``fsync`` every 16 writes (``--fsync=16``, psync, one job), time-limited; IOPS.

Setups (``--setups``, in run order):

* ``raw``         -- the image file itself (loop device over the plain file);
* ``linear``      -- a dmuser ``linear`` device over the image;
* ``origin``      -- ``snapshot-origin`` with one persistent snapshot (4 KiB
  chunks, lvm2's default); the ext4 predates the snapshot, so writes copy out;
* ``snap``        -- the same snapshot, writable, mounted instead of the origin;
* ``mirror-core`` -- 2-leg ``mirror``, core log (nosync), leg 0 = the image;
* ``mirror-disk`` -- the same with a disk log;
* ``qsd``         -- qemu-storage-daemon's FUSE export of the image;
* ``qcow2``       -- qemu-storage-daemon's FUSE export of a qcow2 overlay on it;
* ``floor``       -- ``tools/fuse_floor.py`` (pyfuse3 + trio, one inline
  ``pread``/``pwrite`` per request): what any daemon in dmuser's frame can reach.

The table shows the median over ``--repeat`` runs (the order of the setups
rotates each repetition), speed ratios against ``raw`` and ``qsd`` (> 1:
faster; for ``untar`` the inverse ratio of the times) and each serving
daemon's peak RSS (``VmHWM`` from ``/proc/PID/status``, the largest over the
run's devices).  A peak RSS over ``--rss-limit`` (default 256 MiB, the bound in
``docs/io-policy.md``) is flagged on its line and in the table (``!``), and
makes the run exit with status 1.  ``qsd`` and ``qcow2`` are left out of the default setups when
qemu-storage-daemon is not installed.  Everything the run makes (mounts, loop
devices, daemons, files) is removed on exit, also on Ctrl-C and SIGTERM.

Usage (as root)::

    .venv/bin/python tools/bench fs --repeat 3 --json fs.json
    .venv/bin/python tools/bench fs --quick --repeat 1 --setups raw,linear
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


sys.path.insert(0, HERE)
import toolmod  # noqa: E402  (beside this script)

targets: Any = toolmod.load("dmuser_bench_targets", "bench_targets.py")
bench = targets.bench  # tools/bench, as loaded by bench_targets.py
MiB = bench.MiB
BASELINES = ("raw", "qsd")
WORKLOADS = ("untar", "fsync16")
RSS_LIMIT_MIB = bench.RSS_LIMIT_MIB  # 256: the bound of docs/io-policy.md, "Memory"
UNITS = {"untar": "s", "fsync16": "IOPS"}


# -- setups ------------------------------------------------------------------------------


class OriginSetup(bench.DmuserSetup):
    name = "origin"
    description = "snapshot-origin with one persistent snapshot (4 KiB chunks)"
    chunk = 8

    def devices(self, ctx: Any) -> list[tuple[str, str]]:
        cow = ctx.scratch_file(f"{self.name}-cow.img", ctx.size + ctx.size // 8 + 4 * MiB)
        return [(f"bench-{self.name}-snap",
                 f"0 {ctx.sectors} snapshot {ctx.raw} {cow} P {self.chunk}"),
                (f"bench-{self.name}", f"0 {ctx.sectors} snapshot-origin {ctx.raw}")]


class SnapSetup(OriginSetup):
    name = "snap"
    description = "the writable persistent snapshot of that origin, mounted itself"
    bench_device = "bench-snap-snap"


class MirrorCore(targets.MirrorSetup):
    name = "mirror-core"


class MirrorDisk(targets.MirrorDiskSetup):
    name = "mirror-disk"


SETUPS: dict[str, type[Any]] = {
    "raw": bench.RawSetup, "linear": bench.LinearSetup, "origin": OriginSetup,
    "snap": SnapSetup, "mirror-core": MirrorCore, "mirror-disk": MirrorDisk,
    "qsd": bench.QsdSetup, "qcow2": targets.Qcow2Setup, "floor": bench.FloorSetup,
}
DEFAULT_SETUPS = "raw,linear,origin,snap,mirror-core,mirror-disk,qsd,qcow2"


# -- the tree ------------------------------------------------------------------------------


def make_tarball(path: str, files: int, scale: float, seed: int = 1) -> int:
    """A tar of ``files`` files of mixed sizes in nested directories; total file bytes.

    Same seed, same tarball: 70 % small (< 8 KiB), 25 % medium (8-128 KiB),
    5 % large (256 KiB-1.5 MiB), sizes times ``scale``; half the data random,
    half repeated text (file systems and daemons see the same bytes either way).
    """
    rng = random.Random(seed)
    total = 0
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        dirs: set[str] = set()
        for i in range(files):
            r = rng.random()
            if r < 0.70:
                size = rng.randrange(0, 8 << 10)
            elif r < 0.95:
                size = rng.randrange(8 << 10, 128 << 10)
            else:
                size = rng.randrange(256 << 10, 1536 << 10)
            size = int(size * scale)
            d = f"tree/d{rng.randrange(16):02d}/e{rng.randrange(8)}"
            for parent in (d.rsplit("/", 1)[0], d):
                if parent not in dirs:
                    dirs.add(parent)
                    info = tarfile.TarInfo(parent)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                    tar.addfile(info)
            half = size // 2
            data = rng.randbytes(half) + (b"dmuser bench tree line %d\n" % i) * (
                (size - half) // 24 + 1)
            info = tarfile.TarInfo(f"{d}/f{i:05d}.dat")
            info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(data[:size]))
            total += size
    return total


# -- one measurement ---------------------------------------------------------------------------


def run(cmd: list[str], what: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise bench.BenchError(f"{what} failed ({res.returncode}): "
                               f"{(res.stderr or res.stdout).strip()[-1500:]}")
    return res


def over_limit(kib: int | None, limit_mib: int = RSS_LIMIT_MIB) -> bool:
    return kib is not None and kib > limit_mib * 1024


def unmount(mnt: str) -> None:
    for _ in range(50):
        if not bench.is_mounted(mnt):
            return
        if subprocess.run(["umount", mnt], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    print(f"bench fs: {mnt} stays busy, unmounting lazily", file=sys.stderr)
    subprocess.run(["umount", "-l", mnt], capture_output=True)


def detach(dev: str) -> None:
    for _ in range(50):
        if subprocess.run(["losetup", "-d", dev], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    print(f"bench fs: could not detach {dev}", file=sys.stderr)


def measure(args: argparse.Namespace, name: str, workload: str, workdir: str, tarball: str,
            tree_bytes: int, python: str) -> dict[str, Any]:
    """A fresh image, ext4, device, loop, mount; the workload; everything undone."""
    # The daemon attaches no loop device of its own (as root it would by default):
    # the benchmark attaches one below, with the options 'serve --block-devices' uses.
    ctx = bench.Context(workdir=workdir, raw=os.path.join(workdir, "fs-image.img"),
                        size=args.image_bytes, python=python,
                        daemon_env={"DMUSER_BLOCK_DEVICES": "0"})
    s = SETUPS[name]()
    mnt = os.path.join(workdir, "ext4-mnt")
    with contextlib.ExitStack() as stack:
        stack.callback(_teardown, False)
        stack.callback(lambda: os.path.exists(ctx.raw) and os.unlink(ctx.raw))
        stack.callback(ctx.cleanup)
        bench.make_file(ctx.raw, ctx.size, fill=False)
        run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
             ctx.raw], "mkfs.ext4")
        stack.callback(s.stop)
        stack.callback(_teardown, True)
        path = s.start(ctx)
        dio = args.loop_direct_io == "all" or (args.loop_direct_io == "fuse" and s.pids())
        dev = run(["losetup", "--find", "--show", f"--direct-io={'on' if dio else 'off'}", path],
                  f"losetup {path}").stdout.strip()
        stack.callback(detach, dev)
        stack.callback(_teardown, True)
        os.makedirs(mnt, exist_ok=True)
        stack.callback(lambda: os.path.isdir(mnt) and os.rmdir(mnt))
        run(["mount", "-t", "ext4", dev, mnt], f"mount {dev}")
        stack.callback(unmount, mnt)
        stack.callback(_teardown, True)  # runs first when the stack unwinds
        for f in os.listdir(workdir):
            full = os.path.join(workdir, f)
            if f.endswith((".img", ".qcow2")) and os.path.isfile(full):
                bench.drop_cache(full)
        pids = s.pids()
        cpu0 = bench.cpu_seconds(pids)
        if workload == "untar":
            dest = os.path.join(mnt, "x")
            os.mkdir(dest)
            t0 = time.monotonic()
            run(["tar", "-xf", tarball, "-C", dest], "tar -xf")
            t1 = time.monotonic()
            run(["sync", "-f", dest], "sync -f")
            secs = time.monotonic() - t0
            out: dict[str, Any] = {"value": secs, "seconds": secs, "tar_s": t1 - t0,
                                   "sync_s": secs - (t1 - t0), "mbps": tree_bytes / secs / 1e6}
        else:
            res = run(["fio", "--name=fsync16", f"--directory={mnt}", "--filename=fio.dat",
                       f"--size={args.fio_bytes}", "--rw=randwrite", "--bs=4k", "--fsync=16",
                       "--ioengine=psync", "--iodepth=1", "--numjobs=1", "--time_based=1",
                       f"--runtime={args.runtime:g}", "--norandommap", "--randrepeat=0",
                       "--output-format=json"], "fio", timeout=args.runtime + 600)
            d = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
            if d.get("error"):
                raise bench.BenchError(f"fio on {mnt}: error {d['error']}")
            w = d["write"]
            out = {"value": w["iops"], "iops": w["iops"], "ios": w["total_ios"],
                   "clat_mean_us": w.get("clat_ns", {}).get("mean", 0) / 1000,
                   "fsyncs": d.get("sync", {}).get("total_ios")}
        out["server_cpu_s"] = bench.cpu_seconds(pids) - cpu0 if pids else None
        out["peak_rss_kib"] = bench.peak_rss_kib(pids)
        out["daemon"] = ("dmuser" if isinstance(s, bench.DmuserSetup)
                         else "qemu-storage-daemon" if pids else None)
    return out


# -- table ---------------------------------------------------------------------------------


def ratio(med: dict[str, dict[str, float]], n: str, b: str, w: str) -> float | None:
    a, c = med[n].get(w), med[b].get(w)
    if not a or not c:
        return None
    return c / a if UNITS[w] == "s" else a / c  # speed ratio: > 1 is faster


def print_table(names: list[str], med: dict[str, dict[str, float]],
                rss: dict[str, int | None], rss_limit: int = RSS_LIMIT_MIB
                ) -> list[tuple[str, str]]:
    """The table; a peak RSS over ``rss_limit`` MiB gets a ``!``."""
    cols = [(n, b) for b in BASELINES if b in names for n in names if n not in BASELINES]
    if "qsd" in names and "raw" in names:
        cols.append(("qsd", "raw"))
    head = ["workload", "unit", *names, *[f"{n}/{b}" for n, b in cols]]
    rows = []
    for w in WORKLOADS:
        unit = UNITS[w]
        row = [w, unit]
        for n in names:
            v = med[n].get(w)
            row.append("-" if v is None else f"{v:.2f}" if unit == "s" else f"{v:.0f}")
        for n, b in cols:
            x = ratio(med, n, b, w)
            row.append("-" if x is None else f"{x:.2f}")
        rows.append(row)
    peaks = [f"{kib / 1024:.0f}" + ("!" if over_limit(kib, rss_limit) else "") if kib else "-"
             for kib in (rss.get(n) for n in names)]
    rows.append(["peak-rss", "MiB", *peaks, *["" for _ in cols]])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, ["-" * x for x in widths], *rows]:
        print("  ".join(c.ljust(x) if i < 2 else c.rjust(x)
                        for i, (c, x) in enumerate(zip(r, widths, strict=True))).rstrip())
    return cols


# -- main ------------------------------------------------------------------------------------


_tearing_down = False


def _interrupt(signum: int, frame: Any) -> None:
    """SIGINT/SIGTERM stop the run, but not a teardown: that finishes first."""
    if _tearing_down:
        print("bench fs: still cleaning up, please wait", file=sys.stderr)
        return
    raise KeyboardInterrupt


def _teardown(on: bool) -> None:
    global _tearing_down
    _tearing_down = on


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench fs", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--setups", help=f"comma-separated, in run order (default {DEFAULT_SETUPS};"
                   " qsd and qcow2 only if qemu-storage-daemon is installed)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    p.add_argument("--repeat", type=int, default=3, help="runs per setup and workload "
                   "(median; default 3)")
    p.add_argument("--quick", action="store_true",
                   help="small: 128 MiB image, ~5 MB tree, 16 MiB fio file, 3 s fio runs")
    p.add_argument("--image-size", help="image size (default 768M, --quick 128M)")
    p.add_argument("--files", type=int, help="files in the tree (default 2500, --quick 300)")
    p.add_argument("--fio-size", help="fio file size (default 256M, --quick 16M)")
    p.add_argument("--runtime", type=float, help="fio seconds (default 10, --quick 3)")
    p.add_argument("--dir", help="work directory (default: a new one under /var/tmp)")
    p.add_argument("--python", help="interpreter that runs the dmuser daemon")
    p.add_argument("--json", metavar="FILE", help="save all results to FILE")
    p.add_argument("--loop-direct-io", choices=("fuse", "all", "off"), default="fuse",
                   help="loop devices with --direct-io=on: over the FUSE-served setups "
                   "(dmuser, qsd; as 'dmuser serve --block-devices' attaches them), over "
                   "all, or none (default fuse)")
    p.add_argument("--rss-limit", type=int, default=RSS_LIMIT_MIB, metavar="MIB",
                   help=f"flag a daemon whose peak RSS exceeds this and exit 1 (default "
                   f"{RSS_LIMIT_MIB})")
    args = p.parse_args(argv)
    q = args.quick
    args.image_bytes = bench.parse_size(args.image_size or ("128M" if q else "768M"))
    args.fio_bytes = bench.parse_size(args.fio_size or ("16M" if q else "256M"))
    args.files = args.files or (300 if q else 2500)
    args.runtime = args.runtime or (3.0 if q else 10.0)
    scale = 0.25 if q else 1.0
    have_qsd = shutil.which("qemu-storage-daemon") is not None
    names = [n for n in (args.setups or DEFAULT_SETUPS).split(",") if n]
    if args.setups is None and not have_qsd:
        names = [n for n in names if n not in ("qsd", "qcow2")]
    workloads = [w for w in args.workloads.split(",") if w]
    bad = [n for n in names if n not in SETUPS] + [w for w in workloads if w not in WORKLOADS]
    if bad:
        p.error(f"unknown setup or workload: {', '.join(bad)}")
    if os.geteuid() != 0:
        p.error("needs root (losetup, mount)")

    old = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    made_dir = args.dir is None
    workdir = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="dmuser-bench-fs-",
                                                           dir="/var/tmp"))
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in names}
    tarball = os.path.join(workdir, "tree.tar")
    try:
        for tool in ("fio", "mkfs.ext4", "losetup", "tar"):
            if shutil.which(tool) is None:
                raise bench.BenchError(f"{tool} not found")
        for n in names:
            SETUPS[n]().check()
        python = bench.find_python(args.python)
        os.makedirs(workdir, exist_ok=True)
        load_before = bench.loadavg()
        tree_bytes = make_tarball(tarball, args.files, scale)
        with open(tarball, "rb") as f:  # in the page cache for every setup alike
            while f.read(8 * MiB):
                pass
        print(f"bench fs: {workdir} on {bench.fs_type(workdir)}; image "
              f"{args.image_bytes // MiB} MiB; tree {args.files} files, {tree_bytes / 1e6:.1f}"
              f" MB; fio {args.fio_bytes // MiB} MiB, {args.runtime:g} s; setups "
              f"{', '.join(names)}", file=sys.stderr, flush=True)
        for rep in range(args.repeat):
            for w in workloads:
                k = rep % len(names)
                for n in names[k:] + names[:k]:
                    r = measure(args, n, w, workdir, tarball, tree_bytes, python)
                    samples[n].setdefault(w, []).append(r)
                    rss = f"  peak RSS {r['peak_rss_kib'] / 1024:.0f} MiB" \
                        if r["peak_rss_kib"] else ""
                    cpu = f"  server CPU {r['server_cpu_s']:.2f} s" \
                        if r["server_cpu_s"] is not None else ""
                    if over_limit(r["peak_rss_kib"], args.rss_limit):
                        rss += f" OVER THE {args.rss_limit} MiB BOUND"
                    val = (f"{r['value']:.2f} s (tar {r['tar_s']:.2f} + sync {r['sync_s']:.2f})"
                           if UNITS[w] == "s" else f"{r['value']:.0f} IOPS")
                    print(f"bench fs: [{rep + 1}/{args.repeat}] {n:>11} {w:<8} {val:>10}{rss}"
                          f"{cpu}",
                          file=sys.stderr, flush=True)
    except bench.BenchError as exc:
        print(f"bench fs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench fs: interrupted, cleaned up", file=sys.stderr)
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tarball)
        if made_dir:
            shutil.rmtree(workdir, ignore_errors=True)

    med = {n: {w: statistics.median(r["value"] for r in rs) for w, rs in samples[n].items()}
           for n in names}
    rss = {n: max((r["peak_rss_kib"] for rs in samples[n].values() for r in rs
                   if r["peak_rss_kib"]), default=None) for n in names}
    print()
    cols = print_table(names, med, rss, args.rss_limit)
    over = [n for n in names if over_limit(rss[n], args.rss_limit)]
    if over:
        print(f"\nbench fs: peak RSS over the {args.rss_limit} MiB bound: "
              + ", ".join(f"{n} ({rss[n] / 1024:.0f} MiB)" for n in over if rss[n]))
    if args.json:
        report = {
            "version": 1, "what": "fs",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": {"cpus": os.cpu_count(), "kernel": platform.release(),
                     "python": platform.python_version(),
                     "fio": bench.tool_version(["fio", "--version"]),
                     "qsd": bench.tool_version(["qemu-storage-daemon", "--version"]),
                     "filesystem": bench.fs_type(workdir),
                     "loadavg_before": load_before, "loadavg_after": bench.loadavg()},
            "params": {"image_size": args.image_bytes, "files": args.files,
                       "loop_direct_io": args.loop_direct_io,
                       "tree_bytes": tree_bytes, "fio_size": args.fio_bytes,
                       "runtime": args.runtime, "repeat": args.repeat, "quick": q},
            "setups": names, "workloads": workloads, "units": UNITS,
            "median": med,
            "ratios": {f"{n}/{b}": {w: ratio(med, n, b, w) for w in workloads}
                       for n, b in cols},
            "peak_rss_kib": rss,
            "rss_limit_mib": args.rss_limit, "rss_over_limit": over,
            "samples": samples,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
