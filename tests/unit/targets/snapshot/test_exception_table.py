"""ExceptionTable: the snapshot's chunk map and the runs of consecutive chunks the kernel
keeps beside it (insert walks, covers / covers_any)."""

from __future__ import annotations

import random

from dmuser.targets.snapshot.exception_table import ExceptionTable


def test_exception_table_insert_matches_the_kernel_walk() -> None:
    rng = random.Random(7)
    for _ in range(30):
        table, ref = ExceptionTable(), ExceptionTable()
        olds = rng.sample(range(600), 300)
        if rng.random() < 0.5:
            olds.sort(reverse=rng.random() < 0.5)
        news = list(range(2, 302))
        if rng.random() < 0.3:
            rng.shuffle(news)
        for old, new in zip(olds, news, strict=True):
            table.insert(old, new)
            ref._map[old] = new
            ExceptionTable._insert_walk(ref._runs.setdefault(old >> 8, []), old, new)
        assert table._runs == ref._runs
        assert dict(table.items()) == dict(ref.items())


def test_exception_table_covers() -> None:
    rng = random.Random(3)
    for _ in range(20):
        table = ExceptionTable()
        present = set(range(rng.randrange(0, 300), rng.randrange(300, 1100)))
        present -= set(rng.sample(sorted(present), rng.randrange(0, 3)))
        for i, old in enumerate(sorted(present)):
            table.insert(old, i + 2)
        for _ in range(200):
            first = rng.randrange(0, 1100)
            last = first + rng.choice([0, 1, 15, 255, 256, 300, 700])
            want = all(c in present for c in range(first, last + 1))
            assert table.covers(first, last) == want, (first, last)
            assert table.covers_any(first, last) == any(c in present
                                                        for c in range(first, last + 1))
