"""Regenerate this vector: guest0.sh, run under ../shared/tools/kvm-dm, manifest.json, *.img.xz.

Run from the repository root: ``.venv/bin/python tests/vectors/log-writes/generate.py``.
Needs kvm-dm (QEMU + Debian's kernel); a few minutes under TCG.  Each step is
bracketed by ``@@BEGIN n`` / ``@@END n rc`` markers in the guest output.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOOL = HERE.parents[2].parent / "shared" / "tools" / "kvm-dm"
LW = "/dev/mapper/lw"

PRELUDE = """#!/bin/sh
# gdd = GNU dd (real O_DIRECT); /files/wN = PATTERN(N) for the sectors written
kerr() { dmesg | grep 'device-mapper: table' | tail -n1 | sed 's/^\\[[ 0-9.]*\\] //'; }
"""

#: (seed, first sector, nr_sectors) of each data write: the file /files/w<seed>
WRITES = {1: (8, 8), 2: (32, 16), 3: (200, 8), 4: (300, 4)}


def _write(seed: int, extra: str = "") -> str:
    sector, n = WRITES[seed]
    return (f"gdd if=/files/w{seed} of={LW} bs={n * 512} count=1 seek={sector * 512} "
            f"oflag=direct,seek_bytes{extra} status=none")


#: (action, command, note)
STEPS: list[tuple[str, str, str]] = [
    ("targets", "dmsetup targets | grep -E '^log-writes ' || { "
                "insmod /files/dm-log-writes-$(uname -r).ko; "
                "dmsetup targets | grep -E '^log-writes '; }",
     "target version (the initramfs lacks dm-log-writes: the host's module of the same kernel "
     "is loaded)"),
    ("create", "dmsetup create lw --table '0 8192 log-writes /dev/vda /dev/vdb'", "lw"),
    ("dmsetup table", "dmsetup table lw", "lw"),
    ("dmsetup status", "dmsetup status lw", "fresh: 0 entries, next sector 1"),
    ("write", f"{_write(1)}; dmsetup status lw", "w1: completed, not flushed: not logged"),
    ("write", f"{_write(2)} conv=fsync; dmsetup status lw",
     "w2 + fsync: w1, w2 and the flush are logged"),
    ("message", "dmsetup message lw 0 mark one; dmsetup status lw",
     "mark 'one' (writes the super)"),
    ("discard", "blkdiscard -o 65536 -l 8192 /dev/mapper/lw; echo rc=$?; dmsetup status lw",
     "discard of sectors 128..143: not logged until a flush"),
    ("write", f"{_write(3, ',dsync')}; dmsetup status lw",
     "w3 with O_DSYNC: a FUA write, logged at completion"),
    ("flush", f"gdd if=/dev/null of={LW} count=0 conv=notrunc,fsync status=none; "
              "dmsetup status lw", "fsync: the discard and the flush are logged"),
    ("write", f"{_write(4)}; dmsetup status lw", "w4: not flushed"),
    ("message", "dmsetup message lw 0 mark two; dmsetup status lw", "mark 'two'"),
    ("message", "dmsetup message lw 0 mark; echo rc=$?; dmsetup message lw 0 unmark x; "
                "echo rc=$?; dmsetup message lw 0 mark a b; echo rc=$?; "
                "dmesg | grep 'log-writes' | tail -n3 | sed 's/^\\[[ 0-9.]*\\] //'",
     "bad messages"),
    ("remove", "dmsetup remove lw; dmsetup ls",
     "remove: the unflushed w4 and a 'dm-log-writes-end' mark are logged"),
    ("hexdump", "gdd if=/dev/vdb bs=512 count=1 iflag=direct status=none | od -An -tx1 | head -n2",
     "the super block"),
    ("create", "dmsetup create b1 --table '0 8192 log-writes /dev/vda'; r=$?; "
               "[ $r = 0 ] || kerr; exit $r", "b1"),
    ("create", "dmsetup create b2 --table '0 8192 log-writes /dev/nonexistent /dev/vdb'; r=$?; "
               "[ $r = 0 ] || kerr; exit $r", "b2"),
    ("create", "dmsetup create b3 --table '0 8192 log-writes /dev/vda /dev/nonexistent'; r=$?; "
               "[ $r = 0 ] || kerr; exit $r", "b3"),
    ("create", "dmsetup create b4 --table '0 8192 log-writes /dev/vdc /dev/vdc extra'; "
               "r=$?; [ $r = 0 ] || kerr; dmsetup table b4; dmsetup remove b4; exit $r",
     "b4: extra words are ignored"),
]


def guest_script() -> str:
    out = [PRELUDE]
    for i, (_, cmd, _) in enumerate(STEPS):
        out.append(f'echo "@@BEGIN {i}"\n( {cmd}\n) > /tmp/o 2>&1; rc=$?\n'
                   f'cat /tmp/o; printf "\\n@@END {i} %s\\n" $rc\n')
    out.append("exit 0\n")
    return "".join(out)


def parse(stdout: str) -> list[dict[str, object]]:
    steps = []
    for i, (action, cmd, note) in enumerate(STEPS):
        m = re.search(rf"^@@BEGIN {i}\n(.*?)\n@@END {i} (\d+)$", stdout, re.S | re.M)
        assert m, f"step {i} missing"
        steps.append({"step": i, "action": action, "command": cmd, "note": note,
                      "output": m[1], "rc": int(m[2])})
    return steps


def pattern(seed: int, first: int, n: int) -> bytes:
    """support.vectors.vector_pattern (copied: this script runs without the tests)."""
    return b"".join(struct.pack("<Q", (seed * 1000003 + k) % 2**64) * 64
                    for k in range(first, first + n))


def main() -> None:
    script = guest_script()
    (HERE / "guest0.sh").write_text(script)
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "files"
        files.mkdir()
        for seed, (sector, n) in WRITES.items():
            (files / f"w{seed}").write_bytes(pattern(seed, sector, n))
        for ko in Path("/usr/lib/modules").glob("*/kernel/drivers/md/dm-log-writes.ko"):
            (files / f"dm-log-writes-{ko.parents[3].name}.ko").write_bytes(ko.read_bytes())
        images = []
        for name in ("a.img", "b.img", "c.img"):
            path = Path(tmp) / name
            with open(path, "wb") as f:
                f.truncate(4 << 20)
            images.append(path)
        res = subprocess.run([str(TOOL), str(HERE / "guest0.sh"), *map(str, images)],
                             capture_output=True, text=True, check=False,
                             env={**os.environ, "KVM_DM_FILES": str(files)})
        sys.stdout.write(res.stdout)
        sys.stderr.write(res.stderr[-2000:])
        for path in images[:2]:
            (HERE / f"{path.name}.xz").write_bytes(lzma.compress(path.read_bytes()))
    kernel = re.search(r"kernel ([^\s,]+)", res.stderr)
    manifest = {
        "name": "log-writes",
        "description": "log-writes: table/status strings, the ordering of logged writes "
                       "(flush, FUA, discard, marks), messages, constructor errors, and the "
                       "log device's bytes (b.img.xz)",
        "kernel": kernel[1] if kernel else "unknown",
        "oracle": "../shared/tools/kvm-dm (QEMU, virtio-blk raw images, cache=writeback)",
        "images": ["/dev/vda = a.img (4 MiB zeros): the data device",
                   "/dev/vdb = b.img (4 MiB zeros): the log device",
                   "/dev/vdc = c.img (4 MiB zeros): scratch for the b4 table (not kept)"],
        "writes": {f"w{s}": {"sector": sec, "nr_sectors": n, "pattern_seed": s}
                   for s, (sec, n) in WRITES.items()},
        "steps": parse(res.stdout),
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
