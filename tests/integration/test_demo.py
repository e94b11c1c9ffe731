"""``dmuser demo``, the main job (``scripts/demo``): every step shown, every check
passed, nothing left behind.

The demo runs as a subprocess with ``TMPDIR`` set to the test's tmp dir, so
its work directory (images, device files, mounts, socket) lies below it.  With
loop devices (root) the file systems are kernel-mounted; ``--no-loop`` runs the
same steps with debugfs on the device files.  Each run must exit 0, print each
step's ``dmuser`` command with the ``dmsetup`` line it stands for, draw the
merge and resync bars up to 100%, and leave no mount, loop device, daemon or
file.  Should it hang, it gets SIGTERM (it tears down on that) and the test
removes whatever is left below its tmp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT = 240.0

pytestmark = [pytest.mark.fuse, pytest.mark.mkfs, pytest.mark.slow]

#: in order: (what, substring or compiled pattern) -- the transcript of every run
STEPS: list[tuple[str, str | re.Pattern[str]]] = [
    ("the daemon", "$ dmuser  serve --mountpoint dev --resync-throttle"),
    ("ext4 on snapshot-origin",
     "$ dmuser  create base --table '0 262144 snapshot-origin origin.img'\n"
     "# dmsetup create base --table '0 262144 snapshot-origin /dev/sdb'"),
    ("mkfs", "$ mkfs.ext4 -q -b 4096 -E nodiscard dev/base"),
    ("suspend the origin", "$ dmuser  suspend base\n# dmsetup suspend base"),
    ("create the snapshot", "$ dmuser  create snap --table '0 262144 snapshot origin.img "
                            "cow.img P 8'\n# dmsetup create snap --table '0 262144 snapshot "
                            "/dev/sdb /dev/sdc P 8'"),
    ("reload the origin", "$ dmuser  reload base --table '0 262144 snapshot-origin origin.img'"),
    ("resume the origin", "$ dmuser  resume base\n# dmsetup resume base"),
    ("changed files", "ok: the origin has the new files"),
    ("old files on the snapshot", "ok: the snapshot has the files as they were"),
    ("merge table", "$ dmuser  reload base --table '0 262144 snapshot-merge origin.img cow.img "
                    "P 8'\n# dmsetup reload base --table '0 262144 snapshot-merge /dev/sdb "
                    "/dev/sdc P 8'"),
    ("merge watch", "$ dmuser  status base --watch --until-complete"),
    ("merge bar at 100%", re.compile(r"^base: snapshot-merge \[#{30}\] 100\.0% .*complete$",
                                     re.M)),
    ("merge complete", "ok: the merge is complete"),
    ("origin as the snapshot", "ok: the origin device now equals the snapshot"),
    ("origin files", "ok: the origin has the snapshot's files again"),
    ("mirror", "# dmsetup create m --table '0 131072 mirror disk 2 /dev/sdf 128 2 "
               "/dev/mapper/leg0 0 /dev/mapper/leg1 0 2 handle_errors keep_log'"),
    ("resync bar at 100%", re.compile(r"^m: mirror \[#{30}\] 100\.0% .*complete$", re.M)),
    ("fail the leg", "$ dmuser  reload leg1 --table '0 131072 error'"),
    ("status AD", re.compile(r"^0 131072 mirror 2 \S+ \S+ \d+/1024 1 AD 3 disk ", re.M)),
    ("AD checked", "ok: the status shows leg1 dead (health AD)"),
    ("repair the leg", "$ dmuser  reload leg1 --table '0 131072 linear leg1.img 0'"),
    ("reload the mirror", "$ dmuser  resume m\n# dmsetup resume m"),
    ("second resync bar at 100%", re.compile(r"^m: mirror \[#{30}\] 100\.0% .*complete$",
                                             re.M)),
    ("writer", re.compile(r"ok: the writer wrote \d+ files without an error")),
    ("in sync again", "ok: both legs healthy and in sync again"),
    ("fsck", "ok: e2fsck -fn finds the file system on m clean"),
    ("legs identical", "ok: the legs are identical"),
    ("writer's files", re.compile(r"ok: the \d+ files the writer left read back intact")),
    ("teardown", "$ dmuser  shutdown"),
    ("nothing left", "ok: nothing left"),
    ("verdict", re.compile(r"^demo: OK -- \d+ checks passed in \d+ s$", re.M)),
]


# -- the machine below the test's tmp dir ---------------------------------------------------


def _under(path: str, base: Path) -> bool:
    b = os.path.realpath(base)
    return path == b or path.startswith(b + "/")


def mounts_below(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
                  for line in f]
    return [mp for mp in reversed(points) if _under(mp, base)]


def loops_below(base: Path) -> list[str]:
    losetup = shutil.which("losetup") or "/usr/sbin/losetup"
    if not os.path.exists(losetup):
        return []
    res = subprocess.run([losetup, "--list", "--json", "--output", "NAME,BACK-FILE"],
                         capture_output=True, text=True, timeout=20)
    devs = json.loads(res.stdout or "{}").get("loopdevices", [])
    return [d["name"] for d in devs
            if _under((d.get("back-file") or "").removesuffix(" (deleted)"), base)]


def processes_below(base: Path) -> list[int]:
    """Processes naming a path below ``base`` on their command line (a demo's daemon)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = os.fsdecode(f.read()).split("\0")
            if any(_under(os.path.dirname(a), base) for a in argv if a.startswith("/")):
                found.append(int(entry))
    return found


def leftovers(base: Path) -> list[str]:
    return ([f"mount {mp}" for mp in mounts_below(base)]
            + [f"loop device {d}" for d in loops_below(base)]
            + [f"process {pid}" for pid in processes_below(base)])


def sweep(base: Path) -> None:
    """Remove what a demo that failed badly left below ``base``."""
    for pid in processes_below(base):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for mp in mounts_below(base):
        for cmd in (["umount", mp], ["umount", "-l", mp], ["fusermount3", "-u", "-z", mp]):
            if mp not in mounts_below(base):
                break
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(cmd, capture_output=True, timeout=30)
    for dev in loops_below(base):
        subprocess.run(["losetup", "--detach", dev], capture_output=True, timeout=30)


# -- running the demo ---------------------------------------------------------------------


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    """A directory for the demo's TMPDIR; whatever is left in it is removed after."""
    d = tmp_path / "t"
    d.mkdir()
    try:
        yield d
    finally:
        sweep(d)


def run_demo(base: Path, *args: str) -> str:
    env = dict(os.environ, TMPDIR=str(base))
    for var in ("DMUSER_SOCKET", "DMUSER_MOUNTPOINT"):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", "dmuser", "demo", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=base)
    t0 = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=DEMO_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the demo tears down on SIGTERM
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"dmuser demo {' '.join(args)} did not finish in {DEMO_TIMEOUT:.0f} s:\n"
                    f"{out}", pytrace=False)
    print(out)
    print(f"dmuser demo {' '.join(args)}: exit {proc.returncode} in "
          f"{time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, f"dmuser demo {' '.join(args)} exited {proc.returncode}"
    return out


def check_transcript(out: str, loop: bool) -> None:
    pos = 0
    for what, want in STEPS:
        if isinstance(want, str):
            at, end = out.find(want, pos), len(want)
        else:
            m = want.search(out, pos)
            at, end = (m.start(), m.end() - m.start()) if m else (-1, 0)
        assert at >= 0, f"step {what!r} missing (or out of order): {want!r}"
        pos = at + end
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("$ dmuser  "):
            assert lines[i + 1].startswith("# "), f"no dmsetup line under {line!r}"
    # the bars were live: each was drawn below 100% before it got there
    for bar in (r"base: snapshot-merge", r"m: mirror"):
        drawn = re.findall(rf"^{bar} \[[#-]{{30}}\] +(\d+\.\d)%", out, re.M)
        assert any(float(p) < 100 for p in drawn), f"{bar}: no bar below 100% ({drawn})"
    assert "demo: FAILED" not in out and "LEFT BEHIND" not in out
    if loop:
        for cmd in ("$ losetup --find --show dev/base", "$ fsfreeze --freeze mnt/origin",
                    "$ mount -o ro /dev/loop", "$ umount mnt/mirror"):
            assert cmd in out, f"{cmd!r} not run"
    else:
        assert "skipped (--no-loop given):" in out
        for cmd in ("$ losetup", "$ mount", "$ fsfreeze"):
            assert cmd not in out, f"{cmd!r} run with --no-loop"


def check_nothing_left(base: Path, out: str) -> None:
    m = re.search(r"^work directory (\S+)", out, re.M)
    assert m and _under(m[1], base), "the demo did not name its work directory below TMPDIR"
    assert not os.path.exists(m[1]), f"work directory {m[1]} left behind"
    assert not leftovers(base), leftovers(base)
    assert os.listdir(base) == [], os.listdir(base)


@pytest.mark.root
@pytest.mark.loop
@pytest.mark.timeout(DEMO_TIMEOUT + 120)
def test_demo_with_kernel_mounts(base: Path) -> None:
    out = run_demo(base)
    check_transcript(out, loop=True)
    check_nothing_left(base, out)


@pytest.mark.timeout(DEMO_TIMEOUT + 120)
def test_demo_without_loop_devices(base: Path) -> None:
    out = run_demo(base, "--no-loop")
    check_transcript(out, loop=False)
    check_nothing_left(base, out)
