"""Built-in targets, one per module.  Importing this package registers them all.

| module | kernel target |
|---|---|
| linear.py | linear |
| zero.py | zero |
| error.py | error |
| flakey.py | flakey |
| mirror.py (+ mirror_set, mirror_legs, mirror_resync, region_hash, dirtylog/) | mirror |
| snapshot_origin.py | snapshot-origin |
| snapshot.py (+ snapshot_core, snapshot_handover, snapshot_service, exstore/) | snapshot |
| snapshot_merge.py | snapshot-merge |
"""

from . import (
    error,
    flakey,
    linear,
    mirror,
    snapshot,
    snapshot_merge,
    snapshot_origin,
    zero,
)

__all__ = ["error", "flakey", "linear", "mirror", "snapshot", "snapshot_merge",
           "snapshot_origin", "zero"]
