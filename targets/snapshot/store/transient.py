"""The transient exception store "N" (the kernel's ``dm-snap-transient.c``).

Nothing is written to the COW device except the copied data: no header, no
records, so a transient snapshot does not survive a reload.  COW chunks are
handed out from chunk 0 upwards.  A commit completes at once (there is nothing
to make durable), with success = the copy succeeded.  There is no durable
invalidation and no merge support (dm-spec §3.9).
"""

from __future__ import annotations

from typing import Any

from dmuser.core.blockdev import BlockDevice
from dmuser.targets.snapshot.store.base import CowFullError, ExceptionStore


class TransientStore(ExceptionStore):
    type_name = "N"

    def __init__(self, cow: BlockDevice, origin: BlockDevice, chunk_size: int,
                 options: str) -> None:
        super().__init__(cow, origin, chunk_size, options)
        #: next free COW position, in sectors (changed only between checkpoints)
        self.next_free = 0

    def table_fragment(self) -> str:
        return f" N {self.chunk_size}"

    def prepare_exception(self) -> int:
        if self.cow.nr_sectors < self.next_free + self.chunk_size:
            raise CowFullError("snapshot COW device is full")
        new_chunk = self.next_free // self.chunk_size
        self.next_free += self.chunk_size
        return new_chunk

    async def commit_exception(self, old_chunk: int, new_chunk: int, valid: bool,
                               context: Any, hold: bool = False) -> list[tuple[Any, bool]]:
        return [(context, valid)]

    def usage(self) -> tuple[int, int, int]:
        return self.next_free, self.cow.nr_sectors, 0
