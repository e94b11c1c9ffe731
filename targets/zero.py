"""zero: reads return zeros, writes and discards are dropped (dm-spec §2.2).

Read-ahead reads are killed, as the kernel does; flushes succeed without
reaching the target (0 flush bios).  Status is empty.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.errors import DmIOError, TargetArgError
from dmuser.core.target import Target, TargetContext


class ZeroTarget(Target):
    name = "zero"
    version = (1, 2, 0)
    num_discard_bios = 1

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        super().__init__(ti, args)
        if args:
            raise TargetArgError("No arguments required")

    async def map(self, bio: Bio) -> None:
        if bio.op is Op.READ:
            if bio.flags & ReqFlag.RAHEAD:
                raise DmIOError("zero: read-ahead read killed")
            assert bio.data is not None
            bio.data[:] = bytes(len(bio.data))
        elif bio.op not in (Op.WRITE, Op.DISCARD):
            raise DmIOError(f"zero: {bio.op.name} not supported")
        return None
