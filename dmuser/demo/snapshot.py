"""Part one: ext4 on a snapshot-origin device, a snapshot, changes, and a merge back.

The snapshot is taken as LVM's ``lvcreate --snapshot`` does it (file system
frozen, origin suspended, snapshot created, origin reloaded as
``snapshot-origin``, resumed), and merged back as ``lvconvert --merge`` does it
(the origin's table becomes ``snapshot-merge`` on the snapshot's COW, then
``linear`` once the merge is done): README, "A snapshot, changes, and a merge
back".  The changes include a file rewritten in place at scattered 4 KiB
blocks, for a while: every such block is an exception of its own, which the
merge copies back and commits one step at a time -- long enough to watch.
"""

from __future__ import annotations

import random
import time

from dmuser.demo.files import BLOCK, file_sha, pattern, sha256, sums
from dmuser.demo.fsops import close_tree, frozen, fsck, open_tree, show_files
from dmuser.demo.session import Session, cow_exceptions

ORIGIN_MIB = 128
COW_MIB = 96
CHUNK = 8            # sectors: 4 KiB chunks, LVM's default
DB_MIB = 32
UPDATE_SECONDS = 5.0

HELLO_V1 = b"version 1: written before the snapshot\n"
HELLO_V2 = b"version 2: written after the snapshot\n"


def v1_files() -> dict[str, bytes]:
    return {"hello.txt": HELLO_V1,
            "notes/todo.txt": b"take a snapshot\nchange things\nmerge it back\n",
            "photo.jpg": pattern("photo", 3 << 20),
            "db.bin": pattern("db", DB_MIB << 20)}


def run(s: Session) -> None:
    nr = ORIGIN_MIB << 11
    s.step("ext4 on a snapshot-origin device")
    s.image(ORIGIN_MIB, "origin.img")
    s.image(COW_MIB, "cow.img")
    s.create("base", f"0 {nr} snapshot-origin origin.img")
    s.sh("mkfs.ext4", "-q", "-b", "4096", "-E", "nodiscard", "dev/base",
         kernel="kernel dm: mkfs.ext4 -q -b 4096 -E nodiscard /dev/mapper/base")
    origin = open_tree(s, "base", "mnt/origin")
    v1 = v1_files()
    v1_sums = {name: sha256(data) for name, data in v1.items()}
    s.note(f"writing {len(v1)} files into {origin.where}")
    origin.write(v1)
    show_files(s, "the origin", origin.scan())

    s.step("take a snapshot, the LVM way")
    s.note("lvcreate --snapshot: freeze, suspend the origin, create the snapshot, reload the "
           "origin as snapshot-origin (ours is one already: the same table), resume, thaw")
    with frozen(s, origin):
        s.verb("suspend", "base")
        s.create("snap", f"0 {nr} snapshot origin.img cow.img P {CHUNK}")
        s.reload("base", f"0 {nr} snapshot-origin origin.img")
        s.verb("resume", "base")
    s.verb("table")
    s.verb("status", "snap")

    s.step("change the files on the origin")
    s.note("rewrite hello.txt, delete notes/todo.txt, add new.bin, and rewrite db.bin in "
           f"place at random 4 KiB blocks for {UPDATE_SECONDS:.0f} s; the first write to "
           "each chunk copies its old content to the COW first")
    new = pattern("new", 2 << 20)
    origin.write({"hello.txt": HELLO_V2, "new.bin": new})
    origin.remove(["notes/todo.txt"])
    blocks = list(range(0, (DB_MIB << 20) // BLOCK, 2))
    random.Random("db-updates").shuffle(blocks)
    n = origin.update_blocks("db.bin", ((b, pattern(f"db-{b}", BLOCK)) for b in blocks),
                             time.monotonic() + UPDATE_SECONDS)
    db = bytearray(v1["db.bin"])
    for b in blocks[:n]:
        db[b * BLOCK:(b + 1) * BLOCK] = pattern(f"db-{b}", BLOCK)
    s.note(f"db.bin: {n} scattered blocks rewritten")
    v2_sums = {**v1_sums, "hello.txt": sha256(HELLO_V2), "new.bin": sha256(new),
               "db.bin": sha256(bytes(db))}
    del v2_sums["notes/todo.txt"]
    now = origin.scan()
    show_files(s, "the origin now", now)
    s.check(sums(now) == v2_sums, "the origin has the new files (sha256 of every file)")
    out = s.verb("status", "snap")
    s.note("<COW sectors in use>/<COW sectors> <metadata sectors>")
    s.check("/" in out, "the snapshot is valid: its COW holds the old content of every "
                        "changed chunk", out.strip())

    s.step("the snapshot still shows the old files")
    fsck(s, "snap")
    snap = open_tree(s, "snap", "mnt/snap", ro=True)
    old = snap.scan()
    show_files(s, "the snapshot", old)
    s.check(sums(old) == v1_sums, "the snapshot has the files as they were when it was taken")
    close_tree(s, snap)
    snap_sha = file_sha(s.path("dev/snap"))

    s.step("merge the snapshot back into the origin")
    s.note("lvconvert --merge" + ("; the origin is unmounted first (LVM would defer the merge "
                                  "of an open origin to its next activation)" if s.loop else ""))
    close_tree(s, origin)
    s.verb("suspend", "snap")
    s.verb("suspend", "base")
    s.reload("base", f"0 {nr} snapshot-merge origin.img cow.img P {CHUNK}")
    s.verb("resume", "base")
    s.verb("remove", "snap")
    s.note("the merge copies the COW's chunks back to the origin, one committed step per run "
           "of adjacent chunks; scattered chunks make it take a while:")
    s.watch("base")
    words = s.verb("status", "base").split()
    used, meta = words[3].split("/")[0], words[4] if len(words) > 4 else "?"
    s.check(words[2] == "snapshot-merge" and used == meta,
            "the merge is complete (COW sectors in use = metadata sectors)", " ".join(words))
    s.reload("base", f"0 {nr} linear origin.img 0")
    s.verb("resume", "base")
    out = s.dm("cow", "inspect", "cow.img",
               kernel="(no dmsetup equivalent: dmuser decodes a COW device offline)")
    s.check(cow_exceptions(out) == 0, "the COW holds no exceptions any more")
    s.check(file_sha(s.path("dev/base")) == snap_sha,
            "the origin device now equals the snapshot, byte for byte (sha256)")
    fsck(s, "base")
    origin = open_tree(s, "base", "mnt/origin", ro=True)
    now = origin.scan()
    show_files(s, "the origin after the merge", now)
    s.check(sums(now) == v1_sums, "the origin has the snapshot's files again")
    close_tree(s, origin)
    s.verb("remove", "base")
