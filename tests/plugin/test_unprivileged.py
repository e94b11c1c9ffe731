"""The examples and the plugin's tests, run again as a user without any privilege.

Why: most users of the plugin are not root, and its non-root paths (fuse2fs for
``mounted()``, ``fusermount3`` for the daemon's mount) are what they get.  When
this suite runs as root (CI does), this test runs ``pytest tests/plugin`` -- which
runs every example (``test_the_examples_pass``) -- through ``runuser`` as
``$DMUSER_TEST_USER`` (default ``nobody``) with a private HOME and temp dir, and
requires tests to pass with none failed and none skipped.
Not as root it skips -- except under ``CI=true``, where CI must run it as root.

The interpreter: this one, if the user can run it; otherwise (a venv whose
interpreter lives where the user cannot go, e.g. pyenv under ``/root``) a small
venv of the system's ``python3.X`` of the same version whose one ``.pth`` file
adds this venv's site-packages -- the same installed packages.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmuser.pytest_plugin import rig

REPO = Path(__file__).resolve().parents[2]
USER = os.environ.get("DMUSER_TEST_USER", "nobody")
CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.timeout(900)]


def as_user(*cmd: str, home: Path, timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    env = ["HOME=" + str(home), "TMPDIR=" + str(home), "PATH=" + os.environ["PATH"],
           "PYTHONDONTWRITEBYTECODE=1", "LANG=C.UTF-8"]
    if CI:
        env.append("CI=true")
    return subprocess.run(["runuser", "-u", USER, "--", "env", "-i", *env, *cmd], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, check=check)


def python_for_user(home: Path) -> str:
    probe = ("-c", "import dmuser.pytest_plugin, pytest, pyfuse3")
    if as_user(sys.executable, *probe, home=home).returncode == 0:
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/local/bin:/usr/bin")
    if system is None:
        pytest.fail(f"{USER} cannot run {sys.executable} and there is no system {version}")
    venv = home / "venv"
    subprocess.run([system, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    site = venv / "lib" / version / "site-packages"
    (site / "dmuser-parent.pth").write_text(
        f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    python = str(venv / "bin" / "python")
    res = as_user(python, *probe, home=home)
    assert res.returncode == 0, f"{USER} cannot import dmuser: {res.stderr}"
    return python


@pytest.fixture
def home() -> Iterator[Path]:
    if os.geteuid() != 0:
        if CI:
            pytest.fail("CI=true: this test must run as root (it runs the suite as a user)")
        pytest.skip("needs root (runs the examples and plugin tests through runuser)")
    if not shutil.which("runuser"):
        pytest.fail("runuser not found (util-linux)")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        pytest.fail(f"no user {USER!r} (set DMUSER_TEST_USER to an unprivileged user)")
    d = Path(tempfile.mkdtemp(prefix="dmuser-unpriv-", dir="/tmp"))
    shutil.chown(d, USER)
    try:
        yield d
    finally:
        for sub in d.rglob(rig.DIR_PREFIX + "*"):
            rig.sweep_dir(sub)  # never leave the inner run's mess, even failing
        shutil.rmtree(d, ignore_errors=True)


def test_examples_and_plugin_tests_pass_without_root(home: Path) -> None:
    python = python_for_user(home)
    report = home / "report.xml"
    res = as_user(python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
                  f"--junitxml={report}", "tests/plugin",  # test_the_examples_pass: examples/
                  "--ignore=tests/plugin/test_unprivileged.py", home=home, timeout=800)
    out = res.stdout + res.stderr
    assert report.exists(), out
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite is not None, out
    counts = {k: int(suite.get(k, "0")) for k in ("tests", "failures", "errors", "skipped")}
    assert counts["failures"] == counts["errors"] == counts["skipped"] == 0, out
    assert counts["tests"] > 0 and res.returncode == 0, out
    print(f"as {USER}: {counts}")
    with open("/proc/mounts") as f:
        assert [line for line in f if str(home) in line] == []
    pids = subprocess.run(["pgrep", "-u", USER, "-f", str(home)], capture_output=True,
                          text=True).stdout.split()
    assert pids == [], f"processes of the run left: {pids}"
