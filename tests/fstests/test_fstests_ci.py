"""The CI list of fstests' dm tests (``tools/fstests --list ci``) passes with dmuser.

Every test of ``fstests_results.CI`` must pass: a failure, a not-run (for any
reason: the list holds only tests that run here) or a test ``check`` never
reached fails this test, naming each one with fstests' reason.  The run's work
directory is below pytest's ``tmp_path``, so the session sweep removes what a
killed run would leave (mounts, loop devices on its images).  On the pytest
watchdog or a hang the tool gets SIGTERM and tears down before it is waited for.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import fstests_results as fr
import pytest

pytestmark = [pytest.mark.root, pytest.mark.loop, pytest.mark.fuse, pytest.mark.mkfs,
              pytest.mark.timeout(900)]

TOOL = Path(__file__).resolve().parents[2] / "tools" / "fstests"


def test_ci_list_passes(fstests_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "ci.json"
    proc = subprocess.Popen(
        [sys.executable, str(TOOL), "--fs", ",".join(fr.CI), "--list", "ci",
         "--test-timeout", "300", "--work", str(tmp_path / "work"), "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=840)
    except BaseException:
        proc.send_signal(signal.SIGTERM)  # the tool tears down, then exits
        proc.communicate(timeout=120)
        raise
    assert out.is_file(), f"tools/fstests wrote no results (exit {proc.returncode}):\n{output}"
    run = fr.load_json(out)
    want = [(fs, t) for fs, tests in fr.CI.items() for t in tests]
    assert [(r.fs, r.test) for r in run.results] == want
    bad = [f"{r.fs} {r.test}: {r.status}: {r.reason}" for r in run.results if r.status != "pass"]
    assert not bad, "\n".join(bad) + "\n\n" + output[-4000:]
    assert proc.returncode == 0, output[-4000:]
