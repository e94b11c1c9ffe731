"""The pytest plugin as a user sees it: user test files run by ``pytester`` in a pytest
subprocess (the plugin is loaded from the ``pytest11`` entry point, as in any suite).

Each run gets a base directory of its own (``$DMUSER_PYTEST_TMPDIR``); after the
run, passed, failed, stopped by ``-x``, interrupted by a ``KeyboardInterrupt`` or
by Ctrl-C, nothing may be left there: no mount (``/proc/mounts``), no loop device
backed by a file below it, no process naming it (``pgrep -f``), no directory.
A run killed outright cannot clean up; the next run sweeps what it left.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmuser.pytest_plugin import rig

pytestmark = [pytest.mark.fuse]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def base(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short private $DMUSER_PYTEST_TMPDIR for the runs of one test (socket paths)."""
    d = Path(tempfile.mkdtemp(prefix="dmpt-", dir="/tmp"))
    monkeypatch.setenv("DMUSER_PYTEST_TMPDIR", str(d))
    try:
        yield d
    finally:
        for sub in d.glob(rig.DIR_PREFIX + "*"):  # never leave our own mess, even failing
            rig.sweep_dir(sub)
        shutil.rmtree(d, ignore_errors=True)


def leftovers(base: Path) -> list[str]:
    """What runs with ``base`` as their DMUSER_PYTEST_TMPDIR left behind."""
    with open("/proc/mounts") as f:
        found = [f"mount: {line.split()[1]}" for line in f if str(base) in line]
    found += [f"loop: {dev}" for dev in rig.loops_under(base)]
    res = subprocess.run(["pgrep", "-f", str(base)], capture_output=True, text=True)
    found += [f"process: {pid}" for pid in res.stdout.split()]
    found += [f"dir: {d}" for d in base.glob(rig.DIR_PREFIX + "*")]
    return found


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=180)


USER_SUITE = '''
import os
import pytest
import dmuser
from dmuser.status import MirrorStatus, SnapshotMergeStatus, SnapshotStatus

def test_client(dmuser_client, dmuser_daemon):
    assert isinstance(dmuser_client, dmuser.Client)
    assert dmuser_client.ping().pid > 0 and dmuser_daemon.mountpoint.is_dir()

def test_linear_and_image(dmuser_devices):
    img = dmuser_devices.image(1 << 20)
    d = dmuser_devices.create(f"0 2048 linear {img} 0", name="mine")
    d.write(512, b"hello")
    assert img.read_bytes()[512:517] == b"hello" and d.size == 1 << 20

def test_snapshot_then_merge(dmuser_devices):
    origin = dmuser_devices.linear(8 << 20)
    origin.write(0, b"old!" * 1024)
    snap = dmuser_devices.snapshot(origin)
    origin.write(0, b"new!" * 1024)
    st = snap.status()
    assert isinstance(st, SnapshotStatus) and st.valid and st.used_sectors > 0
    assert snap.device.read(0, 4096) == b"old!" * 1024
    snap.merge(wait=False)
    assert isinstance(snap.status(), SnapshotMergeStatus)
    snap.wait_merged(30)
    assert origin.read(0, 4096) == b"old!" * 1024 and snap.merged

@pytest.mark.parametrize("log", ["core", "disk"])
def test_mirror_leg_fails_and_resyncs(dmuser_devices, log):
    m = dmuser_devices.mirror(2, log=log)
    assert isinstance(m.wait_in_sync(30), MirrorStatus)
    m.fail_leg(1)
    m.device.write(0, b"m" * 4096)
    assert m.status().degraded and m.status().legs[1].health == "D"
    m.repair_leg(1)
    st = m.wait_in_sync(30)
    assert not st.degraded and m.legs[1].read(0, 4096) == b"m" * 4096

def test_flakey_and_swap_in_error(dmuser_devices):
    d = dmuser_devices.linear(4 << 20)
    f = dmuser_devices.flakey(d).drop_writes()
    d.write(0, b"lost")
    f.restore()
    assert d.read(0, 4) == bytes(4)
    with dmuser_devices.flakey(d).error_writes():
        with pytest.raises(OSError):
            d.write(0, b"fails")
    with dmuser_devices.swap_in_error(d, 8, 8):
        with pytest.raises(OSError):
            d.read(8 * 512, 512)
        assert d.read(0, 512) == bytes(512)
    assert d.read(8 * 512, 512) == bytes(512)

@pytest.mark.dmuser_own_daemon
def test_own_daemon(dmuser_devices, dmuser_daemon):
    dmuser_devices.linear(1 << 20)
    assert dmuser_devices.client.socket != dmuser_daemon.client.socket

def test_private_daemon_fixture(dmuser_private_daemon, dmuser_daemon):
    assert dmuser_private_daemon.client.ls() == {}
    assert dmuser_private_daemon.socket != dmuser_daemon.socket

def test_mounted_and_recording(dmuser_devices):
    from dmuser.pytest_plugin import fsck, mkfs
    d = dmuser_devices.linear(16 << 20)
    mkfs(d.path)
    with dmuser_devices.mounted(d) as root:  # root: kernel ext4; else fuse2fs
        (root / "f").write_text("x")
    with dmuser_devices.mounted(d, options=("ro",)) as root:
        assert (root / "f").read_text() == "x"
    fsck(d.path)
    rec = dmuser_devices.recording(1 << 20)
    rec.device.write(0, b"a" * 512)      # fsync: a flush
    rec.mark("one")
    rec.device.write(512, b"b" * 512)
    states = [(p.kind, p.mark, p.image.read_bytes()[:1024]) for p in rec.crash_points()]
    assert ("MARK", "one", b"a" * 512 + bytes(512)) in states
    assert states[-1] == ("MARK", "dm-log-writes-end", b"a" * 512 + b"b" * 512)

def test_devices_are_gone_after_each_test(dmuser_client):
    assert dmuser_client.ls() == {}
'''


def test_a_user_suite_using_every_fixture_and_helper_passes(pytester: pytest.Pytester,
                                                             base: Path) -> None:
    pytester.makepyfile(test_user=USER_SUITE)
    result = run(pytester)
    result.assert_outcomes(passed=10)
    assert leftovers(base) == []


FAILING = '''
import pytest
from dmuser.pytest_plugin import mkfs

def test_fails_holding_devices(dmuser_devices):
    origin = dmuser_devices.linear(16 << 20)
    mkfs(origin.path)
    dmuser_devices.snapshot(origin)
    m = dmuser_devices.mirror(2, log="disk", handle_errors=True)
    dmuser_devices.flakey(m.legs[0]).drop_writes()
    with dmuser_devices.mounted(origin):  # root: a loop mount; else fuse2fs
        {fail}

@pytest.mark.dmuser_own_daemon
def test_fails_too(dmuser_devices):
    dmuser_devices.swap_in_error(dmuser_devices.linear(1 << 20), 0, 8)
    {fail}

def test_after(dmuser_devices):
    pass
'''


@pytest.mark.parametrize("how,args,outcomes", [
    ("assert False, 'the test fails'", (), {"failed": 2, "passed": 1}),
    ("assert False, 'the test fails'", ("-x",), {"failed": 1}),
])
def test_failing_tests_leave_nothing(pytester: pytest.Pytester, base: Path, how: str,
                                     args: tuple[str, ...], outcomes: dict[str, int]) -> None:
    pytester.makepyfile(test_failing=FAILING.replace("{fail}", how))
    result = run(pytester, *args)
    result.assert_outcomes(**outcomes)
    assert "dmuser daemon log" in result.stdout.str()  # what the daemon saw, for the user
    assert leftovers(base) == []


def test_a_keyboard_interrupt_in_a_test_leaves_nothing(pytester: pytest.Pytester,
                                                       base: Path) -> None:
    pytester.makepyfile(test_interrupted=FAILING.replace("{fail}", "raise KeyboardInterrupt"))
    result = run(pytester)
    assert result.ret == pytest.ExitCode.INTERRUPTED, result.stdout.str()
    assert leftovers(base) == []


SLEEPER = '''
import os, time
import pytest
from dmuser.pytest_plugin import mkfs

def test_sleeps(dmuser_devices, dmuser_daemon, dmuser_private_daemon):
    origin = dmuser_devices.linear(16 << 20)
    mkfs(origin.path)
    dmuser_devices.snapshot(origin)
    dmuser_devices.mounted(origin).__enter__()  # root: a loop mount; else fuse2fs
    open(os.environ["READY_FILE"], "w").close()
    time.sleep(120)
'''


def _start_sleeper(pytester: pytest.Pytester, base: Path) -> tuple[subprocess.Popen[str], Path]:
    pytester.makepyfile(test_sleeper=SLEEPER)
    ready = base / "ready"
    env = {**os.environ, "READY_FILE": str(ready)}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider"],
                            cwd=pytester.path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the user's test did not get ready:\n{proc.communicate()[0]}")
        time.sleep(0.05)
    return proc, ready


def test_ctrl_c_leaves_nothing(pytester: pytest.Pytester, base: Path) -> None:
    proc, _ = _start_sleeper(pytester, base)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends pytest
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert leftovers(base) == []


def test_a_killed_run_is_swept_by_the_next(pytester: pytest.Pytester, base: Path) -> None:
    """SIGKILL (a hard timeout) runs no finalizer: the daemon and its mount stay, until
    the next run that starts a daemon sweeps them (the dead run's directories only)."""
    proc, ready = _start_sleeper(pytester, base)
    proc.kill()
    proc.communicate(timeout=60)
    assert leftovers(base) != []
    ready.unlink()
    pytester.makepyfile(test_next="def test_next(dmuser_daemon):\n    pass\n")
    run(pytester, "test_next.py").assert_outcomes(passed=1)
    assert leftovers(base) == []


def test_the_examples_pass(pytester: pytest.Pytester, base: Path) -> None:
    """Every example, as a user would run it (root: kernel mounts; else fuse2fs)."""
    examples = sorted((REPO / "examples").glob("test_*.py"))
    for example in examples:
        shutil.copy(example, pytester.path / example.name)
    result = run(pytester, "-rs", "-s")
    result.assert_outcomes(passed=4)
    print(*result.stdout.lines[-8:], sep="\n")  # the SQLite example's count, for the log
    line = [x for x in result.stdout.lines if x.startswith("SQLite: ")]
    assert len(line) == 1 and re.fullmatch(r"SQLite: (\d+) crash points checked, \1 passed",
                                           line[0]), line
    assert leftovers(base) == []
