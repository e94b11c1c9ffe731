"""Byte-addressed reads and writes on a mapped device, for its FUSE file and its NBD exports.

Block devices move whole sectors; files and NBD clients may ask for any byte
range.  Both doors come through here, so they share one rule and one lock:

* A read is widened to whole sectors and the requested slice returned.
* A write that does not start and end on a sector boundary reads its partial
  edge sectors, merges and writes whole sectors.  Every write holds the
  sectors it touches in the device's :class:`RangeLock` (one per device, for
  every door), so a read-modify-write can never interleave with another write
  to the same sector, whichever door that write came through, and undo it.
* An aligned write may take the device's direct path (``write_direct``: one
  inline ``pwrite``, never yielding) when its range is free at that moment.

The lock lives as long as the device object (a weak mapping), and waiting for
it is a cancellation point; a cancelled writer holds nothing.
"""

from __future__ import annotations

import weakref

from dmuser.core.bio import Bio, ReqFlag
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.units import SECTOR_SHIFT, SECTOR_SIZE
from dmuser.rangelock import RangeLock

_LOCKS: weakref.WeakKeyDictionary[MappedDevice, RangeLock] = weakref.WeakKeyDictionary()


def range_lock(md: MappedDevice) -> RangeLock:
    """The device's write lock on sector ranges, shared by every door."""
    lock = _LOCKS.get(md)
    if lock is None:
        lock = _LOCKS[md] = RangeLock()
    return lock


async def read_bytes(md: MappedDevice, off: int, nbytes: int) -> bytearray | memoryview:
    """``nbytes`` from byte ``off`` (the caller keeps the range inside the device)."""
    first = off >> SECTOR_SHIFT
    last = (off + nbytes + SECTOR_SIZE - 1) >> SECTOR_SHIFT
    buf = bytearray((last - first) << SECTOR_SHIFT)
    if buf:
        await md.submit(Bio.read(first, buf))
    skip = off - (first << SECTOR_SHIFT)
    if skip == 0 and len(buf) == nbytes:
        return buf
    return memoryview(buf)[skip : skip + nbytes]


async def write_bytes(md: MappedDevice, off: int, data: bytes | bytearray | memoryview,
                      flags: ReqFlag = ReqFlag.NONE, *, direct: bool = False) -> None:
    """Write ``data`` at byte ``off`` (inside the device), under the device's range lock.

    With ``direct``, a plain aligned write is first offered to the direct path.
    """
    end = off + len(data)
    first = off >> SECTOR_SHIFT
    last = (end + SECTOR_SIZE - 1) >> SECTOR_SHIFT
    aligned = (off | end) & (SECTOR_SIZE - 1) == 0
    lock = range_lock(md)
    # write_direct() never yields, so an aligned write it completes cannot
    # interleave with a read-modify-write: it only has to find the range free.
    if direct and aligned and not flags and lock.is_free(first, last) \
            and md.write_direct(first, data):
        return
    async with lock.hold(first, last):
        if aligned:
            await md.submit(Bio.write(first, data, flags))
            return
        merged = memoryview(bytearray((last - first) << SECTOR_SHIFT))
        await md.submit(Bio.read(first, merged[:SECTOR_SIZE]))
        if last - 1 > first:
            await md.submit(Bio.read(last - 1, merged[-SECTOR_SIZE:]))
        skip = off - (first << SECTOR_SHIFT)
        merged[skip : skip + len(data)] = data
        await md.submit(Bio.write(first, merged, flags))
