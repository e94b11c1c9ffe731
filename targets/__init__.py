"""Built-in targets, one per module.  Importing this package registers them all.

| module | kernel target |
|---|---|
| linear.py | linear |
| zero.py | zero |
| error.py | error |
| flakey.py | flakey |
| mirror.py (+ mirror_set, mirror_legs, mirror_resync, region_hash, dirtylog/) | mirror |
"""

from . import error, flakey, linear, mirror, zero

__all__ = ["error", "flakey", "linear", "mirror", "zero"]
