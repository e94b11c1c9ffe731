"""The built-in targets, imported as ``dmuser.targets``.

| module | kernel target |
|---|---|
| ``linear.py`` | linear |
| ``zero.py`` | zero |
| ``error.py`` | error |
| ``flakey.py`` | flakey |
| ``snapshot/`` | snapshot-origin, snapshot, snapshot-merge (``dm-snap.c``, exception stores) |
| ``mirror/`` | mirror (``dm-raid1.c``, region hash, dirty logs) |

Importing this package registers nothing: the daemon lists the target classes
it serves explicitly (``dmuser.daemon.builtin_targets``).  Targets may import
the core (``dmuser.core``), the copy services (``dmuser.services``) and the
on-disk formats (``dmuser.formats``); nothing below them imports a target.
"""
