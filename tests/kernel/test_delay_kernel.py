"""dmuser's ``delay`` against the real kernel's dm-delay (kvm-dm): one short VM run.

The guest builds a 9-word delay table, a malformed one, and a slow one (3 s for
every class); it prints the table and status lines, the kernel's ``ti->error``,
the per-class counts of held bios (a read; an fsync, i.e. an empty flush) and
how long a suspend takes with a read held (it must flush it at once).  The same
steps run in process against dmuser (trio's autojump clock) and must print the
same lines -- devices as ``MAJ:MIN`` in the kernel, as image paths in dmuser.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from support.targets import make_manager, remove_all_checked

from dmuser.control import dispatch
from dmuser.core.bio import Bio
from dmuser.core.errors import TableError

pytestmark = [pytest.mark.kernel,
              pytest.mark.timeout(int(os.environ.get("DMUSER_KVM_TEST_TIMEOUT", "1800")))]

S = 512
IMAGES = (("a.img", 16 << 20), ("b.img", 4 << 20), ("c.img", 4 << 20))
D9 = "0 4096 delay {a} 2048 10 {b} 0 20 {c} 8 0"
BAD = "0 4096 delay {a} 0 1 {b}"
SLOW = "0 8192 delay {a} 0 3000 {b} 0 3000 {c} 0 3000"
DEVS = {"a": "/dev/vda", "b": "/dev/vdb", "c": "/dev/vdc"}

GUEST = f"""
up() {{ cut -d' ' -f1 /proc/uptime | tr -d .; }}
dmsetup create d9 --table '{D9.format(**DEVS)}'
echo "TABLE $(dmsetup table d9)"
echo "STATUS $(dmsetup status d9)"
dmsetup create bad --table '{BAD.format(**DEVS)}' 2>/dev/null; echo "BADRC $?"
echo "BADERR $(dmesg | grep 'device-mapper: table' | tail -n1 | sed 's/^.*: delay: //')"
dmsetup create slow --table '{SLOW.format(**DEVS)}'
gdd if=/dev/mapper/slow of=/dev/null bs=4096 count=1 iflag=direct status=none &
sleep 1
echo "HELDREAD $(dmsetup status slow)"
t0=$(up); dmsetup suspend slow; t1=$(up)
echo "SUSPENDFAST $(( (t1 - t0) * 10 < 1500 ))"
echo "AFTERSUSPEND $(dmsetup status slow)"
wait; dmsetup resume slow
gdd if=/dev/null of=/dev/mapper/slow count=0 conv=notrunc,fsync status=none &
sleep 1
echo "HELDFLUSH $(dmsetup status slow)"
wait
dmsetup remove_all
exit 0
"""


async def dmuser_side(tmp: Path) -> dict[str, str]:
    paths = {key: str(tmp / name) for key, (name, _) in zip("abc", IMAGES, strict=True)}
    mgr = make_manager()
    out: dict[str, str] = {}

    async def run(verb: str, name: str) -> str:
        return str((await dispatch(mgr, {"verb": verb, "name": name})).output).rstrip("\n")

    async def create(name: str, table: str) -> None:
        await dispatch(mgr, {"verb": "create", "name": name, "table": table.format(**paths),
                             "cwd": str(tmp)})

    try:
        await create("d9", D9)
        out["TABLE"] = await run("table", "d9")
        out["STATUS"] = await run("status", "d9")
        try:
            await create("bad", BAD)
            out["BADRC"] = "0"
        except TableError as exc:
            out["BADRC"] = "1"
            out["BADERR"] = exc.message.split(": delay: ", 1)[1]
        await create("slow", SLOW)
        md = mgr.get("slow")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(md.read, 0, 8)
            await trio.sleep(1)
            out["HELDREAD"] = await run("status", "slow")
            t0 = trio.current_time()
            await md.suspend()
            out["SUSPENDFAST"] = str(int(trio.current_time() - t0 < 1.5))
            out["AFTERSUSPEND"] = await run("status", "slow")
        await md.resume()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(md.submit, Bio.flush())
            await trio.sleep(1)
            out["HELDFLUSH"] = await run("status", "slow")
    finally:
        await remove_all_checked(mgr)
    for key, path in paths.items():
        for k, v in out.items():
            out[k] = v.replace(path, {"a": "254:0", "b": "254:16", "c": "254:32"}[key])
    return out


async def test_delay_matches_kernel(tmp_path: Path, kvm_dm: Callable[..., object],
                                    autojump_clock: trio.abc.Clock) -> None:
    for name, size in IMAGES:
        with open(tmp_path / name, "wb") as f:
            f.truncate(size)
    result = kvm_dm(GUEST, [str(tmp_path / name) for name, _ in IMAGES])
    kernel = {key: result.marker(key) for key in  # type: ignore[attr-defined]
              ("TABLE", "STATUS", "BADRC", "BADERR", "HELDREAD", "SUSPENDFAST",
               "AFTERSUSPEND", "HELDFLUSH")}
    assert kernel["SUSPENDFAST"] == "1", result.stdout  # type: ignore[attr-defined]
    assert kernel["HELDREAD"].endswith(" delay 1 0 0"), kernel
    assert kernel["HELDFLUSH"].endswith(" delay 0 0 1"), kernel
    kernel["BADERR"] = kernel["BADERR"].removesuffix(" (-EINVAL)")
    assert await dmuser_side(tmp_path) == kernel
