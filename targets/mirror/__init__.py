"""The mirror family (the kernel's ``dm-raid1.c``): N legs kept identical.

The interface the rest of dmuser uses is :class:`MirrorTarget`.

| module | what |
|---|---|
| ``target.py`` | ``mirror``: table parsing, status, life-cycle hooks |
| ``mirror_set.py`` | the mirror set: its daemon, reads, suspend and resume |
| ``writes.py`` | the write path and leg failures |
| ``inflight.py`` | the bios inside the mirror and the daemon's queues |
| ``legs.py`` | legs, their health and the default leg |
| ``resync.py`` | copying out-of-sync regions between legs |
| ``region_hash.py`` | per-region write state (``dm-region-hash.c``) |
| ``log/`` | dirty region logs: core (memory) and disk (the kernel's format) |

The protocol is written down in ``docs/mirror-protocol.md``.
"""

from dmuser.targets.mirror.target import MirrorTarget

__all__ = ["MirrorTarget"]
