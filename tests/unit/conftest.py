"""Fixtures for the in-process unit tests (no FUSE mount, no root).

The tests import what they need from ``support`` (fakes, targets, data, oracles,
vectors); this file holds fixtures only.  ``mgr`` is a fresh DeviceManager whose
devices are removed (and checked: nothing left held or open) at teardown.
``unit-probe`` (``support.targets.ProbeTarget``) starts every test with no
instances recorded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from support.targets import ProbeTarget, make_manager, remove_all_checked

from dmuser.core.manager import DeviceManager


@pytest.fixture(autouse=True)
def _fresh_probe_instances() -> Iterator[None]:
    """``ProbeTarget.instances`` lists only the probes the running test built."""
    ProbeTarget.instances.clear()
    yield
    ProbeTarget.instances.clear()


@pytest.fixture
async def mgr() -> AsyncIterator[DeviceManager]:
    """A DeviceManager; at teardown every device is removed, users first, and nothing
    may be left held or open (``support.targets.remove_all_checked``)."""
    manager = make_manager()
    yield manager
    await remove_all_checked(manager)
