"""Table words to devices: ``dm_get_device`` for the tables of one daemon.

Split from ``manager.py`` so that the namespace (create, remove, the deferred
remove) and the rules that turn a word of a table into a device are each one
module.  A word resolves to:

* ``MAJ:MIN`` — the real block device with that number.
* a word without ``/`` that names a mapped device — that device (stacking is
  resolved here, in process: dmuser never opens its own FUSE files).
* a path whose directory is the mountpoint — the mapped device of that name.
* with ``serve --block-devices``: ``/dev/mapper/NAME`` of a mapped device, or
  the path or ``MAJ:MIN`` of a mapped device's loop device — that mapped
  device, in process (I/O through the loop device would come back to the
  daemon through its own FUSE file).
* any other path — an image file or block device, relative paths taken from
  the client's working directory.
* ``nbd[s]://host[:port]/export`` or ``nbd[s]+unix:///export?socket=PATH`` — a
  remote NBD export (``nbd_device.py``).  Each such word gets a connection of its
  own, made (asynchronously, :func:`connect_nbd`) before the table's
  constructors run, because resolution itself is synchronous; a reload
  therefore reconnects.

Guarantees: a mapped device handed out has its ``holders`` count raised (the
manager's ``release`` lowers it), which blocks its removal; a table may not
refer to its own device, directly or through the devices it stacks on
(:class:`TableError`); no path under the mountpoint is ever ``stat``-ed (that
would be a FUSE request to the daemon itself).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable

import trio

from dmuser.core.blockdev import BlockDevice, FileDevice
from dmuser.core.errors import NoSuchDeviceError, TableError
from dmuser.core.hostdev import block_device_node
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.mapper_links import MAPPER_DIR
from dmuser.core.nbd_device import NbdDevice
from dmuser.core.nbd_wire import is_nbd_uri, parse_uri

_MAJ_MIN = re.compile(r"^(\d+):(\d+)$")


def depends_on(md: MappedDevice, target: MappedDevice) -> bool:
    """True if ``md`` is ``target`` or stacks on it, through live or inactive tables."""
    if md is target:
        return True
    for table in (md.live, md.inactive):
        for dev in table.devices() if table else ():
            if isinstance(dev, MappedDevice) and depends_on(dev, target):
                return True
    return False


class WordResolver:
    """The ``get_device`` of one table build for ``for_device``: call it with a word.

    ``devices`` is the daemon's namespace (read, never changed); ``block_devices``
    says whether mapped devices have loop devices; ``open_backing`` opens (and
    shares) an image file or block device; ``nbd`` holds the connections
    :func:`connect_nbd` made for the table's NBD words, one per occurrence.
    """

    def __init__(self, devices: dict[str, MappedDevice], *, mountpoint: str,
                 block_devices: bool, open_backing: Callable[[str], FileDevice], cwd: str,
                 for_device: MappedDevice, nbd: dict[str, list[NbdDevice]] | None) -> None:
        self._devices = devices
        self._mountpoint = mountpoint
        self._block_devices = block_devices
        self._open_backing = open_backing
        self._cwd = cwd
        self._for = for_device
        self._nbd = nbd

    def __call__(self, word: str) -> BlockDevice:
        if is_nbd_uri(word):
            if not self._nbd or not self._nbd.get(word):
                raise NoSuchDeviceError(f"{word}: not connected")
            return self._nbd[word].pop()
        if _MAJ_MIN.match(word):
            own = self._mapped_by_block(word)
            if own is None:
                node = block_device_node(word)
                if node is None:
                    raise NoSuchDeviceError(f"no block device {word}")
                return self._open_backing(node)
            dev = self._lookup_mapped(own.name)
        elif "/" not in word and word in self._devices:
            dev = self._lookup_mapped(word)
        else:
            path = os.path.normpath(os.path.join(self._cwd, word))
            if self._mountpoint and os.path.dirname(path) == self._mountpoint:
                dev = self._lookup_mapped(os.path.basename(path))
            elif (own := self._mapped_by_block(word)) is not None:
                dev = self._lookup_mapped(own.name)
            else:
                return self._open_backing(path)
        dev.holders += 1
        return dev

    def _lookup_mapped(self, name: str) -> MappedDevice:
        md = self._devices.get(name)
        if md is None:
            raise NoSuchDeviceError(f"Device {name} does not exist.")
        if depends_on(md, self._for):
            raise TableError(f"{name}: a table cannot use its own device "
                             f"(directly or through stacked devices)")
        return md

    def _mapped_by_block(self, word: str) -> MappedDevice | None:
        """The mapped device whose block device ``word`` names (``/dev/mapper/NAME``,
        its loop device's path or ``MAJ:MIN``), or None.  Never for paths under
        the mountpoint (a stat there would be a FUSE request to ourselves)."""
        if not self._block_devices:
            return None
        if _MAJ_MIN.match(word):
            devno = word
        else:
            path = os.path.normpath(os.path.join(self._cwd, word))
            md = self._devices.get(os.path.basename(path))
            if os.path.dirname(path) == MAPPER_DIR and md is not None and md.block_device:
                return md
            try:
                st = os.stat(path)
            except OSError:
                return None
            if not stat.S_ISBLK(st.st_mode):
                return None
            devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return next((md for md in self._devices.values() if md.block_devno == devno), None)


async def connect_nbd(words: list[str], cwd: str, nursery: trio.Nursery,
                      timeout: float) -> dict[str, list[NbdDevice]]:
    """One NBD connection per occurrence of each word; all or nothing (a failure
    closes the connections already made and raises)."""
    made: dict[str, list[NbdDevice]] = {}
    try:
        for word in words:
            dev = await NbdDevice.connect(parse_uri(word, cwd), nursery, timeout)
            made.setdefault(word, []).append(dev)
    except BaseException:
        for devs in made.values():
            for dev in devs:
                dev.close()
        raise
    return made
