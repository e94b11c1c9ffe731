"""dmuser's persistent snapshot COW against the real kernel's dm-snapshot (kvm-dm).

1. dmuser -> kernel: the daemon takes a snapshot (origin suspended around it),
   writes to the origin (copy-outs, filling more than one metadata area) and to
   the snapshot (part of a chunk: copy, then write; whole chunks: the write is
   the copy), notes the sha256 of both device files and the snapshot status,
   and removes the devices cleanly.  The kernel, given the origin and the COW,
   must show the same snapshot content, the same status, and the origin
   unchanged; then it merges the COW back (``snapshot-merge`` taking over from
   the suspended snapshot) and the origin image must become the snapshot --
   which dmuser checks afterwards: an empty, valid COW.
2. kernel -> dmuser: the guest takes a snapshot and writes a known pattern to
   origin and snapshot with ``gdd oflag=direct``; dmuser loads the origin and
   the kernel's COW and must show the hashes and status the guest printed;
   then dmuser merges it and the origin equals the snapshot.

Both sides are also compared with a model computed here from the writes.
Two VM runs in all.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from support.daemon import Daemon, run_dmuser
from support.data import make_image, pattern, sha, write_at

MiB = 1 << 20
SECTOR = 512
SIZE = 8 * MiB
N = SIZE // SECTOR

pytestmark = [pytest.mark.kernel, pytest.mark.fuse, pytest.mark.slow,
              pytest.mark.timeout(int(os.environ.get("DMUSER_KVM_TEST_TIMEOUT", "1800")))]


def info(d: Daemon, name: str) -> str:
    return d.request("status", name=name)[name][0].split(" ", 3)[3]  # type: ignore[index]


def cow_report(path: Path) -> dict:  # type: ignore[type-arg]
    res = run_dmuser("cow", "check", str(path), "--json", check=False)
    assert res.returncode == 0, f"cow check {path}:\n{res.stdout}{res.stderr}"
    return json.loads(res.stdout)


def take_snapshot(d: Daemon, name: str, chunk: int) -> Path:
    d.cli("suspend", "origin")
    try:
        return d.create(name, f"0 {N} snapshot origin.img cow.img P {chunk}")
    finally:
        d.cli("resume", "origin")


def merge_back(d: Daemon, snap: str, chunk: int) -> None:
    """LVM's merge: the origin's table becomes snapshot-merge; the source is suspended."""
    d.cli("suspend", snap)
    d.cli("suspend", "origin")
    d.reload("origin", f"0 {N} snapshot-merge origin.img cow.img P {chunk}")
    d.cli("resume", "origin")
    d.cli("status", "origin", "--watch", "--until-complete", "--interval", "0.1", timeout=120)
    alloc, meta = info(d, "origin").split()
    assert alloc.split("/")[0] == meta, info(d, "origin")


#: guest helper: sha256 of a whole device read with O_DIRECT
HASH = r"""
h() { gdd if="$1" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1; }
waitmerge() {  # until allocated == metadata sectors
  i=0
  while [ $i -lt 1200 ]; do
    set -- $(dmsetup status "$1")
    [ "${4%%/*}" = "$5" ] && return 0
    sleep 0.1; i=$((i+1))
  done
  return 1
}
"""


# -- 1. dmuser writes, the kernel reads and merges ---------------------------------------

#: (device, byte offset, length, seed) in order; chunk 8 = 4 KiB, 256 records per area
DMUSER_WRITES = [
    ("origin", 0, 1280 * 1024, "d1"),            # 320 chunks: area 0 fills, area 1 starts
    ("snap", 2 * MiB + 512, 1536, "d2"),         # part of a chunk
    ("snap", 3 * MiB, 16384, "d3"),              # four whole chunks
    ("origin", 4 * MiB + 1000 * 512, 70 * 512, "d4"),  # unaligned, spanning chunks
    ("snap", 8192, 4096, "d5"),                  # a chunk already copied by the origin
    ("origin", 2 * MiB, 8192, "d6"),             # a chunk the snapshot wrote to
    ("origin", SIZE - 4096, 4096, "d7"),         # the last chunk
]

KERNEL_READS = HASH + f"""
dmsetup create snap --table "0 {N} snapshot /dev/vda /dev/vdb P 8"; echo "CREATE $?"
echo "STATUS $(dmsetup status snap)"
echo "TABLE $(dmsetup table snap)"
echo "SNAPHASH $(h /dev/mapper/snap)"
echo "ORIGINHASH $(h /dev/vda)"
dmsetup suspend snap
dmsetup create m --table "0 {N} snapshot-merge /dev/vda /dev/vdb P 8"; echo "MERGE $?"
waitmerge m; echo "MERGED $? $(dmsetup status m)"
echo "SNAPSTATUS $(dmsetup status snap)"
echo "MERGEHASH $(h /dev/mapper/m)"
dmsetup remove m; dmsetup remove snap
echo "ORIGINAFTER $(h /dev/vda)"
exit 0
"""


def test_dmuser_cow_read_and_merged_by_kernel(daemon: Daemon,  # type: ignore[no-untyped-def]
                                              kvm_dm) -> None:
    d = daemon
    base = make_image(d.dir / "origin.img", SIZE, seed="kern-origin")
    make_image(d.dir / "cow.img", 4 * MiB)
    origin = d.create("origin", f"0 {N} snapshot-origin origin.img")
    snap = take_snapshot(d, "snap", 8)
    model = {"origin": bytearray(base), "snap": bytearray(base)}
    for dev, off, n, seed in DMUSER_WRITES:
        data = pattern(seed, n)
        write_at(d.path(dev), off, data)
        model[dev][off:off + n] = data
    dm_snap, dm_origin, dm_status = sha(snap), sha(origin), info(d, "snap")
    assert dm_snap == hashlib.sha256(model["snap"]).hexdigest()
    assert dm_origin == hashlib.sha256(model["origin"]).hexdigest()
    d.cli("remove", "snap")
    d.cli("remove", "origin")
    rep = cow_report(d.dir / "cow.img")
    assert len(rep["area_chunks"]) == 2 and rep["usage"] == dm_status, rep

    res = kvm_dm(KERNEL_READS, [str(d.dir / "origin.img"), str(d.dir / "cow.img")])
    print(res.stdout)
    assert res.rc == 0, res.stderr
    assert res.marker("CREATE") == "0", res.stdout
    kernel_status = res.marker("STATUS").split(" ", 3)[3]
    print(f"dmuser status: {dm_status}; kernel status: {kernel_status}")
    assert kernel_status == dm_status
    assert res.marker("TABLE").endswith(" P 8")
    assert res.marker("SNAPHASH") == dm_snap
    assert res.marker("ORIGINHASH") == dm_origin
    # the kernel merged dmuser's COW: the origin is the snapshot now
    assert res.marker("MERGE") == "0", res.stdout
    merged = res.marker("MERGED").split()
    assert merged[0] == "0" and merged[4] == f"16/{4 * MiB // SECTOR}" and merged[5] == "16", \
        res.stdout
    assert res.marker("SNAPSTATUS").split()[3] == "Invalid"  # the handover source
    assert res.marker("MERGEHASH") == dm_snap
    assert res.marker("ORIGINAFTER") == dm_snap
    assert sha(d.dir / "origin.img") == dm_snap
    rep = cow_report(d.dir / "cow.img")
    assert rep["exceptions"] == 0 and rep["valid"] == 1 and rep["chunk_size"] == 8, rep
    # and dmuser reads the kernel-merged COW as an empty snapshot of the new origin
    d.create("origin", f"0 {N} snapshot-origin origin.img")
    snap = take_snapshot(d, "snap", 8)
    assert info(d, "snap") == f"16/{4 * MiB // SECTOR} 16"
    assert sha(snap) == dm_snap
    d.cli("remove", "snap")
    d.cli("remove", "origin")


# -- 2. the kernel writes, dmuser reads and merges ---------------------------------------

#: (device, sector, sectors) in order; chunk 16 = 8 KiB, 512 records per area
KERNEL_WRITES = [
    ("origin", 0, 10240),          # 5 MiB: 640 chunks, area 0 fills
    ("origin", 10245, 37),         # unaligned, spanning chunks
    ("snap", 12001, 3),            # part of a chunk
    ("snap", 12800, 32),           # two whole chunks
    ("snap", 100, 8),              # a chunk the origin already copied
    ("origin", 12000, 4),          # a chunk the snapshot wrote to
    ("origin", N - 16, 16),        # the last chunk
]


def _bs(sector: int, count: int) -> int:
    """The largest power-of-two block size (≤ 1 MiB) dividing offset and length."""
    bs = SECTOR
    while bs < MiB and (sector * SECTOR) % (bs * 2) == 0 and (count * SECTOR) % (bs * 2) == 0:
        bs *= 2
    return bs


def kernel_write_script() -> str:
    lines = [HASH,
             f'dmsetup create origin --table "0 {N} snapshot-origin /dev/vda"; echo "C1 $?"',
             "dmsetup suspend origin",
             f'dmsetup create snap --table "0 {N} snapshot /dev/vda /dev/vdb P 16"; echo "C2 $?"',
             "dmsetup resume origin"]
    for i, (dev, sector, count) in enumerate(KERNEL_WRITES):
        bs = _bs(sector, count)
        lines.append(f"gdd if=/files/w{i} of=/dev/mapper/{dev} bs={bs} "
                     f"seek={sector * SECTOR // bs} count={count * SECTOR // bs} "
                     f'oflag=direct status=none; echo "W{i} $?"')
    lines += ["sync",
              'echo "STATUS $(dmsetup status snap)"',
              'echo "SNAPHASH $(h /dev/mapper/snap)"',
              'echo "ORIGINHASH $(h /dev/mapper/origin)"',
              'dmsetup remove snap; echo "R1 $?"',
              'dmsetup remove origin; echo "R2 $?"',
              "exit 0"]
    return "\n".join(lines) + "\n"


def test_kernel_cow_read_and_merged_by_dmuser(daemon: Daemon,  # type: ignore[no-untyped-def]
                                              kvm_dm) -> None:
    d = daemon
    base = make_image(d.dir / "origin.img", SIZE, seed="kern2-origin")
    make_image(d.dir / "cow.img", 8 * MiB)
    files = {}
    model = {"origin": bytearray(base), "snap": bytearray(base)}
    for i, (dev, sector, count) in enumerate(KERNEL_WRITES):
        data = pattern(f"k{i}", count * SECTOR)
        files[f"w{i}"] = data
        model[dev][sector * SECTOR:(sector + count) * SECTOR] = data
    want_snap = hashlib.sha256(model["snap"]).hexdigest()
    want_origin = hashlib.sha256(model["origin"]).hexdigest()

    res = kvm_dm(kernel_write_script(), [str(d.dir / "origin.img"), str(d.dir / "cow.img")],
                 files)
    print(res.stdout)
    assert res.rc == 0, res.stderr
    for m in ["C1", "C2", "R1", "R2"] + [f"W{i}" for i in range(len(KERNEL_WRITES))]:
        assert res.marker(m) == "0", f"{m}:\n{res.stdout}"
    k_snap, k_origin = res.marker("SNAPHASH"), res.marker("ORIGINHASH")
    k_status = res.marker("STATUS").split(" ", 3)[3]
    assert (k_snap, k_origin) == (want_snap, want_origin), "the kernel against the model"
    assert sha(d.dir / "origin.img") == want_origin
    rep = cow_report(d.dir / "cow.img")
    assert rep["chunk_size"] == 16 and len(rep["area_chunks"]) == 2, rep
    assert rep["usage"] == k_status, (rep["usage"], k_status)

    # dmuser doing the same writes on copies of the same images writes the same COW,
    # byte for byte (chunks allocated in sector order, records in allocation order)
    make_image(d.dir / "origin2.img", SIZE, seed="kern2-origin")
    make_image(d.dir / "cow2.img", 8 * MiB)
    d.create("origin2", f"0 {N} snapshot-origin origin2.img")
    d.cli("suspend", "origin2")
    d.create("snap2", f"0 {N} snapshot origin2.img cow2.img P 16")
    d.cli("resume", "origin2")
    for i, (dev, sector, count) in enumerate(KERNEL_WRITES):
        bs = _bs(sector, count)
        for off in range(0, count * SECTOR, bs):  # the requests gdd made
            write_at(d.path(dev + "2"), sector * SECTOR + off, files[f"w{i}"][off:off + bs])
    assert info(d, "snap2") == k_status
    d.cli("remove", "snap2")
    d.cli("remove", "origin2")
    assert sha(d.dir / "origin2.img") == k_origin
    kcow, dcow = (d.dir / "cow.img").read_bytes(), (d.dir / "cow2.img").read_bytes()
    if kcow != dcow:
        first = next(i for i in range(len(kcow)) if kcow[i] != dcow[i])
        pytest.fail(f"COW bytes differ from the kernel's first at byte {first} "
                    f"(chunk {first // (16 * SECTOR)})")

    # dmuser loads the kernel's COW: snapshots first, then the origin (LVM's order)
    snap = d.create("snap", f"0 {N} snapshot origin.img cow.img P 16")
    origin = d.create("origin", f"0 {N} snapshot-origin origin.img")
    print(f"kernel status: {k_status}; dmuser status: {info(d, 'snap')}")
    assert info(d, "snap") == k_status
    assert sha(snap) == k_snap
    assert sha(origin) == k_origin
    merge_back(d, "snap", 16)
    assert info(d, "snap") == "Invalid"
    d.cli("resume", "snap")
    d.cli("remove", "snap")
    assert sha(origin) == k_snap
    assert sha(d.dir / "origin.img") == k_snap
    assert cow_report(d.dir / "cow.img")["exceptions"] == 0
    d.cli("remove", "origin")
