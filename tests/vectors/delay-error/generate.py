"""Regenerate this vector: guest0.sh, run under ../shared/tools/kvm-dm, manifest.json.

Run from the repository root: ``.venv/bin/python tests/vectors/delay-error/generate.py``.
Needs kvm-dm (QEMU + Debian's kernel); it takes a minute or two under TCG.
Each step is bracketed by ``@@BEGIN n`` / ``@@END n rc`` markers in the guest output.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOOL = HERE.parents[2].parent / "shared" / "tools" / "kvm-dm"

PRELUDE = """#!/bin/sh
# helpers; gdd = GNU dd (real O_DIRECT)
up() { cut -d' ' -f1 /proc/uptime; }   # seconds since boot, 10 ms resolution
ms_since() { echo "$(( ($(up | tr -d .) - $(echo "$1" | tr -d .)) * 10 ))"; }
kerr() { dmesg | grep 'device-mapper: table' | tail -n1 | sed 's/^\\[[ 0-9.]*\\] //'; }
"""

#: (action, command, note)
STEPS: list[tuple[str, str, str]] = [
    ("devices", 'for d in /sys/block/vd*; do echo "/dev/${d##*/} $(cat $d/dev) $(cat $d/size) '
                'sectors"; done', "guest block devices"),
    ("targets", "dmsetup targets | grep -E '^(error|delay) '", "target versions"),
]

ERROR_TABLES = [
    ("e0", "0 8192 error"),
    ("e2", "0 8192 error /dev/vda 0"),
    ("e2x", "0 8192 error /dev/vda x"),
    ("e2n", "0 8192 error /dev/nonexistent 0"),
    ("e3", "0 8192 error a b c"),
]
DELAY_TABLES = [
    ("d3", "0 8192 delay /dev/vda 0 100"),
    ("d6", "0 4096 delay /dev/vda 0 0 /dev/vdb 16 50"),
    ("d6big", "0 8192 delay /dev/vda 0 0 /dev/vdb 16 50"),
    ("d9", "0 4096 delay /dev/vda 2048 10 /dev/vdb 0 20 /dev/vdc 8 0"),
    ("d9z", "0 4096 delay /dev/vda 0 0 /dev/vdb 0 0 /dev/vdc 0 0"),
    ("b1", "0 8192 delay /dev/vda 0"),
    ("b4", "0 8192 delay /dev/vda 0 1 /dev/vdb"),
    ("b7", "0 8192 delay /dev/vda 0 1 /dev/vdb 0 1 /dev/vdc"),
    ("b10", "0 8192 delay /dev/vda 0 1 /dev/vdb 0 1 /dev/vdc 0 1 x"),
    ("bo", "0 8192 delay /dev/vda x 1"),
    ("bo2", "0 8192 delay /dev/vda -1 1"),
    ("bd", "0 8192 delay /dev/vda 0 x"),
    ("bd2", "0 8192 delay /dev/vda 0 4294967296"),
    ("bd3", "0 8192 delay /dev/vda 0 4294967295"),
    ("bn", "0 8192 delay /dev/nonexistent 0 1"),
    ("bn2", "0 8192 delay /dev/nonexistent x 1"),
    ("bw", "0 8192 delay /dev/vda 0 1 /dev/vdb y 1"),
    ("bwd", "0 8192 delay /dev/vda 0 1 /dev/vdb 0 -5"),
    ("bf", "0 8192 delay /dev/vda 0 1 /dev/vdb 0 1 /dev/nonexistent 0 1"),
    ("bs", "0 8192 delay /dev/vda 30000 1"),
]
for name, table in ERROR_TABLES + DELAY_TABLES:
    STEPS.append(("create", f"dmsetup create {name} --table '{table}'; r=$?; "
                            f"[ $r = 0 ] || kerr; exit $r", name))
    STEPS.append(("dmsetup table", f"dmsetup table {name}", name))
    STEPS.append(("dmsetup status", f"dmsetup status {name}", name))

# routing: d6 reads vda+0 (no delay), writes to vdb+16 (50 ms)
STEPS += [
    ("io", "printf 'delay-vector-sector-0001' > /tmp/p; gdd if=/dev/zero bs=488 count=1 "
           "status=none >> /tmp/p; gdd if=/tmp/p of=/dev/mapper/d6 bs=512 count=1 seek=3 "
           "oflag=direct status=none; gdd if=/dev/vdb bs=512 skip=19 count=1 iflag=direct "
           "status=none | head -c 24; echo; gdd if=/dev/vda bs=512 skip=3 count=1 iflag=direct "
           "status=none | head -c 24 | od -An -c | head -n1", "d6: write sector 3 lands on "
                                                              "vdb sector 19, vda unchanged"),
    ("io", "gdd if=/dev/mapper/d6 bs=512 skip=3 count=1 iflag=direct status=none | head -c 24 "
           "| od -An -c | head -n1", "d6: read of sector 3 comes from vda"),
    ("io", "gdd if=/dev/vda bs=512 skip=19 count=1 of=/tmp/a iflag=direct status=none; "
           "gdd if=/dev/mapper/d6 bs=512 skip=19 count=1 of=/tmp/b iflag=direct status=none; "
           "cmp /tmp/a /tmp/b && echo same", "d6: read of sector 19 = vda sector 19"),
    # held bios are counted per class; a suspend flushes them at once
    ("create", "dmsetup create slow --table '0 8192 delay /dev/vda 0 3000 /dev/vdb 0 3000 "
               "/dev/vdc 0 3000'", "slow"),
    ("held", "gdd if=/dev/mapper/slow of=/dev/null bs=4096 count=1 iflag=direct status=none & "
             "sleep 1; dmsetup status slow; wait", "one read held: status counts it"),
    ("held", "blkdiscard -o 0 -l 4096 /dev/mapper/slow & sleep 1; dmsetup status slow; wait; "
             "echo discard rc=$?", "a discard is held in the write class"),
    ("held", "gdd if=/dev/zero of=/dev/mapper/slow bs=4096 count=1 oflag=direct status=none & "
             "sleep 1; dmsetup status slow; wait", "a write is held in the write class"),
    ("held", "gdd if=/dev/null of=/dev/mapper/slow count=0 conv=notrunc,fsync status=none & "
             "sleep 1; dmsetup status slow; wait",
     "an fsync (empty flush) is held in the flush class"),
    ("suspend", "gdd if=/dev/mapper/slow of=/dev/null bs=4096 count=1 iflag=direct status=none "
                "& sleep 1; dmsetup status slow; t0=$(up); dmsetup suspend slow; "
                "echo suspend_ms=$(ms_since $t0); dmsetup status slow; wait; echo read done; "
                "dmsetup info -c --noheadings -o attr slow", "suspend flushes held bios"),
    ("suspended-io", "t0=$(up); gdd if=/dev/mapper/slow of=/dev/null bs=4096 count=1 "
                     "iflag=direct status=none & sleep 1; dmsetup resume slow; wait; "
                     "echo after_resume_ms=$(ms_since $t0); dmsetup status slow",
     "a read issued while suspended waits for resume, then is delayed again"),
    ("timing", "t0=$(up); gdd if=/dev/mapper/d3 of=/dev/null bs=512 count=1 iflag=direct "
               "status=none; ms=$(ms_since $t0); [ $ms -ge 100 ] && echo read_took_at_least_100ms",
     "d3: a read takes at least its 100 ms"),
    ("message", "dmsetup message d3 0 hello", "delay has no messages"),
    ("remove", "for d in $(dmsetup ls | cut -f1); do dmsetup remove $d; done; dmsetup ls",
     "teardown"),
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


def main() -> None:
    script = guest_script()
    (HERE / "guest0.sh").write_text(script)
    with tempfile.TemporaryDirectory() as tmp:
        images = []
        for name, mib in (("a.img", 16), ("b.img", 4), ("c.img", 4)):
            path = Path(tmp) / name
            with open(path, "wb") as f:
                f.truncate(mib << 20)
            images.append(str(path))
        res = subprocess.run([str(TOOL), str(HERE / "guest0.sh"), *images],
                             capture_output=True, text=True, check=False)
    sys.stderr.write(res.stderr[-2000:])
    kernel = re.search(r"kernel ([^\s,]+)", res.stderr)
    manifest = {
        "name": "delay-error",
        "description": "error and delay targets: table/status strings, constructor error texts "
                       "(ti->error from dmesg), routing, held-bio counters, suspend flushing",
        "kernel": kernel[1] if kernel else "unknown",
        "oracle": "../shared/tools/kvm-dm (QEMU, virtio-blk raw images, cache=writeback)",
        "images": ["/dev/vda = a.img (16 MiB zeros)", "/dev/vdb = b.img (4 MiB zeros)",
                   "/dev/vdc = c.img (4 MiB zeros)"],
        "steps": parse(res.stdout),
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
