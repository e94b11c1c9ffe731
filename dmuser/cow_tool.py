"""``dmuser cow inspect|check FILE``: read a persistent snapshot COW offline.

Works on an image file or a block device that no snapshot is using (it only
reads).  The format is the kernel's "SnAp" v1 layout, decoded and walked by
:mod:`dmuser.formats.cow`, the same walk the persistent store activates with.

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

from dmuser.formats.cow import (
    SNAP_MAGIC,
    SNAPSHOT_DISK_VERSION,
    MetadataWalk,
    chunk_size_problem,
    decode_header,
    exceptions_per_area,
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
        if chunk_size_problem(cs):
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
    rep.exceptions_per_area = exceptions_per_area(cs)
    walk = MetadataWalk(cs, rep.size_sectors)
    while (chunk := walk.next_area()) is not None:
        walk.feed(_read(f, chunk * cs * SECTOR, cs * SECTOR))
    rep.area_chunks = walk.area_chunks
    rep.mapping = dict(walk.records)
    rep.order = [new for _, new in walk.records]
    rep.exceptions = len(walk.records)
    rep.next_free = walk.next_free
    allocated, total, metadata = walk.usage()
    rep.usage = f"{allocated}/{total} {metadata}"
    rep.problems.extend(walk.problems)


def _check(rep: CowReport) -> None:
    order = rep.order
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
