"""The snapshot family (the kernel's ``dm-snap.c``): three targets over one engine.

The interface the rest of dmuser uses is the three target classes below.

| module | what |
|---|---|
| ``origin.py`` | ``snapshot-origin``: the writable origin; its writes copy out first |
| ``snapshot.py`` | ``snapshot``: the point-in-time view |
| ``merge.py`` | ``snapshot-merge``: copies the exceptions back onto the origin |
| ``snap.py`` | one snapshot's state: pending exceptions, the ordered commit, invalidation |
| ``route.py`` | how a snapshot bio goes to the origin or the COW |
| ``registry.py`` | the origin registry: every snapshot of an origin, and origin-write copy-outs |
| ``exception_table.py`` | completed exceptions and chunks with I/O in flight |
| ``handover.py`` | exception handover between two tables on one COW |
| ``service.py`` | a snapshot's background work: its kcopyd client and tasks |
| ``store/`` | exception stores: persistent (the kernel's COW format) and transient |

The protocol is written down in ``docs/snapshot-protocol.md``.
"""

from dmuser.targets.snapshot.merge import SnapshotMergeTarget
from dmuser.targets.snapshot.origin import SnapshotOriginTarget
from dmuser.targets.snapshot.snapshot import SnapshotTarget

__all__ = ["SnapshotMergeTarget", "SnapshotOriginTarget", "SnapshotTarget"]
