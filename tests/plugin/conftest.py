"""Tests of the pytest plugin (``dmuser.pytest_plugin``): enables pytest's ``pytester``.

``pytest_plugins = ["pytester"]`` is only allowed in the top-level conftest, and
this one is not when the whole suite runs (``testpaths = ["tests"]``), so the
plugin is registered here at configure time instead, which pytest allows.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("pytester"):
        config.pluginmanager.import_plugin("pytester")
