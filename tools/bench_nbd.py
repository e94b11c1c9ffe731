#!/usr/bin/env python3
"""NBD throughput: a dmuser export beside qemu-nbd on the same file (``tools/bench nbd``).

Two servers share one backing file of random bytes (``--size``, default
256 MiB, ``--quick`` 64 MiB):

* ``dmuser``   -- a private ``dmuser serve`` daemon, a ``linear`` device over the
  file, ``dmuser export`` on a Unix socket;
* ``qemu-nbd`` -- ``qemu-nbd -f raw -e 8 -t`` on the file, on another Unix socket.

Jobs, each run on both servers in turn (the order rotates every repetition, the
table shows the median of ``--repeat``, at least 3):

* ``read``   -- ``nbdcopy URI null:`` (page cache warm: the servers' cost, not
  the disk's), with ``--connections 1`` and with 4 connections (both servers
  advertise multi-conn for a read-only export);
* ``write``  -- ``nbdcopy --flush SRC URI`` of other random bytes (one connection);
* ``write-32M`` -- the same with 4 connections and 32 MiB requests (the protocol's
  largest, 4 in flight each); for dmuser to a second device, ``split``, over the
  same file in two ``linear`` segments, so that every request takes a task and a
  bio (no direct path) and the server's byte budget (``nbd_session.BUDGET_PAGES``)
  is what holds the requests back;
* ``slow-32M`` -- dmuser only: the same writes to a third device, ``slow``, a
  ``delay`` target whose writes wait 200 ms (a slow backing file): without the
  byte budget the daemon would hold every request in flight (16 x 32 MiB).

The dmuser daemon's peak RSS (``VmHWM``) over the whole run is printed; over
``--rss-limit`` (default 256 MiB, the bound of ``docs/io-policy.md``, "Memory")
the run exits 1.

Beside the speed, the CPU time (user + system) each server spent per GB moved
(``/proc/PID/stat``): less sensitive to a loaded machine than the speed.

Then the remote resync: a dmuser ``mirror`` (core log, 512 KiB regions, every
region out of sync at creation) from the source file onto a second leg that is
the qemu-nbd export (``nbd+unix://``), beside ``nbdcopy`` of the same file to the
same export.  Both sides are timed alike: from the request (the ``create``
control request, sent in process through :class:`dmuser.Client`; the start of
the nbdcopy process) to the last byte acknowledged (the mirror's table event
"every region in sync", awaited with the daemon's ``wait`` verb; nbdcopy's
exit).  Both include opening the source and connecting to the export; neither
flushes the export (the resync does not, so nbdcopy runs without
``--flush``); the leg is written back, untimed, after every run.  MB/s is
10^6 bytes per second.  Everything the run starts is stopped
on exit, also on Ctrl-C; the work directory is removed unless ``--keep``.

Usage::

    .venv/bin/python tools/bench nbd --repeat 3
    .venv/bin/python tools/bench nbd --quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

from dmuser import Client, DmuserError
from dmuser.status import MirrorStatus

MiB = 1 << 20
#: the write delay of the ``slow`` device (milliseconds)
SLOW_WRITE_MS = 200
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import toolmod  # noqa: E402  (beside this script)

bench: Any = toolmod.load("dmuser_bench", "bench")  # the RSS limit, how to read a peak RSS


class BenchError(Exception):
    pass


def sh(*cmd: str, timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr.strip()}")
    return res


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.02)


def random_file(path: str, size: int, seed: int) -> None:
    """``size`` bytes that no server can skip (no zeros, no holes)."""
    block = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        for i in range(size // MiB):
            block[:8] = (seed << 32 | i).to_bytes(8, "big")
            f.write(block)


class Servers:
    """The dmuser daemon and qemu-nbd, both started in ``workdir``; :meth:`stop` ends them."""

    def __init__(self, workdir: str, python: str) -> None:
        self.dir = workdir
        self.python = python
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sock = os.path.join(workdir, "dmuser.sock")
        self.mnt = os.path.join(workdir, "mnt")

    def dmuser(self, *args: str) -> subprocess.CompletedProcess[str]:
        return sh(self.python, "-m", "dmuser", *args, "--socket", self.sock, cwd=self.dir)

    def start_dmuser(self) -> None:
        os.makedirs(self.mnt, exist_ok=True)
        log = open(os.path.join(self.dir, "dmuser.log"), "ab")  # noqa: SIM115
        self.procs.append(subprocess.Popen(
            [self.python, "-m", "dmuser", "serve", "--foreground", "--no-block-devices",
             "--mountpoint", self.mnt, "--socket", self.sock],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.dir,
            start_new_session=True))
        wait_for(lambda: os.path.exists(self.sock), 30, "the dmuser daemon")

    def start_qemu_nbd(self, image: str, sock: str, read_only: bool) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["qemu-nbd", "-f", "raw", "-x", "vol", "-e", "8", "-t", "--socket", sock,
             *(["-r"] if read_only else []), image],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.procs.append(proc)
        wait_for(lambda: os.path.exists(sock), 30, "qemu-nbd")
        return proc

    def stop_one(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop(self) -> None:
        if self.procs and os.path.exists(self.sock):
            with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
                self.dmuser("shutdown")
        for proc in list(self.procs):
            self.stop_one(proc)
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True,
                           timeout=30)


def warm(path: str) -> None:
    """Read ``path`` once, so that the page cache holds it for both servers."""
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(*cmd: str) -> float:
    t0 = time.perf_counter()
    sh(*cmd)
    return time.perf_counter() - t0


def rotate(order: list[str], rep: int) -> list[str]:
    k = rep % len(order)
    return order[k:] + order[:k]


def time_resync(client: Client, table: str, timeout: float) -> float:
    """Seconds from the ``create`` request of mirror ``m`` to every region in sync.

    The mirror raises a table event when its last region is in sync; ``wait``
    returns on it.  The event number is read before each status check, so an
    event between the two is not missed; an event for something else (a leg
    failing) only makes the loop look again.  ``m`` is left for the caller to
    remove.
    """
    t0 = time.perf_counter()
    client.create("m", table)
    deadline = t0 + timeout
    while True:
        event_nr = client.info("m").event_nr
        st = client.status("m")[0]
        if not isinstance(st, MirrorStatus):
            raise BenchError(f"m is not a mirror: {st}")
        if st.in_sync:
            return time.perf_counter() - t0
        left = deadline - time.perf_counter()
        if left <= 0:
            raise BenchError(f"the resync did not finish within {timeout:.0f} s")
        client.wait("m", event_nr, timeout=left)


def write_back(path: str) -> None:
    """fdatasync ``path``: the next run starts without the last one's dirty pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def run(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    size = (64 if args.quick else args.size_mib) * MiB
    mb = size / 1e6
    image, src = os.path.join(workdir, "vol.img"), os.path.join(workdir, "src.img")
    random_file(image, size, 1)
    random_file(src, size, 2)
    srv = Servers(workdir, args.python)
    results: dict[str, dict[str, list[float]]] = {}
    try:
        srv.start_dmuser()
        srv.dmuser("create", "vol", "--table", f"0 {size // 512} linear {image} 0")
        dm_ro = srv.dmuser("export", "vol", "unix:ro.sock", "--read-only").stdout.strip()
        dm_rw = srv.dmuser("export", "vol", "unix:rw.sock").stdout.strip()
        half = size // 1024
        srv.dmuser("create", "split", "--table",
                   f"0 {half} linear {image} 0; {half} {half} linear {image} {half}")
        dm_split = srv.dmuser("export", "split", "unix:split.sock").stdout.strip()
        srv.dmuser("create", "slow", "--table",
                   f"0 {size // 512} delay {image} 0 0 {image} 0 {SLOW_WRITE_MS}")
        dm_slow = srv.dmuser("export", "slow", "unix:slow.sock").stdout.strip()
        qro, qrw = os.path.join(workdir, "q-ro.sock"), os.path.join(workdir, "q-rw.sock")
        qemu_ro = srv.start_qemu_nbd(image, qro, read_only=True)
        qemu_rw = srv.start_qemu_nbd(image, qrw, read_only=False)
        q_rw = f"nbd+unix:///vol?socket={qrw}"
        uris = {"dmuser": (dm_ro, dm_rw, dm_split),
                "qemu-nbd": (f"nbd+unix:///vol?socket={qro}", q_rw, q_rw)}
        pids = {"dmuser": (srv.procs[0].pid, srv.procs[0].pid),
                "qemu-nbd": (qemu_ro.pid, qemu_rw.pid)}
        warm(image)
        big_writes = ("nbdcopy", "-C", "4", "--requests", "4", "--request-size", str(32 * MiB),
                      "--queue-size", str(128 * MiB), "--flush", src)
        jobs = {"read-1conn": lambda ro, rw, big: ("nbdcopy", "-C", "1", ro, "null:"),
                "read-4conn": lambda ro, rw, big: ("nbdcopy", "-C", "4", ro, "null:"),
                "write-1conn": lambda ro, rw, big: ("nbdcopy", "-C", "1", "--flush", src, rw),
                "write-32M": lambda ro, rw, big: (*big_writes, big)}
        for rep in range(args.repeat):
            for job, cmd in jobs.items():
                for server in rotate(list(uris), rep):
                    pid = pids[server][job.startswith("write")]
                    cpu0 = cpu_seconds(pid)
                    secs = timed(*cmd(*uris[server]))
                    results.setdefault(job, {}).setdefault(server, []).append(mb / secs)
                    results.setdefault(job + "-cpu", {}).setdefault(server, []).append(
                        (cpu_seconds(pid) - cpu0) / (mb / 1000))
            secs = timed(*big_writes, dm_slow)
            results.setdefault("slow-32M", {}).setdefault("dmuser", []).append(mb / secs)
        for dev in ("vol", "split", "slow"):
            srv.dmuser("unexport", dev)
            srv.dmuser("remove", dev)

        # remote resync: leg 1 on qemu-nbd, beside nbdcopy of the same bytes
        leg1 = os.path.join(workdir, "leg1.img")
        with open(leg1, "wb") as f:
            f.truncate(size)
        srv.stop_one(qemu_rw)
        qleg = os.path.join(workdir, "q-leg.sock")
        srv.start_qemu_nbd(leg1, qleg, read_only=False)
        leg_uri = f"nbd+unix:///vol?socket={qleg}"
        client = Client(srv.sock, timeout=60)
        table = f"0 {size // 512} mirror core 1 1024 2 {src} 0 {leg_uri} 0"
        warm(src)
        for rep in range(args.repeat):
            for how in rotate(["dmuser-resync", "nbdcopy"], rep):
                if how == "nbdcopy":
                    secs = timed("nbdcopy", "-C", "1", src, leg_uri)
                else:
                    try:
                        secs = time_resync(client, table, 600)
                    finally:
                        with contextlib.suppress(DmuserError):
                            client.remove("m")
                write_back(leg1)
                results.setdefault("resync", {}).setdefault(how, []).append(mb / secs)
        peak = bench.peak_rss_kib([pids["dmuser"][0]])
    finally:
        srv.stop()
    return {job: {k: statistics.median(v) for k, v in by.items()} | {"runs": by}
            for job, by in results.items()} | {"peak_rss_kib": peak}


def report(res: dict[str, Any], size_mib: int, repeat: int, rss_limit: int) -> bool:
    """Print the table; False if the daemon's peak RSS is over ``rss_limit`` MiB."""
    print(f"NBD, {size_mib} MiB, median of {repeat} (MB/s; ratio = dmuser / baseline; "
          "server CPU seconds per GB)")
    for job in ("read-1conn", "read-4conn", "write-1conn", "write-32M"):
        d, q = res[job]["dmuser"], res[job]["qemu-nbd"]
        dc, qc = res[job + "-cpu"]["dmuser"], res[job + "-cpu"]["qemu-nbd"]
        print(f"  {job:<12} dmuser {d:8.0f}   qemu-nbd {q:8.0f}   ratio {d / q:5.2f}"
              f"   cpu s/GB dmuser {dc:5.2f} qemu-nbd {qc:5.2f}")
    print(f"  {'slow-32M':<12} dmuser {res['slow-32M']['dmuser']:8.0f}   (4 connections of "
          f"32 MiB writes to a delay device, writes waiting {SLOW_WRITE_MS} ms)")
    r, c = res["resync"]["dmuser-resync"], res["resync"]["nbdcopy"]
    print(f"  {'resync':<12} dmuser {r:8.0f}   nbdcopy  {c:8.0f}   ratio {r / c:5.2f}"
          "   (mirror resync onto a qemu-nbd leg vs nbdcopy of the same bytes)")
    kib = res["peak_rss_kib"]
    over = kib is not None and kib > rss_limit * 1024
    print(f"  dmuser daemon peak RSS: {f'{kib / 1024:.0f} MiB' if kib else 'unknown'}"
          + (f"  OVER THE {rss_limit} MiB BOUND" if over else f" (bound {rss_limit} MiB)"))
    return not over


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench nbd", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, dest="size_mib", metavar="MIB",
                   help="backing file size in MiB (default 256)")
    p.add_argument("--quick", action="store_true", help="64 MiB")
    p.add_argument("--repeat", type=int, default=3, help="runs per job and server (>= 3)")
    p.add_argument("--python", default=os.path.join(REPO, ".venv", "bin", "python"),
                   help="interpreter that runs the dmuser daemon")
    p.add_argument("--dir", help="work directory (default: a new one under /var/tmp)")
    p.add_argument("--json", metavar="FILE", help="save all results to FILE")
    p.add_argument("--rss-limit", type=int, default=bench.RSS_LIMIT_MIB, metavar="MIB",
                   help="fail if the dmuser daemon's peak RSS exceeds this (default "
                   f"{bench.RSS_LIMIT_MIB})")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.repeat < 3:
        p.error("--repeat must be at least 3 (the table shows medians)")
    missing = [t for t in ("nbdcopy", "qemu-nbd") if not shutil.which(t)]
    if missing:
        print(f"bench nbd: {', '.join(missing)} not found (scripts/setup installs them)",
              file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with _workdir(args) as workdir:
        try:
            res = run(args, workdir)
        except (BenchError, DmuserError) as exc:
            print(f"bench nbd: {exc}", file=sys.stderr)
            return 1
    size_mib = 64 if args.quick else args.size_mib
    within = report(res, size_mib, args.repeat, args.rss_limit)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size_mib": size_mib, "repeat": args.repeat, "results": res}, f,
                      indent=2)
    if not within:
        print(f"bench nbd: the dmuser daemon's peak RSS is over the {args.rss_limit} MiB "
              "bound (docs/io-policy.md, \"Memory\")", file=sys.stderr)
    return 0 if within else 1


@contextlib.contextmanager
def _workdir(args: argparse.Namespace) -> Iterator[str]:
    d = args.dir or tempfile.mkdtemp(prefix="dmuser-bench-nbd-", dir="/var/tmp")
    os.makedirs(d, exist_ok=True)
    try:
        yield os.path.abspath(d)
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
