"""dmuser's mirror disk log against the real kernel's dm-raid1 (kvm-dm).

1. dmuser -> kernel: dmuser leaves a log with known dirty regions and legs that
   differ exactly there (leg 1 is switched to ``error`` and then written: without
   handle_errors those writes succeed on leg 0 and their regions stay dirty), then
   the daemon is killed with SIGKILL.  The kernel, given the log and the legs,
   must resync exactly those regions: its first in-sync count equals
   ``regions - dirty`` (and equals what dmuser itself reports on a copy of the
   same images), and both implementations end with the same, identical legs.
2. kernel -> dmuser: the kernel is "crashed" (the VM powered off) with mirror
   writes in flight (leg 1's writes held by dm-delay), so its log has dirty
   regions; dmuser re-creating the mirror on those images resyncs exactly them.

To read an exact first in-sync count, the resync is held back at its first
copy: the mirror is created while its source leg (a linear device) is
suspended, in the guest as in dmuser.  Logs are decoded on the host with
``support/oracles.py`` (written from dm-spec §5.5, independent of
``dmuser.targets.mirror.log``).  (That a clean kernel-written log is read exactly is
a unit vector test: tests/unit/targets/mirror/test_kernel_vectors.py.)
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from support.daemon import Daemon, DaemonFactory
from support.data import make_image, pattern, read_at, sha, write_at
from support.oracles import MAGIC, differing_regions, read_disk_log
from support.system import wait_until

MiB = 1 << 20
SECTOR = 512
REGION_SECTORS = 1024
REGION = REGION_SECTORS * SECTOR  # 512 KiB
NR_REGIONS = 64
SIZE = NR_REGIONS * REGION  # 32 MiB
N = SIZE // SECTOR

pytestmark = [pytest.mark.kernel, pytest.mark.fuse, pytest.mark.slow,
              pytest.mark.timeout(int(os.environ.get("DMUSER_KVM_TEST_TIMEOUT", "1800")))]


def in_sync(status_line: str) -> tuple[int, int]:
    words = status_line.split()
    i = words.index("mirror")
    done, total = words[i + 2 + int(words[i + 1])].split("/")
    return int(done), int(total)


def dmuser_status(d: Daemon, name: str = "m") -> str:
    data = d.request("status", name=name)
    assert isinstance(data, dict)
    return data[name][0]


def dmuser_recreate(d: Daemon, log: Path, l0: Path, l1: Path) -> int:
    """Legs L0/L1 and the default-mode mirror m, created while L0 (the resync source)
    is suspended: the first in-sync count is the log's clean count.  Resyncs to the
    end, removes everything; returns that first count."""
    d.create("L0", f"0 {N} linear {l0} 0")
    d.create("L1", f"0 {N} linear {l1} 0")
    d.request("suspend", name="L0")
    d.create("m", f"0 {N} mirror disk 2 {log} {REGION_SECTORS} 2 L0 0 L1 0")
    first, total = in_sync(dmuser_status(d))
    assert total == NR_REGIONS
    d.request("resume", name="L0")
    wait_until(lambda: in_sync(dmuser_status(d))[0] == NR_REGIONS, 60, what="dmuser in sync")
    for name in ("m", "L0", "L1"):
        d.request("remove", name=name)
    return first


@pytest.fixture
def daemon_dir(make_daemon: DaemonFactory):  # type: ignore[no-untyped-def]
    d = make_daemon("d")
    yield d
    d.unstack()  # resumes a leg a failed test left suspended (it would hold the shutdown)


# -- dmuser -> kernel --------------------------------------------------------------------

KERNEL_RESYNC = f"""
N={N}
# leg 0 (the resync source) is a linear device, suspended while the mirror is created:
# the first copy waits at its door, so the status read right after the creation shows
# exactly what the log said
dmsetup create d0 --table "0 $N linear /dev/vdb 0"; echo "D0 $?"
dmsetup suspend d0
dmsetup create m --table \\
  "0 $N mirror disk 2 /dev/vda {REGION_SECTORS} 2 /dev/mapper/d0 0 /dev/vdc 0"
echo "CREATE $?"
echo "FIRST $(dmsetup status m)"
sleep 1
echo "HELD $(dmsetup status m)"
dmsetup resume d0
i=0
while [ $i -lt 1200 ]; do
  r=$(insync m); [ "${{r%/*}}" = "${{r#*/}}" ] && break
  sleep 0.05; i=$((i+1))
done
echo "FINAL $(dmsetup status m)"
dmsetup remove m; echo "REMOVE $?"
dmsetup remove d0
hashdev /dev/vdb /dev/vdc
exit 0
"""

#: (byte offset, length) of the writes made while leg 1 is dead: region 0, a write
#: straddling regions 7/8, region 33, the last sector (region 63)
DEAD_LEG_WRITES = [(4096, 8192), (8 * REGION - 2048, 4096), (33 * REGION + 12345, 70000),
                   (SIZE - 512, 512)]
DEAD_LEG_DIRTY = [0, 7, 8, 33, 63]


def test_kernel_resyncs_exactly_the_regions_dmuser_left_dirty(daemon_dir: Daemon, kvm_dm,
                                                              tmp_path: Path) -> None:
    d = daemon_dir
    log, l0, l1 = d.dir / "log.img", d.dir / "l0.img", d.dir / "l1.img"
    make_image(log, 1 * MiB)
    make_image(l0, SIZE, seed="k-leg")
    make_image(l1, SIZE, seed="k-leg")  # identical legs: `nosync`
    d.create("L0", f"0 {N} linear {l0} 0")
    d.create("L1", f"0 {N} linear {l1} 0")
    dev = d.create("m", f"0 {N} mirror disk 3 {log} {REGION_SECTORS} nosync 2 L0 0 L1 0")
    for r in (2, 40):  # both legs alive: these regions are clean again afterwards
        write_at(dev, r * REGION + 1000, pattern(f"ok{r}", 30000))
    wait_until(lambda: read_disk_log(log, NR_REGIONS).dirty == [], 20, what="a clean log")
    d.request("reload", name="L1", table=f"0 {N} error")
    d.request("resume", name="L1")
    for i, (off, length) in enumerate(DEAD_LEG_WRITES):
        write_at(dev, off, pattern(f"dead{i}", length))  # succeeds: no handle_errors
    wait_until(lambda: read_disk_log(log, NR_REGIONS).dirty == DEAD_LEG_DIRTY, 20,
               what=f"regions {DEAD_LEG_DIRTY} dirty in the log")
    d.signal(signal.SIGKILL)
    d.wait()

    hdr = read_disk_log(log, NR_REGIONS)
    assert (hdr.magic, hdr.version, hdr.nr_regions) == (MAGIC, 2, NR_REGIONS), hdr
    assert hdr.dirty == DEAD_LEG_DIRTY
    assert differing_regions(l0, l1, REGION, NR_REGIONS) == DEAD_LEG_DIRTY
    want = sha(l0)  # both resyncs copy leg 0 onto leg 1

    # dmuser's own view of the same images, on copies
    copies = tmp_path / "copies"
    copies.mkdir()
    for img in (log, l0, l1):
        shutil.copyfile(img, copies / img.name)
    d.start()
    dmuser_first = dmuser_recreate(d, copies / "log.img", copies / "l0.img", copies / "l1.img")
    assert sha(copies / "l1.img") == want
    assert read_disk_log(copies / "log.img", NR_REGIONS).dirty == []

    res = kvm_dm(KERNEL_RESYNC, [str(log), str(l0), str(l1)])
    print(res.stdout)
    assert res.rc == 0, res.stderr
    assert res.marker("D0") == "0" and res.marker("CREATE") == "0", res.stdout
    kernel_first, total = in_sync(res.marker("FIRST"))
    assert total == NR_REGIONS
    assert in_sync(res.marker("HELD"))[0] == kernel_first  # the resync was really held
    assert kernel_first == NR_REGIONS - len(DEAD_LEG_DIRTY) == dmuser_first, \
        (kernel_first, dmuser_first, res.stdout)
    final = res.marker("FINAL").split()
    assert in_sync(res.marker("FINAL")) == (NR_REGIONS, NR_REGIONS), res.stdout
    assert final[-5:] == ["AA", "3", "disk", final[-2], "A"], final
    assert res.marker("REMOVE") == "0"
    shas = dict(line.split() for line in res.markers("SHA"))
    assert shas == {"/dev/vdb": want, "/dev/vdc": want}, (shas, want)
    # on the host: identical legs, the kernel's log all clean
    assert sha(l1) == want and sha(l0) == want
    hdr = read_disk_log(log, NR_REGIONS)
    assert (hdr.magic, hdr.version, hdr.nr_regions, hdr.dirty) == (MAGIC, 2, NR_REGIONS, [])
    print(f"dirty regions left by dmuser: {DEAD_LEG_DIRTY}; first in-sync: kernel "
          f"{kernel_first}/{NR_REGIONS}, dmuser {dmuser_first}/{NR_REGIONS}")


# -- kernel -> dmuser --------------------------------------------------------------------

#: (region-relative name, byte offset) of the writes in flight at the kernel's "crash"
KERNEL_WRITES = [("w5", 5 * REGION + 8192), ("w20", 21 * REGION - 2048), ("w61", 61 * REGION)]
KERNEL_DIRTY = [5, 20, 21, 61]


def kernel_crash_script() -> str:
    writes = "\n".join(
        f"gdd if=/files/{name} of=/dev/mapper/m bs=4096 count=1 seek={off} "
        f"oflag=direct,seek_bytes conv=notrunc status=none &"
        for name, off in KERNEL_WRITES)
    return f"""
N={N}
# leg 1 behind dm-delay holding its writes for 10 minutes: the writes stay in flight.
# Flushes (the third group) are not delayed: the mirror flushes every leg before the
# log write that follows the first resume (it sets clean bits) -- a held flush would
# stop kmirrord before the writes are even marked.
dmsetup create d1 --table "0 $N delay /dev/vdc 0 0 /dev/vdc 0 600000 /dev/vdc 0 0"
echo "D1 $?"
dmsetup create m --table \
  "0 $N mirror disk 3 /dev/vda {REGION_SECTORS} nosync 2 /dev/vdb 0 /dev/mapper/d1 0"
echo "CREATE $?"
{writes}
sleep 3
echo "STATUS $(dmsetup status m)"
bits=$(gdd if=/dev/vda bs=512 skip=2 count=1 iflag=direct status=none | od -An -tx1 -N8)
echo "LOGBITS $(echo $bits | tr -d ' ')"
# no teardown: the VM powers off with the writes in flight (a crash)
exit 0
"""


def test_dmuser_resyncs_exactly_the_regions_the_kernel_left_dirty(daemon_dir: Daemon, kvm_dm
                                                                  ) -> None:
    d = daemon_dir
    log, l0, l1 = d.dir / "log.img", d.dir / "l0.img", d.dir / "l1.img"
    make_image(log, 1 * MiB)
    make_image(l0, SIZE, seed="kk-leg")
    make_image(l1, SIZE, seed="kk-leg")
    files = {name: pattern(name, 4096) for name, _ in KERNEL_WRITES}
    res = kvm_dm(kernel_crash_script(), [str(log), str(l0), str(l1)], files)
    print(res.stdout)
    assert res.rc == 0, res.stderr
    assert res.marker("D1") == "0" and res.marker("CREATE") == "0", res.stdout
    assert in_sync(res.marker("STATUS")) == (NR_REGIONS, NR_REGIONS)  # no failure, just held

    hdr = read_disk_log(log, NR_REGIONS)
    assert (hdr.magic, hdr.version, hdr.nr_regions) == (MAGIC, 2, NR_REGIONS), hdr
    assert hdr.dirty == KERNEL_DIRTY, hdr.dirty
    bits = int.from_bytes(bytes.fromhex(res.marker("LOGBITS")), "little")
    assert [r for r in range(NR_REGIONS) if not bits >> r & 1] == KERNEL_DIRTY
    # leg 0 took the writes, leg 1 not
    assert differing_regions(l0, l1, REGION, NR_REGIONS) == KERNEL_DIRTY
    for name, off in KERNEL_WRITES:
        assert read_at(l0, off, 4096) == files[name]
    want = sha(l0)

    first = dmuser_recreate(d, log, l0, l1)
    assert first == NR_REGIONS - len(KERNEL_DIRTY), first
    assert sha(l1) == want == sha(l0)
    assert read_disk_log(log, NR_REGIONS).dirty == []
    print(f"dirty regions left by the kernel: {KERNEL_DIRTY}; dmuser first in-sync "
          f"{first}/{NR_REGIONS}")
