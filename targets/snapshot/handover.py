"""Snapshot registration and exception handover (dm-spec §4.1, §4.9).

Every snapshot registers under its origin device when constructed (inactive)
and leaves when destroyed.  Two snapshots may share a COW device only as a
handover pair: an **active** source and an **inactive** destination (a second
table loaded on the same COW, e.g. snapshot-merge for LVM's ``--merge``).  The
destination reads no metadata; when it resumes it takes the source's store and
completed exceptions, and the source becomes invalid.

The core destroys a device's old table only after the new table's resume
hooks ran, as the kernel's ``do_resume`` does, so a handover between the old
and new table of the same device happens at resume like any other.  (If the
suspended source of the same device is destroyed first, the handover is
completed then instead of being cancelled; with the current core that path is
a fallback only.)

Atomicity: the swap itself has no checkpoint; it waits first until the source
has no pending exception, so no copy-out is in flight across it.
"""

from __future__ import annotations

import logging

from dmuser.core.errors import TargetArgError
from dmuser.targets.snapshot.registry import drop_origin_if_unused, get_origin, lookup_origin
from dmuser.targets.snapshot.snap import Snapshot

log = logging.getLogger(__name__)


def find_sharing_cow(snap: Snapshot) -> tuple[int, Snapshot | None,
                                                    Snapshot | None,
                                                    Snapshot | None]:
    """``__find_snapshots_sharing_cow``: (count, active source, inactive dest, merging)."""
    origin = lookup_origin(snap.origin)
    count, src, dest, merging = 0, None, None, None
    for s in origin.snapshots if origin else []:
        if s.is_merge:
            merging = s
        if s.cow is not snap.cow:
            continue
        if s.active:
            src = s
        else:
            dest = s
        count += 1
    return count, src, dest, merging


def register_snapshot(snap: Snapshot) -> None:
    """Validate a possible handover, then add ``snap`` (inactive) to its origin."""
    count, src, dest, merging = find_sharing_cow(snap)
    if count == 2 or dest is not None:
        raise TargetArgError("Snapshot cow pairing for exception table handover failed")
    if src is not None:
        if snap.is_merge:
            if merging is not None:
                raise TargetArgError("A snapshot is already merging.")
            if not src.store.supports_merge:
                raise TargetArgError("Snapshot exception store does not support snapshot-merge.")
        snap.handover_pending = True
    get_origin(snap.origin).insert(snap)


async def unregister_snapshot(snap: Snapshot) -> None:
    """Destructor side: finish or cancel a pending handover, then leave the origin."""
    origin = lookup_origin(snap.origin)
    if origin is None or snap not in origin.snapshots:
        return
    _, src, dest, _ = find_sharing_cow(snap)
    if src is snap and dest is not None:
        if dest.md_name == snap.md_name and snap.suspended:
            await take_over(dest)
        else:
            dest.valid = False
            log.error("Cancelling snapshot handover.")
    origin.snapshots.remove(snap)
    drop_origin_if_unused(origin)


def check_preresume(snap: Snapshot) -> None:
    """``snapshot_preresume``: refuse to resume either side of an unfinished handover."""
    _, src, dest, _ = find_sharing_cow(snap)
    if src is None or dest is None:
        return
    if snap is src:
        raise TargetArgError("Unable to resume snapshot source until handover completes.")
    if not src.suspended:
        raise TargetArgError("Unable to perform snapshot handover until source is suspended.")


async def take_over(dest: Snapshot) -> None:
    """``__handover_exceptions``: move the source's store and exceptions to ``dest``."""
    _, src, _, _ = find_sharing_cow(dest)
    if src is None or not dest.handover_pending:
        dest.handover_pending = False
        return
    while src.pending:
        await src.commit_all()
    # -- no checkpoint from here on --
    dest.complete.swap(src.complete)
    own_store, dest.store, src.store = dest.store, src.store, dest.store
    dest.store.overflow_ok = own_store.overflow_ok
    dest.valid, dest.overflowed = src.valid, src.overflowed
    src.valid = False
    dest.handover_pending = False
    origin = get_origin(dest.origin)
    if dest in origin.snapshots:
        origin.snapshots.remove(dest)
    origin.insert(dest)
    dest.active = True
    log.info("%s: took over the exceptions of %s", dest.md_name, src.md_name)
