"""Fixtures for the target tests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from support.data import make_image

S = 512


@pytest.fixture
def two_files(tmp_path: Path) -> SimpleNamespace:
    """a.img (32 sectors, pattern seed 1) and b.img (16 sectors, seed 2) in ``tmp_path``,
    with their initial contents ``a0`` and ``b0``."""
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    return SimpleNamespace(a=a, b=b, a0=make_image(a, 32 * S, seed=1),
                           b0=make_image(b, 16 * S, seed=2))
