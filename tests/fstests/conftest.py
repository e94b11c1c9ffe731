"""The fstests tier: fstests' own device-mapper tests, run by ``tools/fstests``
with dmuser as the device-mapper (docs/fstests.md).

``tools/`` goes on ``sys.path`` so the tests import ``fstests_build`` and
``fstests_results``, the tool's own modules.  :func:`fstests_tree` builds the
pinned fstests once (cached under ``/var/tmp/dmuser-fstests``; about a minute
the first time): without the tarball or the build tools the tier is skipped
with the reason, and under ``CI=true`` it fails instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from support.system import in_ci

TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import fstests_build  # noqa: E402  (needs the path above)


@pytest.fixture(scope="session")
def fstests_tree() -> Path:
    try:
        return fstests_build.build_tree()
    except fstests_build.BuildError as exc:
        if in_ci():
            pytest.fail(f"CI is set, so this is an error, not a skip: {exc}", pytrace=False)
        pytest.skip(str(exc))
