"""The golden kernel vectors in ``tests/vectors`` (see its README.md) and their loaders.

The repository copy is the only source: a vector that is missing is an error,
never a skip.
"""

from __future__ import annotations

import json
import lzma
import re
import struct
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
SECTOR = 512


def load_manifest(name: str) -> dict[str, Any]:
    """The vector's manifest.json."""
    data: dict[str, Any] = json.loads((VECTORS / name / "manifest.json").read_text())
    return data


def steps_of(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every step of every boot, in order."""
    return [s for boot in manifest["boots"] for s in boot["steps"]]


def final_image(name: str, image: str) -> bytes:
    """The kernel's bytes of ``image`` (e.g. ``cow.img``) after the vector's teardown."""
    return lzma.decompress((VECTORS / name / f"{image}.xz").read_bytes())


def vector_pattern(seed: int, first_sector: int, nr_sectors: int) -> bytes:
    """The guest scripts' PATTERN(seed) for absolute sectors [first, first + nr):
    sector k holds 64 copies of le64 ``(seed * 1000003 + k) mod 2**64``.

    Not :func:`support.data.pattern`: this generator is fixed by what the kernel
    wrote (the manifests' hashes depend on it), and it repeats every 8 bytes
    within a sector, so a misplacement by a multiple of 8 bytes inside a sector
    would not show -- the other tests need pseudo-random bytes for that.
    """
    return b"".join(struct.pack("<Q", (seed * 1000003 + k) % 2**64) * 64
                    for k in range(first_sector, first_sector + nr_sectors))


def initial_image(image: dict[str, Any]) -> bytes:
    """An image's initial content as its manifest entry describes it: zeros, or
    ``PATTERN(seed=N)`` over the whole image."""
    size = image["size_bytes"]
    m = re.match(r"PATTERN\(seed=(\d+)\)", image["initial"])
    if m:
        return vector_pattern(int(m[1]), 0, size // SECTOR)
    assert image["initial"] == "zeros", image["initial"]
    return bytes(size)


def status_examples(target_type: str) -> list[dict[str, Any]]:
    """The ``statuses`` vector's examples of one target type (word 3 of the table)."""
    doc = json.loads((VECTORS / "statuses" / "statuses.json").read_text())
    return [e for e in doc["examples"] if str(e["table_given"]).split()[2] == target_type]


def parse_hexdump(text: str, nbytes: int) -> bytes:
    """Bytes from ``hexdump -C`` output, expanding ``*`` (repeats of the previous line)."""
    out = bytearray()
    prev = b""
    repeat = False
    for line in text.splitlines():
        if line.strip() == "*":
            repeat = True
            continue
        offset = int(line.split()[0], 16)
        if repeat:
            while len(out) < offset:
                out += prev
            repeat = False
        m = re.match(r"^[0-9a-f]{8}  ((?:[0-9a-f]{2} {1,2})+)", line)
        if m:
            prev = bytes.fromhex(m.group(1).replace(" ", ""))
            out += prev
    assert len(out) >= nbytes
    return bytes(out[:nbytes])


def hexdump_c(data: bytes) -> str:
    """``hexdump -C`` output of ``data`` (to compare with what the guest printed)."""
    out, prev, star = [], None, False
    for off in range(0, len(data), 16):
        line = data[off:off + 16]
        if line == prev:
            if not star:
                out.append("*")
                star = True
            continue
        prev, star = line, False
        hexes = "  ".join(" ".join(f"{b:02x}" for b in half) for half in (line[:8], line[8:]))
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in line)
        out.append(f"{off:08x}  {hexes:<48}  |{text}|")
    out.append(f"{len(data):08x}")
    return "\n".join(out) + "\n"
