"""The kernel tier: dmuser checked against the real kernel's device-mapper.

Tests here are marked ``kernel``.  They run wherever ``kvm-dm`` (``$DMUSER_KVM_DM``,
else ``<repo>/../shared/tools/kvm-dm``, see ``kvm.py``) works, CI included, and
skip with the reason when it cannot run (no tool, the kernel/QEMU cache
cannot be built, the VM never reports).  Under ``CI`` (``CI=true``/``1``/
``yes``/``on``) a tool that exists but cannot run is a FAILURE, not a skip:
a CI machine that silently lost the oracle must not report green.  A missing
tool is a skip everywhere.

Fixture ``kvm_dm``: ``kvm_dm(script, images, files=None)`` -> ``kvm.KvmResult``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest
from support.system import in_ci

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # the test modules import kvm.py from here

import kvm  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kernel: compares with the real kernel's device-mapper in a VM "
                   "(kvm-dm: $DMUSER_KVM_DM, else ../shared/tools/kvm-dm); skipped with the "
                   "reason when that cannot run, except under CI where the tool exists")


def unavailable(reason: str) -> None:
    """Skip -- or, under CI with the tool present, fail -- for ``reason``."""
    if in_ci() and kvm.TOOL.is_file():
        pytest.fail(f"CI is set and {kvm.TOOL} exists, but it cannot run: {reason}",
                    pytrace=False)
    pytest.skip(f"kvm-dm unavailable: {reason}")


@pytest.fixture(scope="session")
def kvm_tool() -> str:
    try:
        return str(kvm.tool())
    except kvm.KvmUnavailable as exc:
        unavailable(str(exc))
        raise  # not reached


@pytest.fixture
def kvm_dm(kvm_tool: str) -> Callable[..., kvm.KvmResult]:
    def run(script: str, images: list[str], files: dict[str, bytes] | None = None
            ) -> kvm.KvmResult:
        try:
            result = kvm.run(script, images, files)
        except kvm.KvmUnavailable as exc:
            unavailable(str(exc))
            raise  # not reached
        sys.stdout.write(f"\n[{result.timing}]\n")
        return result

    return run
