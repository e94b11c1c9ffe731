"""Load a tool of this folder as a module, once.

The benchmark scripts build on each other (``bench_targets.py`` and
``bench_nbd.py`` on ``tools/bench``, ``bench_fs.py`` on ``bench_targets.py``)
and ``tools/bench`` runs them as subcommands; ``tools/bench`` has no ``.py``
suffix, so a plain import cannot find it.  Each module is executed once and
kept in ``sys.modules`` under ``name``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from types import ModuleType

HERE = os.path.dirname(os.path.abspath(__file__))


def load(name: str, filename: str) -> ModuleType:
    """The module ``name`` made from ``tools/<filename>`` (loaded on first use)."""
    mod = sys.modules.get(name)
    if mod is None:
        loader = importlib.machinery.SourceFileLoader(name, os.path.join(HERE, filename))
        spec = importlib.util.spec_from_loader(name, loader)
        assert spec is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        loader.exec_module(mod)
    return mod
