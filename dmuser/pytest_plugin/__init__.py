"""dmuser's pytest plugin: device-mapper devices as fixtures in any test suite.

Installed with the package and loaded by pytest through the ``pytest11``
entry point ``dmuser`` (``-p no:dmuser`` turns it off).  Loading it starts
nothing: a daemon is started only when a test asks for one of its fixtures.

Fixtures (all prefixed ``dmuser_`` so that they never shadow a suite's own):

``dmuser_daemon`` (session)
    A :class:`~dmuser.pytest_plugin.rig.PrivateDaemon`: ``dmuser serve`` on a
    private mountpoint and socket in a fresh ``dmuser-pytest-*`` directory
    (under ``$DMUSER_PYTEST_TMPDIR`` or the temp dir); ``.client`` is a
    :class:`dmuser.Client` for it, ``.mountpoint`` and ``.socket`` its paths.
``dmuser_private_daemon`` (function)
    The same, started for one test and stopped after it.
``dmuser_client`` (function)
    ``dmuser_daemon.client``.
``dmuser_devices`` (function)
    A :class:`~dmuser.pytest_plugin.devices.Devices` factory (image files,
    ``linear``/``create``, ``snapshot``, ``mirror``, ``flakey``,
    ``swap_in_error``, ``recording``, ``mounted``).  Everything it made is
    removed after the test, users before what they stack on.  It uses the
    session daemon, or a private one for a test marked
    ``@pytest.mark.dmuser_own_daemon``.

Plain functions, no fixture needed: ``mkfs``, ``fsck``, ``mounted`` (kernel
mount as root, fuse2fs without: ``filesystems.py``) and ``crash_points``
(``dmuser.crashpoints``).  The whole user guide: ``docs/testing-with-dmuser.md``.

Guarantee: nothing is left behind -- no mount, loop device, daemon process or
directory -- when a test passes, fails, or the run stops early (``-x``,
Ctrl-C, a ``KeyboardInterrupt`` in a test): fixture finalizers undo each
test's devices and stop each daemon, and a last session-finish hook sweeps
every directory this run made.  A run killed outright (SIGKILL, a hard
timeout) cannot clean up; the next run that starts a daemon sweeps what it
left (directories whose pytest process is gone).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from dmuser.client import Client
from dmuser.crashpoints import CrashPoint, crash_points
from dmuser.pytest_plugin.devices import SECTOR, Device, Devices, MiB
from dmuser.pytest_plugin.filesystems import fsck, mkfs, mounted
from dmuser.pytest_plugin.helpers import (
    Flakey,
    Mirror,
    Snap,
    Swap,
    flakey,
    mirror,
    snapshot,
    swap_in_error,
)
from dmuser.pytest_plugin.recording import Recording
from dmuser.pytest_plugin.rig import DIR_PREFIX, PrivateDaemon, sweep_dead, sweep_dir

__all__ = [
    "SECTOR", "CrashPoint", "Device", "Devices", "Flakey", "MiB", "Mirror", "PrivateDaemon",
    "Recording", "Snap", "Swap", "crash_points", "dmuser_client", "dmuser_daemon",
    "dmuser_devices", "dmuser_private_daemon", "flakey", "fsck", "mirror", "mkfs", "mounted",
    "snapshot", "swap_in_error",
]

#: the daemons this run started, for the session-finish sweep
_DAEMONS = pytest.StashKey[list[PrivateDaemon]]()
#: the daemon a test's dmuser_devices used, for its log on failure
_USED = pytest.StashKey[PrivateDaemon]()
_SERVE_ARGS_INI = "dmuser_serve_args"
_tags = itertools.count(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(_SERVE_ARGS_INI, "extra 'dmuser serve' options for the plugin's daemons "
                  "(e.g. --resync-throttle 5)", type="args", default=[])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "dmuser_own_daemon: dmuser_devices of this test uses a "
                                       "dmuser daemon of its own, stopped after the test")
    config.stash[_DAEMONS] = []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """After every fixture finalizer (pytest's own sessionfinish runs them): stop what is
    still running -- an interrupted teardown -- and delete this run's directories."""
    for d in session.config.stash.get(_DAEMONS, []):
        d.stop()
        sweep_dir(d.dir)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A failed test that used ``dmuser_devices`` gets the tail of the daemon's log."""
    outcome = yield
    report = outcome.get_result()
    d = item.stash.get(_USED, None)
    if d is not None and report.failed and call.when in ("call", "teardown"):
        tail = "\n".join(d.log_text().splitlines()[-40:])
        report.sections.append((f"dmuser daemon log ({d.log_path})", tail))


def _fuse_problem() -> str | None:
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc.strerror}"
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        return "fusermount3 not found in PATH"
    return None


def _start(config: pytest.Config) -> PrivateDaemon:
    problem = _fuse_problem()
    if problem:
        pytest.skip(f"dmuser: no FUSE here ({problem})")
    sweep_dead()  # what killed runs left
    args = config.getini(_SERVE_ARGS_INI)
    d = PrivateDaemon(tuple(str(a) for a in args))
    config.stash[_DAEMONS].append(d)
    return d.start()


def _stop(config: pytest.Config, d: PrivateDaemon) -> None:
    d.stop()
    config.stash[_DAEMONS].remove(d)  # done: nothing left for the session-finish sweep


@pytest.fixture(scope="session")
def dmuser_daemon(request: pytest.FixtureRequest) -> Iterator[PrivateDaemon]:
    """One dmuser daemon for the whole session (see the module docstring)."""
    d = _start(request.config)
    try:
        yield d
    finally:
        _stop(request.config, d)


@pytest.fixture
def dmuser_private_daemon(request: pytest.FixtureRequest) -> Iterator[PrivateDaemon]:
    """A dmuser daemon for this test only."""
    d = _start(request.config)
    try:
        yield d
    finally:
        _stop(request.config, d)


@pytest.fixture
def dmuser_client(dmuser_daemon: PrivateDaemon) -> Client:
    """A :class:`dmuser.Client` of the session daemon."""
    return dmuser_daemon.client


@pytest.fixture
def dmuser_devices(request: pytest.FixtureRequest) -> Iterator[Devices]:
    """A device factory for this test; everything it made is removed afterwards."""
    own = request.node.get_closest_marker("dmuser_own_daemon") is not None
    d: PrivateDaemon = request.getfixturevalue("dmuser_private_daemon" if own
                                               else "dmuser_daemon")
    request.node.stash[_USED] = d
    # unique across daemons too: as root each name also becomes /dev/mapper/NAME, one
    # namespace for every daemon on the machine (other runs, pytest-xdist workers)
    tag = f"{d.dir.name.removeprefix(DIR_PREFIX)}-t{next(_tags)}-"
    devices = Devices(d.client, d.mountpoint,
                      Path(tempfile.mkdtemp(prefix=tag, dir=d.images)), tag)
    try:
        yield devices
    finally:
        if devices.cleanup():
            # something the factory made would not go (the test stacked a device of
            # its own on it?): clear the daemon rather than carry it into the next test
            d.remove_all_devices()
