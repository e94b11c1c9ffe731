"""Part two: a 2-leg mirror with a disk log, a leg failing under a writer, repair, resync.

README, "A mirror, a failed leg, and a resync", with an ext4 and a writer on
top.  The legs are dmuser ``linear`` devices, so that one can fail live: its
table is switched to ``error``.  The mirror has ``handle_errors keep_log``: a
write that fails on a leg completes on the other one and its region is marked
out of sync in the log, so the writer never stops; after the repair the same
mirror table is reloaded and the log's out-of-sync regions are copied again.
"""

from __future__ import annotations

import time

from dmuser.demo.files import Writer
from dmuser.demo.fsops import close_tree, fsck, open_tree
from dmuser.demo.session import DemoFailed, Session, health, in_sync, wait_for

LEG_MIB = 64
REGION = 128             # sectors: 64 KiB regions
WARMUP_FILES = 8
DEGRADED_SECONDS = 4.0


def _status(s: Session, name: str) -> list[str]:
    return s.verb("status", name).split()


def run(s: Session) -> None:
    nr = LEG_MIB << 11
    mirror = f"0 {nr} mirror disk 2 log.img {REGION} 2 leg0 0 leg1 0 2 handle_errors keep_log"

    s.step("a 2-leg mirror with a disk log, and its first resync")
    s.image(LEG_MIB, "leg0.img", "leg1.img")
    s.image(1, "log.img")
    s.note("the legs are dmuser devices too, so that one can be failed live")
    s.create("leg0", f"0 {nr} linear leg0.img 0")
    s.create("leg1", f"0 {nr} linear leg1.img 0")
    s.create("m", mirror)
    s.note(f"a fresh log: every region is copied from leg0 to leg1; the daemon runs with "
           f"--resync-throttle {s.throttle} (resync I/O in flight {s.throttle}% of the time, "
           f"dm-raid1's raid1_resync_throttle) so that the bar can be watched")
    s.watch("m")
    words = _status(s, "m")
    done, total = in_sync(words)
    s.check(health(words) == "AA" and done == total, f"both legs in sync ({done}/{total}, AA)")

    s.step("a leg fails under a running writer")
    s.sh("mkfs.ext4", "-q", "-b", "4096", "-E", "nodiscard", "dev/m",
         kernel="kernel dm: mkfs.ext4 -q -b 4096 -E nodiscard /dev/mapper/m")
    tree = open_tree(s, "m", "mnt/mirror")
    writer = Writer(tree)
    s.writer = writer
    writer.start()
    s.note(f"a writer writes 1 MiB files into {tree.where} without a break, each one "
           f"flushed to the device before the next")
    wait_for(lambda: writer.count >= WARMUP_FILES or not writer.is_alive(), 60, "the writer")
    s.note(f"writer: {writer.count} files so far; now leg1 fails (its table becomes 'error')")
    s.reload("leg1", f"0 {nr} error")
    s.verb("resume", "leg1")
    wait_for(lambda: health(s.status_words("m"))[1] == "D" or not writer.is_alive(), 30,
             "the mirror to notice the failed leg")
    words = _status(s, "m")
    s.check(health(words) == "AD", "the status shows leg1 dead (health AD)", " ".join(words))
    time.sleep(DEGRADED_SECONDS)
    s.check(writer.error is None, f"the writer goes on ({writer.count} files so far): its "
                                  f"writes land on leg0 alone", repr(writer.error))
    words = _status(s, "m")
    done, total = in_sync(words)
    s.check(done < total, f"{total - done} of {total} regions, written since, are out of sync")

    s.step("repair the leg and resync, the writer still running")
    s.reload("leg1", f"0 {nr} linear leg1.img 0")
    s.verb("resume", "leg1")
    s.note("the mirror's table reloaded as it was: its log names the regions to copy")
    s.reload("m", mirror)
    s.verb("resume", "m")
    s.watch("m")
    writer.stop()
    writer.join(60)
    if writer.is_alive():
        raise DemoFailed("the writer did not stop within 60 s")
    s.writer = None
    s.check(writer.error is None, f"the writer wrote {writer.count} files without an error",
            repr(writer.error))
    words = _status(s, "m")
    done, total = in_sync(words)
    s.check(health(words) == "AA" and done == total,
            f"both legs healthy and in sync again ({done}/{total}, AA)")

    s.step("check the mirror")
    close_tree(s, tree)
    fsck(s, "m")
    s.sh("cmp", "-n", str(nr * 512), "dev/leg0", "dev/leg1", check=False,
         kernel=f"kernel dm: cmp -n {nr * 512} /dev/mapper/leg0 /dev/mapper/leg1")
    s.check(s.last_status == 0, f"the legs are identical over the mirrored {LEG_MIB} MiB")
    tree = open_tree(s, "m", "mnt/mirror", ro=True)
    now = tree.scan()
    bad = sorted(name for name, sha in writer.sums.items()
                 if name not in now or now[name].sha != sha)
    s.check(not bad, f"the {len(writer.sums)} files the writer left read back intact "
                     f"(sha256)", ", ".join(bad))
    close_tree(s, tree)
    for name in ("m", "leg0", "leg1"):
        s.verb("remove", name)
