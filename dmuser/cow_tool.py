"""``dmuser cow inspect|check FILE``: read a persistent snapshot COW offline.

Works on an image file or a block device that no snapshot is using (it only
reads).  The format is the kernel's "SnAp" v1 layout, decoded with the helpers
of ``targets/exstore/persistent.py``.

* ``inspect`` prints the header, chunk size, validity, metadata areas,
  exception count and the usage ``dmsetup status`` would show on activation.
* ``check`` also verifies what an activation relies on: no origin chunk and no
  COW chunk named twice, every data chunk inside the device, no data chunk on
  the header or a metadata area, records in allocation (increasing) order.

Exit status: 0 = consistent (an invalidated snapshot is consistent), 1 = damage
or not a snapshot COW, 2 = usage error or the file cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

from targets.exstore.persistent import (
    NUM_SNAPSHOT_HDR_CHUNKS,
    SNAP_MAGIC,
    SNAPSHOT_DISK_VERSION,
    area_location,
    decode_header,
    exceptions_per_area,
    iter_records,
)

SECTOR = 512


@dataclass
class CowReport:
    path: str
    size_sectors: int
    magic: int = 0
    valid: int = 0
    version: int = 0
    chunk_size: int = 0
    state: str = ""
    exceptions_per_area: int = 0
    area_chunks: list[int] = field(default_factory=list)
    exceptions: int = 0
    next_free: int = 0
    usage: str = ""
    mapping: dict[int, int] = field(default_factory=dict, repr=False)
    #: COW chunks in on-disk record order
    order: list[int] = field(default_factory=list, repr=False)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _size(f: BinaryIO) -> int:
    return f.seek(0, os.SEEK_END) // SECTOR


def _read(f: BinaryIO, offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)


def analyse(path: str, check: bool) -> CowReport:
    """Decode the COW at ``path``; with ``check``, collect every inconsistency."""
    with open(path, "rb") as f:
        rep = CowReport(path, _size(f))
        head = _read(f, 0, 16)
        if len(head) < 16:
            rep.state = "too small for a snapshot header"
            rep.problems.append(rep.state)
            return rep
        hdr = decode_header(head)
        rep.magic, rep.valid, rep.version, rep.chunk_size = (
            hdr.magic, hdr.valid, hdr.version, hdr.chunk_size)
        if hdr.magic == 0:
            rep.state = "new (no header yet: the first activation initialises it)"
            return rep
        if hdr.magic != SNAP_MAGIC:
            rep.state = "not a snapshot COW (bad magic)"
            rep.problems.append(rep.state)
            return rep
        cs = hdr.chunk_size
        if cs <= 0 or cs & (cs - 1) or cs > ((1 << 31) - 1) >> 9:
            rep.state = f"bad chunk size {cs}"
            rep.problems.append(rep.state)
            return rep
        if hdr.version != SNAPSHOT_DISK_VERSION:
            rep.state = f"unsupported version {hdr.version}"
            rep.problems.append(rep.state)
            return rep
        rep.state = "valid" if hdr.valid else "invalidated (all I/O to the snapshot fails)"
        _walk(f, rep)
    if check:
        _check(rep)
    return rep


def _walk(f: BinaryIO, rep: CowReport) -> None:
    """Follow the areas as an activation does (even for an invalidated snapshot)."""
    cs = rep.chunk_size
    per_area = rep.exceptions_per_area = exceptions_per_area(cs)
    chunk_bytes = cs * SECTOR
    next_free = NUM_SNAPSHOT_HDR_CHUNKS + 1
    area, full = 0, True
    seen_old: set[int] = set()
    order = rep.order
    while full:
        loc = area_location(cs, area)
        rep.area_chunks.append(loc)
        buf = _read(f, loc * chunk_bytes, chunk_bytes)
        if len(buf) < chunk_bytes:
            rep.problems.append(f"metadata area {area} (chunk {loc}) lies beyond the end of "
                                "the device: activation fails")
            break
        full = True
        for i, (old, new) in enumerate(iter_records(buf)):
            if new == 0:
                full = False
                break
            if old in seen_old:
                rep.problems.append(f"origin chunk {old} has two exceptions (area {area}, "
                                    f"record {i})")
            seen_old.add(old)
            rep.mapping[old] = new
            order.append(new)
            next_free = max(next_free, new + 1)
        area += 1
    stride = per_area + 1
    if next_free % stride == NUM_SNAPSHOT_HDR_CHUNKS:
        next_free += 1
    rep.exceptions = len(order)
    rep.next_free = next_free
    current_area = len(rep.area_chunks) - 1
    rep.usage = f"{next_free * cs}/{rep.size_sectors} {(current_area + 2) * cs}"


def _check(rep: CowReport) -> None:
    order = rep.order
    if not rep.exceptions_per_area:
        return
    cs, stride = rep.chunk_size, exceptions_per_area(rep.chunk_size) + 1
    seen: set[int] = set()
    for new in order:
        if new in seen:
            rep.problems.append(f"COW chunk {new} is used by two exceptions")
        seen.add(new)
        if (new + 1) * cs > rep.size_sectors:
            rep.problems.append(f"COW chunk {new} lies beyond the end of the device")
        if new % stride == NUM_SNAPSHOT_HDR_CHUNKS:
            rep.problems.append(f"COW chunk {new} is a metadata area used as data")
    if any(b <= a for a, b in zip(order, order[1:], strict=False)):
        rep.warnings.append("COW chunks are not in allocation (increasing) order")


def _print(rep: CowReport, check: bool) -> None:
    print(f"file:                {rep.path}")
    print(f"size:                {rep.size_sectors} sectors")
    snap = " (SnAp)" if rep.magic == SNAP_MAGIC else ""
    print(f"magic:               {rep.magic:#010x}{snap}")
    print(f"state:               {rep.state}")
    if rep.magic == SNAP_MAGIC and rep.exceptions_per_area:
        print(f"version:             {rep.version}")
        print(f"chunk size:          {rep.chunk_size} sectors ({rep.chunk_size * SECTOR} bytes)")
        print(f"exceptions per area: {rep.exceptions_per_area}")
        areas = ", ".join(map(str, rep.area_chunks))
        print(f"metadata areas:      {len(rep.area_chunks)} (chunks {areas})")
        print(f"exceptions:          {rep.exceptions}")
        print(f"next free chunk:     {rep.next_free}")
        print(f"usage:               {rep.usage}")
    for w in rep.warnings:
        print(f"warning: {w}")
    for p in rep.problems:
        print(f"damage: {p}")
    if check:
        print("check: " + ("FAILED" if rep.problems else "ok"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dmuser cow``; ``argv`` excludes the ``cow`` word."""
    parser = argparse.ArgumentParser(prog="dmuser cow",
                                     description="inspect or check a persistent snapshot COW")
    parser.add_argument("action", choices=["inspect", "check"])
    parser.add_argument("file")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--list", action="store_true", help="also list every exception")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and 2
    check = args.action == "check"
    try:
        rep = analyse(args.file, check)
    except OSError as exc:
        print(f"dmuser cow: {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if args.json:
        data = asdict(rep)
        data["mapping"] = {str(k): v for k, v in rep.mapping.items()} if args.list else None
        del data["order"]
        print(json.dumps(data, indent=1))
    else:
        _print(rep, check)
        if args.list:
            for old, new in rep.mapping.items():
                print(f"  {old} -> {new}")
    return 1 if rep.problems else 0


if __name__ == "__main__":
    sys.exit(main())
