"""Shared test configuration for every tier (unit and integration).

Capabilities
    ``root``, ``fuse``, ``loop``, ``fio`` and ``mkfs`` are probed once per run
    (each probe returns a reason when the capability is missing).  A test marked
    with one of them is skipped when it is missing -- except when ``CI`` is set
    (``CI=true``/``1``/``yes``): then such a test FAILS instead, and any other
    skip of a test carrying one of these marks (a ``pytest.skip()`` inside it,
    a ``skipif``) turns the exit status into 1 at the end of the run.  A CI
    machine that silently lost /dev/fuse must not report green.

    Pretend a capability is missing (to test this file):
    ``DMUSER_TEST_PRETEND_NO=fio,loop`` or ``DMUSER_TEST_PRETEND_NO_FIO=1``.

    Tests that use the ``daemon``/``make_daemon`` fixtures get the ``fuse`` mark
    automatically.

Leftovers
    Every run registers itself (pid, start time, base temp dir) in
    ``<basetemp parent>/.dmuser-test-runs/`` and records there each daemon it
    starts.  At session start what *dead* runs left is swept: mounts below
    their base temp dir are unmounted, loop devices backed by files below it
    detached, their daemons killed by pid after checking start time and
    command line.  At session finish the same is done for this run; anything
    found then is reported in the terminal summary (the per-test teardown
    should have cleaned it).  Nothing outside those directories is touched and
    live runs are left alone, so concurrent pytest runs are safe.

Watchdog
    Each test gets a soft time limit (``DMUSER_TEST_TIMEOUT``, default 120 s,
    or ``@pytest.mark.timeout(SECONDS)``): SIGALRM fails the test with every
    thread's traceback; teardown gets a fresh budget of its own.  As a last
    resort ``faulthandler.dump_traceback_later(..., exit=True)`` kills the run
    30 s after the limit if the main thread is stuck somewhere a signal cannot
    reach; the next run's session-start sweep then removes what it left.
"""

from __future__ import annotations

import faulthandler
import os
import shutil
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)  # test modules import the support package from here

from support.daemon import Daemon, DaemonFactory  # noqa: E402  (needs the path above)
from support.system import dead_runs, in_ci, register_run, sweep_run  # noqa: E402

CAPABILITIES = ("root", "fuse", "loop", "fio", "mkfs")
#: marks whose skip fails a CI run
CI_ENFORCED = CAPABILITIES
DAEMON_FIXTURES = ("daemon", "make_daemon")

_CAPS_KEY = pytest.StashKey[dict]()
_REPORTS_KEY = pytest.StashKey[dict]()


# -- capability probes -------------------------------------------------------------------


def _pretended_missing() -> set[str]:
    names = {w.strip().lower() for w in os.environ.get("DMUSER_TEST_PRETEND_NO", "").split(",")}
    for cap in CAPABILITIES:
        if os.environ.get(f"DMUSER_TEST_PRETEND_NO_{cap.upper()}", "") not in ("", "0"):
            names.add(cap)
    return names - {""}


def _probe_root() -> str | None:
    return None if os.geteuid() == 0 else f"not root (euid {os.geteuid()})"


def _probe_fuse() -> str | None:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return f"cannot open /dev/fuse read-write: {exc.strerror}"
    os.close(fd)
    if not shutil.which("fusermount3"):
        return "fusermount3 not found in PATH"
    return None


def _probe_loop() -> str | None:
    if not shutil.which("losetup"):
        return "losetup not found in PATH"
    try:
        res = subprocess.run(["losetup", "-f"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"'losetup -f' failed: {exc}"
    if res.returncode != 0:
        return f"'losetup -f' failed: {res.stderr.strip() or res.returncode}"
    return None


def _probe_fio() -> str | None:
    if not shutil.which("fio"):
        return "fio not found in PATH"
    return None


def _probe_mkfs() -> str | None:
    missing = [tool for tool in ("mkfs.ext4", "e2fsck") if not shutil.which(tool)]
    return f"{' and '.join(missing)} not found in PATH" if missing else None


_PROBES = {"root": _probe_root, "fuse": _probe_fuse, "loop": _probe_loop,
           "fio": _probe_fio, "mkfs": _probe_mkfs}


def probe_capabilities() -> dict[str, str | None]:
    """capability -> None if available, else the reason it is not."""
    pretend = _pretended_missing()
    caps: dict[str, str | None] = {}
    for cap in CAPABILITIES:
        if cap in pretend:
            caps[cap] = "pretended missing (DMUSER_TEST_PRETEND_NO*)"
        else:
            caps[cap] = _PROBES[cap]()
    return caps


def _caps(config: pytest.Config) -> dict[str, str | None]:
    if _CAPS_KEY not in config.stash:
        config.stash[_CAPS_KEY] = probe_capabilities()
    return config.stash[_CAPS_KEY]


def _missing_for(item: pytest.Item) -> list[str]:
    caps = _caps(item.config)
    return [f"{cap}: {caps[cap]}" for cap in CAPABILITIES
            if caps[cap] is not None and item.get_closest_marker(cap) is not None]


# -- hooks -----------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mkfs: needs mkfs.ext4 and e2fsck")
    config.addinivalue_line("markers", "timeout(seconds): per-test watchdog limit "
                                       "(default $DMUSER_TEST_TIMEOUT or 120)")


def pytest_report_header(config: pytest.Config) -> list[str]:
    caps = _caps(config)
    enabled = [c for c in CAPABILITIES if caps[c] is None]
    disabled = [f"{c} ({caps[c]})" for c in CAPABILITIES if caps[c] is not None]
    return [f"dmuser capabilities: enabled: {', '.join(enabled) or 'none'} / "
            f"disabled: {', '.join(disabled) or 'none'}",
            f"dmuser: CI={'yes: capability skips fail the run' if in_ci() else 'no'}"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(f in getattr(item, "fixturenames", ()) for f in DAEMON_FIXTURES) \
                and item.get_closest_marker("fuse") is None:
            item.add_marker(pytest.mark.fuse)
        missing = _missing_for(item)
        if missing and not in_ci():
            item.add_marker(pytest.mark.skip(reason="missing " + "; ".join(missing)))
        # In CI the item stays; pytest_runtest_setup fails it.


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    missing = _missing_for(item)
    if missing and in_ci():
        pytest.fail("CI is set, so a missing capability is an error, not a skip: "
                    + "; ".join(missing), pytrace=False)


#: skips of CI-enforced tests seen in this run
_CI_SKIPS: list[str] = []
#: leftovers of dead runs the session-start sweep removed
_SWEPT_AT_START: list[str] = []
#: leftovers of this run the session-finish sweep found
_SWEPT: list[str] = []
#: this run's registry file, once the session fixture has run
_RUN: list[Path] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and any(m in report.keywords for m in CI_ENFORCED):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _CI_SKIPS.append(f"{report.nodeid}: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    item.stash.setdefault(_REPORTS_KEY, {})[report.when] = report


def phase_failed(request: pytest.FixtureRequest) -> bool:
    """True if the setup or call phase of the requesting test failed."""
    reports = request.node.stash.get(_REPORTS_KEY, {})
    return any(r.failed for r in reports.values())


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for run_file in _RUN:
        _SWEPT.extend(sweep_run(run_file))
    if in_ci() and _CI_SKIPS and session.exitstatus in (pytest.ExitCode.OK,
                                                         pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    if in_ci() and _CI_SKIPS:
        terminalreporter.section("dmuser: capability tests skipped under CI (run FAILS)", red=True)
        for line in _CI_SKIPS:
            terminalreporter.line(line, red=True)
    if _SWEPT_AT_START:
        terminalreporter.section("dmuser: leftovers of dead test runs cleaned", yellow=True)
        for line in _SWEPT_AT_START:
            terminalreporter.line(line, yellow=True)
    if _SWEPT:
        terminalreporter.section("dmuser: leftovers of this run cleaned at session end",
                                 yellow=True)
        for line in _SWEPT:
            terminalreporter.line(line, yellow=True)


# -- leftover sweep ----------------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _dmuser_run_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Register this run (for sweeps); sweep what dead runs left behind."""
    base = tmp_path_factory.getbasetemp()
    for run_file in dead_runs(base.parent):
        _SWEPT_AT_START.extend(sweep_run(run_file))
    _RUN[:] = [register_run(base)]
    yield


# -- watchdog --------------------------------------------------------------------------


class WatchdogTimeout(Exception):
    pass


def _timeout_for(item: pytest.Item) -> float:
    mark = item.get_closest_marker("timeout")
    if mark is not None and mark.args:
        return float(mark.args[0])
    return float(os.environ.get("DMUSER_TEST_TIMEOUT", "120"))


def _arm(seconds: float, what: str) -> None:
    def on_alarm(signum: int, frame: object) -> None:
        main = threading.main_thread().ident
        stacks = "".join(
            f"\n--- thread {tid} ---\n" + "".join(traceback.format_stack(f))
            for tid, f in sys._current_frames().items() if tid != main) or " (no other threads)"
        raise WatchdogTimeout(f"watchdog: {what} exceeded {seconds:.0f} s; "
                              f"stacks of the other threads:{stacks}")

    if signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None) \
            or getattr(signal.getsignal(signal.SIGALRM), "_dmuser_watchdog", False):
        on_alarm._dmuser_watchdog = True  # type: ignore[attr-defined]
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + 30, exit=True)


def _disarm() -> None:
    if getattr(signal.getsignal(signal.SIGALRM), "_dmuser_watchdog", False):
        signal.setitimer(signal.ITIMER_REAL, 0)
    faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    _arm(_timeout_for(item), f"{item.nodeid} (setup + call)")
    try:
        yield
    finally:
        _disarm()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    _arm(max(60.0, _timeout_for(item) / 2), f"{item.nodeid} (teardown)")
    yield


# -- daemon fixtures -------------------------------------------------------------------


@pytest.fixture
def make_daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DaemonFactory]:
    """Factory: ``make_daemon(name="d", start=True)`` -> a started :class:`support.daemon.Daemon`.

    Every daemon made is stopped at teardown (and everything it set up
    removed), also when the test failed; on failure the daemon logs are
    printed.  A daemon whose log shows a Python traceback fails the test
    unless ``daemon.allow_tracebacks`` was set.
    """
    factory = DaemonFactory(tmp_path)
    try:
        yield factory
    finally:
        problems = factory.stop_all()
        if phase_failed(request):
            for d in factory.daemons:
                sys.stdout.write(f"\n--- log of daemon {d.name} ({d.log_path}) ---\n"
                                 f"{d.log_tail()}\n")
        if problems and not phase_failed(request):
            pytest.fail("daemon teardown: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def daemon(make_daemon: DaemonFactory) -> Daemon:
    """A running daemon: mountpoint ``daemon.mnt``, socket ``daemon.sock``, cwd ``daemon.dir``."""
    return make_daemon()
