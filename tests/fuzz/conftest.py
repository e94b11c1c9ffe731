"""The fuzz tier: seeded hostile input (``support/fuzz.py``); counts printed at the end."""

from __future__ import annotations

import pytest
from support.fuzz import FuzzCounts, scale, seed

_COUNTS = FuzzCounts()


@pytest.fixture(scope="session")
def fuzz_counts() -> FuzzCounts:
    return _COUNTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _COUNTS.counts:
        terminalreporter.section(f"dmuser fuzz tier (seed {seed()}, scale {scale():g})")
        for line in _COUNTS.lines():
            terminalreporter.line(line)
