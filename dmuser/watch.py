"""``dmuser status --watch``: live progress of resync and merge.

Polls ``status`` and draws, per target line that reports progress, a bar with
the fraction done, the rate and an ETA.  Progress comes from the kernel's own
status fields, so anything ``dmsetup status`` can show is shown:

* ``mirror``: ``<in-sync>/<total>`` regions.
* ``snapshot-merge``: ``<sectors allocated>/<total> <metadata sectors>``; the
  merge is done when allocated equals metadata, and progress is measured from
  the allocation first seen.

The rate is the average since the first sample that moved; with no movement
yet, no rate or ETA is shown.  On a terminal the lines are redrawn in place;
otherwise one line is printed per change.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

BAR_WIDTH = 30


@dataclass
class Progress:
    done: int
    total: int
    unit: str


def _mirror_progress(words: list[str]) -> Progress | None:
    nr_legs = int(words[0])
    in_sync, total = words[1 + nr_legs].split("/")
    return Progress(int(in_sync), int(total), "regions")


def parse_progress(line: str, first: dict[str, int]) -> Progress | None:
    """Progress of one status line, or None if its target reports none.

    ``first`` remembers, per line key, the value a merge started from.
    """
    words = line.split()
    if len(words) < 4:
        return None
    key = " ".join(words[:3])
    target, params = words[2], words[3:]
    try:
        if target == "mirror":
            return _mirror_progress(params)
        if target == "snapshot-merge" and "/" in params[0] and len(params) >= 2:
            allocated = int(params[0].split("/")[0])
            metadata = int(params[1])
            start = first.setdefault(key, allocated)
            return Progress(start - allocated, start - metadata, "sectors")
    except (ValueError, IndexError):
        return None
    return None


def _format_eta(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class _Track:
    t0: float
    done0: int


def render(name: str, line: str, p: Progress, track: _Track | None, now: float) -> str:
    frac = 1.0 if p.total <= 0 else min(1.0, p.done / p.total)
    filled = int(frac * BAR_WIDTH)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    target = line.split()[2]
    text = f"{name}: {target} [{bar}] {frac * 100:5.1f}% {p.done}/{p.total} {p.unit}"
    if track is not None and now > track.t0 and p.done > track.done0:
        rate = (p.done - track.done0) / (now - track.t0)
        text += f", {rate:.1f} {p.unit}/s"
        if p.done < p.total:
            text += f", ETA {_format_eta((p.total - p.done) / rate)}"
    if p.done >= p.total:
        text += ", complete"
    return text


def watch(fetch: Callable[[], dict[str, Any]], interval: float = 0.5,
          until_complete: bool = False, out: TextIO = sys.stdout,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Poll ``fetch()`` (a ``status`` reply's data: name -> lines) and draw progress.

    Returns 0 when ``until_complete`` and everything is complete, or on Ctrl-C.
    """
    first: dict[str, int] = {}
    tracks: dict[str, _Track] = {}
    last: list[str] = []
    tty = out.isatty()
    try:
        while True:
            data = fetch()
            now = clock()
            lines, complete = [], True
            for name, status_lines in sorted(data.items()):
                for line in status_lines:
                    p = parse_progress(line, first)
                    if p is None:
                        continue
                    key = f"{name} {line.split()[0]}"
                    track = tracks.get(key)
                    if track is None or p.done < track.done0:
                        track = tracks[key] = _Track(now, p.done)
                    lines.append(render(name, line, p, track, now))
                    complete = complete and p.done >= p.total
            if not lines:
                lines = ["no resync or merge in progress on these devices"]
            if lines != last:
                if tty and last:
                    out.write(f"\x1b[{len(last)}F\x1b[J")
                out.write("\n".join(lines) + "\n")
                out.flush()
                last = lines
            if until_complete and complete:
                return 0
            sleep(interval)
    except KeyboardInterrupt:
        return 0
