"""The exception store protocol (the kernel's ``dm-exception-store.h``).

An exception store remembers which origin chunks have been copied ("exceptions")
and where their copies live on the COW device.  The types (``persistent.py``,
``transient.py``) and the table syntax are in ``__init__.py``.

Contract between a store and the snapshot target (what each side guarantees):

* :meth:`ExceptionStore.prepare_exception` is synchronous (no checkpoint), so a
  caller can look up, allocate and record a pending exception atomically.  It
  hands out COW chunks in strictly increasing order, or raises
  :class:`CowFullError` (ENOSPC) when the COW is full.
* The caller commits exceptions **in the order they were prepared**, one call
  at a time (calls never overlap).  :meth:`ExceptionStore.commit_exception`
  returns the contexts of every exception that became durable (or failed) with
  this call, each with its success flag; a persistent store may return ``[]``
  and hand a context back from a later call (group commit, dm-spec §3.5).
  A returned success means the copied data *and* the metadata naming it are on
  stable storage.  With ``hold=True`` the store may keep the context until a
  later :meth:`ExceptionStore.commit_held` (deferred group commit); a store
  with nothing to make durable ignores ``hold``.
* ``read_metadata``, ``prepare_merge``, ``commit_merge`` and ``drop_snapshot``
  are only called while no commit is running.
"""

from __future__ import annotations

import errno as _errno
import logging
from collections.abc import Callable
from typing import Any, ClassVar

from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmError, TargetArgError

log = logging.getLogger(__name__)

#: INT_MAX >> SECTOR_SHIFT: the largest chunk size the kernel accepts.
MAX_CHUNK_SECTORS = ((1 << 31) - 1) >> 9
U32_MAX = (1 << 32) - 1

#: ``add_exception(old_chunk, new_chunk)``: how read_metadata reports each exception.
AddExceptionFn = Callable[[int, int], None]


class StoreArgError(TargetArgError):
    """Store construction failed; ``message`` is the store's own ``ti->error``."""


class StoreError(DmError):
    """Metadata could not be read, or is not a snapshot store we understand."""


class CowFullError(DmError):
    """prepare_exception: no COW chunk is left (the kernel's -ENOSPC)."""

    errno = _errno.ENOSPC


def logical_block_sectors(dev: BlockDevice) -> int:
    """The device's logical block size in sectors (512-byte blocks unless it says so)."""
    return max(1, int(getattr(dev, "logical_block_size", 512)) >> 9)


def check_chunk_size(chunk_size: int, cow: BlockDevice, origin: BlockDevice) -> None:
    """``dm_exception_store_set_chunk_size``: the three checks, in kernel order."""
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise StoreArgError("Chunk size is not a power of 2")
    if chunk_size % logical_block_sectors(cow) or chunk_size % logical_block_sectors(origin):
        raise StoreArgError("Chunk size is not a multiple of device blocksize")
    if chunk_size > MAX_CHUNK_SECTORS:
        raise StoreArgError("Chunk size is too high")


class ExceptionStore:
    """Base of the exception store types (the kernel's ``dm_exception_store_type``).

    Attributes:
        cow: the COW device.
        origin: the origin device (only its block size matters to a store).
        options: the type word minus its first letter.
    """

    type_name: ClassVar[str]
    #: True when prepare_merge / commit_merge are implemented (snapshot-merge needs them).
    supports_merge: ClassVar[bool] = False
    #: "userspace supports overflow" (``PO``): a full COW fails snapshot writes with
    #: ``Overflow`` instead of invalidating the snapshot.
    overflow_ok: bool = False

    def __init__(self, cow: BlockDevice, origin: BlockDevice, chunk_size: int,
                 options: str) -> None:
        self.cow = cow
        self.origin = origin
        self.options = options
        self.chunk_size = chunk_size

    @property
    def chunk_size(self) -> int:
        """Chunk size in sectors; 0 until known ("not set")."""
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int) -> None:
        self._chunk_size = value
        self.chunk_mask = max(value - 1, 0)
        self.chunk_shift = value.bit_length() - 1 if value else 0

    def table_fragment(self) -> str:
        """The store's part of the TABLE status, with its leading space: `` P 8``."""
        return f" {self.type_name} {self.chunk_size}"

    async def read_metadata(self, add_exception: AddExceptionFn) -> bool:
        """Load the store; report each committed exception through ``add_exception``.

        Returns False when the store is marked invalid.  Raises :class:`StoreError`
        on unreadable or foreign metadata.
        """
        return True

    def prepare_exception(self) -> int:
        """Allocate a COW chunk for a new exception; CowFullError when full.  Never blocks."""
        raise NotImplementedError

    async def commit_exception(self, old_chunk: int, new_chunk: int, valid: bool,
                               context: Any, hold: bool = False) -> list[tuple[Any, bool]]:
        """Record a finished copy; see the module docstring for ordering and batching.

        ``hold``: the caller will end the batch itself (:meth:`commit_held`);
        a store may then keep the record's context until that call."""
        raise NotImplementedError

    def hold_nowait(self, old_chunk: int, new_chunk: int, context: Any) -> bool:
        """:meth:`commit_exception` of a valid copy with ``hold``, if the store can
        keep the record without any I/O or completion; False (nothing recorded)
        otherwise.  Never blocks: the caller commits without a checkpoint."""
        return False

    @property
    def held(self) -> int:
        """Contexts kept by commits with ``hold`` that :meth:`commit_held` would return
        now (0: nothing to do, or a later commit will end the batch)."""
        return 0

    async def commit_held(self) -> list[tuple[Any, bool]]:
        """Make every held record durable now; returns their contexts as commit does."""
        return []

    async def prepare_merge(self) -> tuple[int, int, int]:
        """``(n, last_old, last_new)``: the next run of exceptions to merge (n = 0: done)."""
        raise StoreError("exception store does not support merging")

    async def commit_merge(self, nr_merged: int) -> None:
        """Forget the last ``nr_merged`` exceptions durably (after their data was merged)."""
        raise StoreError("exception store does not support merging")

    async def drop_snapshot(self) -> None:
        """Invalidate the store, durably if it can (kernel: optional method)."""

    def usage(self) -> tuple[int, int, int]:
        """``(sectors_allocated, total_sectors, metadata_sectors)`` for the status line."""
        raise NotImplementedError
