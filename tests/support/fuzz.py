"""Seeds, sizes and counts for the fuzz tier (``tests/fuzz``).

Every fuzz test draws its inputs from :func:`fuzz_rng`, seeded from
``$DMUSER_FUZZ_SEED`` (default 20261203) and the test's own name, so a run is
reproducible: a failure message names the input index, and the same seed
replays it.  :func:`iterations` scales each test's quick CI count by
``$DMUSER_FUZZ_SCALE`` (default 1; e.g. 50 for a long run on demand).
:class:`FuzzCounts` collects, per input class, how many inputs were tried,
rejected with a clear error and loaded; the tier prints them at the end.
"""

from __future__ import annotations

import os
import random
from collections import Counter

DEFAULT_SEED = 20261203


def seed() -> int:
    return int(os.environ.get("DMUSER_FUZZ_SEED") or DEFAULT_SEED)


def scale() -> float:
    return float(os.environ.get("DMUSER_FUZZ_SCALE") or 1)


def iterations(quick: int) -> int:
    """How many inputs a test tries: ``quick`` in CI, times $DMUSER_FUZZ_SCALE on demand."""
    return max(1, int(quick * scale()))


def fuzz_rng(name: str) -> random.Random:
    """The input stream of one fuzz test: the run's seed and the test's name."""
    return random.Random(f"{seed()}:{name}")


class FuzzCounts:
    """Inputs tried, rejected (a clear error) and loaded (a consistent load), per class."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = {}

    def add(self, kind: str, outcome: str) -> None:
        counter = self.counts.setdefault(kind, Counter())
        counter["tried"] += 1
        counter[outcome] += 1

    def lines(self) -> list[str]:
        return [f"{kind}: " + ", ".join(f"{n} {what}" for what, n in
                                        [("tried", c["tried"]), *sorted((k, v) for k, v in
                                                                        c.items() if k != "tried")])
                for kind, c in sorted(self.counts.items())]
