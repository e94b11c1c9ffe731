"""``status --watch`` progress parsing and drawing, with a fake daemon and clock."""

from __future__ import annotations

import io

from dmuser.watch import parse_progress, watch

MIRROR = "0 8192 mirror 2 254:0 254:64 {}/8 1 AA 1 core"


def test_mirror_progress_is_in_sync_over_total() -> None:
    p = parse_progress(MIRROR.format(3), {})
    assert p is not None and (p.done, p.total, p.unit) == (3, 8, "regions")
    three_legs = "0 8 mirror 3 a b c 5/9 1 AAA 1 core"
    p = parse_progress(three_legs, {})
    assert p is not None and (p.done, p.total) == (5, 9)


def test_merge_progress_counts_from_first_allocation_seen() -> None:
    first: dict[str, int] = {}
    p = parse_progress("0 100 snapshot-merge 48/8192 16", first)
    assert p is not None and (p.done, p.total) == (0, 32)
    p = parse_progress("0 100 snapshot-merge 24/8192 16", first)
    assert p is not None and (p.done, p.total) == (24, 32)


def test_targets_without_progress_are_ignored() -> None:
    assert parse_progress("0 100 linear ", {}) is None
    assert parse_progress("0 100 snapshot Invalid", {}) is None
    assert parse_progress("0 100 mirror garbage", {}) is None


def test_watch_draws_rate_and_eta_and_stops_when_complete() -> None:
    samples = iter([0, 2, 4, 4, 8])
    now = [0.0]
    out = io.StringIO()

    def fetch() -> dict[str, list[str]]:
        return {"m": [MIRROR.format(next(samples))]}

    def sleep(dt: float) -> None:
        now[0] += 1.0

    rc = watch(fetch, interval=1, until_complete=True, out=out,
               clock=lambda: now[0], sleep=sleep)
    text = out.getvalue().splitlines()
    assert rc == 0
    assert text[0].startswith("m: mirror [") and "0/8 regions" in text[0]
    assert "2.0 regions/s" in text[1] and "ETA 0:03" in text[1]
    assert text[-1].endswith("8/8 regions, 2.0 regions/s, complete")
    assert "1.3 regions/s" in text[3]  # a stalled sample lowers the average rate
    assert len(text) == 5
