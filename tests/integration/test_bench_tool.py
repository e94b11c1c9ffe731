"""tools/bench end to end on a tiny file: it runs, prints the table and the
goal lines, saves its JSON, and leaves no daemon, mount or work file behind.

This keeps the benchmark (and its ``floor`` setup, tools/fuse_floor.py) from
rotting; the figures themselves are not checked (docs/benchmarks.md: speed is
judged by benchmark runs, never by timed assertions).  qemu-storage-daemon is
not installed by the test command, so the qsd setup is left out here.
``tools/bench fs`` (ext4 on loop devices over the setups) is smoke-tested on
``raw`` and ``linear`` with ``--quick``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from support.system import is_mounted, loops_under

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.fuse, pytest.mark.fio, pytest.mark.timeout(180)]


def test_bench_runs_and_cleans_up(tmp_path: Path) -> None:
    work = tmp_path / "bench"
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench"), "--size", "8M", "--runtime", "1",
         "--setups", "raw,linear,floor", "--jobs", "rand-write-4k,rand-read-4k",
         "--dir", str(work), "--json", str(out)],
        capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stdout + res.stderr
    table = [line.split() for line in res.stdout.splitlines()]
    header = next(row for row in table if row[:2] == ["job", "unit"])
    assert header[2:] == ["raw", "linear", "floor", "linear/raw", "linear/floor"]
    for job in ("rand-write-4k", "rand-read-4k"):
        row = next(row for row in table if row and row[0] == job)
        assert row[1] == "IOPS"
        assert all(float(v) > 0 for v in row[2:5]), row
    saved = json.loads(out.read_text())
    assert set(saved["median"]) == {"raw", "linear", "floor"}
    for setup in ("linear", "floor"):
        for sample in saved["samples"][setup]["rand-read-4k"]:
            assert sample["server_cpu_us_per_io"] > 0  # the serving process was measured
        assert saved["peak_rss_kib"][setup] > 0
    assert "raw" not in saved["peak_rss_kib"]  # no serving process
    assert saved["rss_limit_mib"] == 256 and saved["rss_over_limit"] == []  # the bound held
    assert "peak RSS (MiB): linear" in res.stdout
    # In a directory given with --dir only the logs stay: no backing file,
    # mountpoint or socket.
    left = sorted(p.name for p in work.iterdir())
    assert all(name.endswith(".log") for name in left), left
    with open("/proc/mounts") as f:
        assert str(tmp_path) not in f.read()
    assert not any(is_mounted(str(p)) for p in tmp_path.rglob("*-mnt"))
    ps = subprocess.run(["pgrep", "-f", f"{work}"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", f"processes left: {ps.stdout}"


@pytest.mark.parametrize("argv, row_job, columns", [
    (["mirror", "--size", "8M", "--runtime", "1", "--setups", "linear,mirror",
      "--jobs", "rand-write-4k"], "rand-write-4k", ["linear", "mirror"]),
    (["snapshot", "--size", "8M", "--setups", "linear,origin-64k,floor-cow",
      "--jobs", "rand-write-4k"], "rand-write-4k", ["linear", "origin-64k", "floor-cow"]),
])
def test_target_subcommands_run(tmp_path: Path, argv: list[str], row_job: str,
                                columns: list[str]) -> None:
    work = tmp_path / "bench"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "bench"), *argv,
                          "--dir", str(work)], capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stdout + res.stderr
    table = [line.split() for line in res.stdout.splitlines()]
    header = next(row for row in table if row and row[0] == "job")
    assert all(c in header for c in columns), header
    rows = [row for row in table if row and row[0] == row_job]
    assert rows, res.stdout
    if argv[0] == "snapshot":  # each serving daemon's peak RSS is reported
        rss = next(line for line in res.stdout.splitlines() if line.startswith("peak RSS"))
        assert "origin-64k " in rss and "!" not in rss, rss
    with open("/proc/mounts") as f:
        assert str(tmp_path) not in f.read()
    ps = subprocess.run(["pgrep", "-f", f"{work}"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", f"processes left: {ps.stdout}"


@pytest.mark.root
@pytest.mark.loop
@pytest.mark.mkfs
def test_bench_fs_quick_runs_and_cleans_up(tmp_path: Path) -> None:
    """``tools/bench fs``: ext4 on the device, loop-mounted, untar + fio; nothing left."""
    work = tmp_path / "bench"
    out = tmp_path / "fs.json"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "bench"), "fs", "--quick",
                          "--repeat", "1", "--setups", "raw,linear", "--runtime", "1",
                          "--dir", str(work), "--json", str(out)],
                         capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stdout + res.stderr
    table = [line.split() for line in res.stdout.splitlines()]
    header = next(row for row in table if row and row[0] == "workload")
    assert header[1:] == ["unit", "raw", "linear", "linear/raw"]
    for workload, unit in (("untar", "s"), ("fsync16", "IOPS")):
        row = next(row for row in table if row and row[0] == workload)
        assert row[1] == unit
        assert all(float(v) > 0 for v in row[2:5]), row
    rss = next(row for row in table if row and row[0] == "peak-rss")
    assert rss[2] == "-" and float(rss[3]) > 0, rss  # raw has no daemon
    saved = json.loads(out.read_text())
    assert saved["setups"] == ["raw", "linear"]
    assert set(saved["median"]["linear"]) == {"untar", "fsync16"}
    assert saved["peak_rss_kib"]["linear"] > 0 and saved["peak_rss_kib"]["raw"] is None
    assert saved["rss_limit_mib"] == 256 and saved["rss_over_limit"] == []  # the bound held
    assert saved["ratios"]["linear/raw"]["fsync16"] > 0
    for sample in saved["samples"]["linear"]["fsync16"]:
        assert sample["ios"] > 0 and sample["fsyncs"]
    for sample in saved["samples"]["linear"]["untar"]:  # the two phases make up the total
        assert sample["tar_s"] > 0 and sample["sync_s"] > 0
        assert sample["tar_s"] + sample["sync_s"] == pytest.approx(sample["seconds"])
    # Only the daemon's log stays in the --dir: no image, tarball, mountpoint or socket.
    left = sorted(p.name for p in work.iterdir())
    assert all(name.endswith(".log") for name in left), left
    with open("/proc/mounts") as f:
        assert str(tmp_path) not in f.read()
    assert loops_under(tmp_path) == []
    ps = subprocess.run(["pgrep", "-f", f"{work}"], capture_output=True, text=True)
    assert ps.stdout.strip() == "", f"processes left: {ps.stdout}"


def test_bench_fs_flags_a_daemon_over_the_rss_bound() -> None:
    """A peak RSS over ``--rss-limit`` gets a ``!`` in the table (the run then exits 1)."""
    bench_fs = _tool("bench_fs")
    assert bench_fs.RSS_LIMIT_MIB == 256
    assert bench_fs.over_limit(257 * 1024) and not bench_fs.over_limit(256 * 1024)
    assert not bench_fs.over_limit(None)
    med = {"raw": {"untar": 1.0, "fsync16": 100.0}, "linear": {"untar": 2.0, "fsync16": 50.0},
           "mirror-core": {"untar": 3.0, "fsync16": 40.0}}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench_fs.print_table(["raw", "linear", "mirror-core"], med,
                             {"raw": None, "linear": 40 * 1024, "mirror-core": 300 * 1024})
    rss = next(line.split() for line in out.getvalue().splitlines()
               if line.startswith("peak-rss"))
    assert rss[2:5] == ["-", "40", "300!"]


def test_bench_targets_flags_a_daemon_over_the_rss_bound() -> None:
    """``bench_targets`` (snapshot, resync) lists the setups over the bound; main() exits 1."""
    bench_targets = _tool("bench_targets")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        report = bench_targets.rss_report({"origin-64k": 300 * 1024, "qcow2": 12 * 1024})
    assert report["rss_over_limit"] == ["origin-64k"]
    assert "origin-64k 300 !" in out.getvalue() and "qcow2 12" in out.getvalue()


def _tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a module of its own (not the one ``tools/bench`` runs)."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test",
                                                  REPO / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
