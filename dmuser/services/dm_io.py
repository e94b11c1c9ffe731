"""dm-io: I/O to one or more regions of block devices (the kernel's ``dm-io.c``).

A request (op, flags, memory, optional notify function) goes to up to
:data:`MAX_REGIONS` regions.  Mirror writes each bio to every leg with it;
kcopyd does all its reads and writes with it.

Guarantees:

* **Same data everywhere.**  A write to several regions writes the same bytes
  (from the start of the memory) to each region, concurrently.
* **Errors.**  Device errors never raise: bit ``i`` of the error bitset is set
  when any bio of ``regions[i]`` failed or its device does not support the op
  (DISCARD, SECURE_ERASE, WRITE_ZEROES).  Misuse raises :class:`ValueError`
  before any I/O: a READ with several regions (the kernel WARNs and returns
  -EIO; we prefer a loud error), > 64 regions, memory shorter than a region,
  a read into read-only memory.  Failed reads are zero-filled in the memory.
* **No ordering** between the bios of one call, nor between regions.
* **Concurrency** (dmuser).  Bios whose device runs them inline
  (``BlockDevice.runs_inline``: small plain READ/WRITE on a file) are
  submitted one after the other in the calling task, the others concurrently,
  one task each.
* **Splitting.**  Data regions become bios of at most :data:`MAX_BIO_SECTORS`
  (1 MiB = BIO_MAX_VECS pages); DISCARD / WRITE_ZEROES / SECURE_ERASE are one
  data-less bio per region.  A count-0 region is skipped unless the request has
  PREFLUSH; then its device gets one empty flush (WRITE|PREFLUSH), whatever the
  op.  Flags are copied onto every bio; the synchronous form adds REQ_SYNC.
* **Copies.**  A bio lying in one memory segment uses a slice of it (zero
  copy); one spanning segments costs one gather copy (writes, shared by all
  regions) or one scatter copy (reads).
* **Bounded memory.**  Every bio holds ``max(1, pages)`` pages of its client's
  reservation while in flight and waits (FIFO) while it is exhausted; a bio
  larger than the whole reservation proceeds alone.
* **Cancellation.**  Cancelling a synchronous call cancels its bios not yet
  submitted and raises ``Cancelled``; bios inside a device are finished by it
  (``blockdev`` never abandons a started write).  The asynchronous form runs in
  the client's nursery: it is cancelled only with the client, and then
  ``notify_fn`` is not called.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import trio

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError
from dmuser.core.units import SECTOR_SHIFT, pages_for
from dmuser.services.dm_io_mem import (
    BufferMem,
    DmIoMem,
    PageListMem,
    PagePool,
    PoolStatistics,
    VecMem,
)

#: DM_IO_MAX_REGIONS = BITS_PER_LONG.
MAX_REGIONS = 64
#: Largest data bio: BIO_MAX_VECS (256) pages of 4 KiB.
MAX_BIO_SECTORS = 2048
#: Default reservation: 16 full-sized bios in flight (the kernel's MIN_BIOS x BIO_MAX_VECS).
DEFAULT_RESERVED_PAGES = 16 * 256

#: ``notify_fn(error_bits, context)``; may return an awaitable, which is awaited.
NotifyFn = Callable[[int, Any], "Awaitable[None] | None"]

_SPECIAL_OPS = (Op.DISCARD, Op.SECURE_ERASE, Op.WRITE_ZEROES)


@dataclass(frozen=True, slots=True)
class Region:
    """``count`` sectors of ``dev`` starting at ``sector`` (the kernel's dm_io_region)."""

    dev: BlockDevice
    sector: int
    count: int

    def __post_init__(self) -> None:
        if self.sector < 0 or self.count < 0:
            raise ValueError(f"bad region {self.sector}+{self.count}")


__all__ = ["MAX_BIO_SECTORS", "MAX_REGIONS", "BufferMem", "DmIoClient", "DmIoMem",
           "DmIoRegionError", "IoRequest", "PageListMem", "PagePool", "PoolStatistics", "Region",
           "VecMem", "dm_io", "dm_io_sync", "dm_io_wait"]


@dataclass(frozen=True, slots=True)
class IoRequest:
    """A dm-io request: synchronous when ``notify_fn`` is None.

    ``mem`` may be None for DISCARD, WRITE_ZEROES and SECURE_ERASE and for
    requests whose regions all have count 0.
    """

    op: Op
    flags: ReqFlag
    mem: DmIoMem | None
    notify_fn: NotifyFn | None = None
    context: Any = None


class DmIoClient:
    """Owner of a page reservation and of a nursery for asynchronous requests.

    Synchronous requests only need the reservation; asynchronous ones need the
    client entered (``async with DmIoClient() as client``).  Leaving the block
    waits for all asynchronous I/O, including I/O started by notify functions.
    """

    def __init__(self, reserved_pages: int = DEFAULT_RESERVED_PAGES) -> None:
        self.pool = PagePool(reserved_pages)
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None

    def get(self, nr_pages: int) -> None:
        """Grow the reservation (the old kernel's dm_io_get)."""
        self.pool.grow(nr_pages)

    def put(self, nr_pages: int) -> None:
        """Shrink the reservation (dm_io_put); I/O in flight is not disturbed."""
        self.pool.shrink(nr_pages)

    def statistics(self) -> PoolStatistics:
        return self.pool.statistics()

    async def __aenter__(self) -> DmIoClient:
        if self._stack is not None:
            raise RuntimeError("DmIoClient entered twice")
        self._stack = AsyncExitStack()
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._stack is not None
        try:
            return await self._stack.__aexit__(exc_type, exc, tb)
        finally:
            self._nursery = self._stack = None

    def start(self, req: IoRequest, regions: list[Region]) -> None:
        if self._nursery is None:
            raise RuntimeError("asynchronous dm_io needs an entered DmIoClient")
        self._nursery.start_soon(self._run_async, req, regions)

    async def _run_async(self, req: IoRequest, regions: list[Region]) -> None:
        bits = await self.execute(req, regions, req.flags)
        assert req.notify_fn is not None
        result = req.notify_fn(bits, req.context)
        if inspect.isawaitable(result):
            await result

    async def execute(self, req: IoRequest, regions: list[Region], flags: ReqFlag) -> int:
        """Split, submit and wait for every bio; return the error bitset."""
        work: list[tuple[int, BlockDevice, Bio, int | None]] = []
        written: dict[tuple[int, int], memoryview] = {}
        error_bits = 0
        for i, region in enumerate(regions):
            if region.count == 0 and not flags & ReqFlag.PREFLUSH:
                continue
            if not _supported(req.op, region.dev):
                error_bits |= 1 << i
            elif region.count == 0:
                work.append((i, region.dev, Bio(Op.WRITE, region.sector, 0, None, flags), None))
            elif req.op in _SPECIAL_OPS:
                work.append((i, region.dev, Bio(req.op, region.sector, region.count, None, flags),
                             None))
            else:
                for rel in range(0, region.count, MAX_BIO_SECTORS):
                    n = min(MAX_BIO_SECTORS, region.count - rel)
                    off, nbytes = rel << SECTOR_SHIFT, n << SECTOR_SHIFT
                    assert req.mem is not None
                    scatter_at: int | None = None
                    if req.op is Op.READ:
                        data, direct = req.mem.read_view(off, nbytes)
                        scatter_at = None if direct else off
                    else:
                        key = (off, nbytes)
                        if key not in written:
                            written[key] = req.mem.gather(off, nbytes)
                        data = written[key]
                    bio = Bio(req.op, region.sector + rel, n, data, flags)
                    work.append((i, region.dev, bio, scatter_at))

        failed = [error_bits]

        async def one(i: int, dev: BlockDevice, bio: Bio, scatter_at: int | None) -> None:
            pages = max(1, pages_for(bio.nr_sectors))
            if not self.pool.try_acquire(pages):
                await self.pool.acquire(pages)
            try:
                try:
                    await dev.submit(bio)
                except DmIOError:
                    failed[0] |= 1 << i
                    if bio.op is Op.READ and bio.data is not None:
                        bio.data[:] = bytes(len(bio.data))
                if scatter_at is not None:
                    assert req.mem is not None and bio.data is not None
                    req.mem.scatter(scatter_at, bio.data)
            finally:
                self.pool.release(pages)

        if not work:
            await trio.lowlevel.checkpoint()
            return failed[0]
        if len(work) == 1:
            await one(*work[0])
            return failed[0]
        waiting = [item for item in work if not item[1].runs_inline(item[2])]
        for item in work:  # bios that cannot wait: one after the other, no task each
            if item[1].runs_inline(item[2]):
                await one(*item)
        if len(waiting) == 1:
            await one(*waiting[0])
        elif waiting:
            async with trio.open_nursery() as nursery:
                for item in waiting:
                    nursery.start_soon(one, *item)
        return failed[0]


def _supported(op: Op, dev: BlockDevice) -> bool:
    if op in (Op.DISCARD, Op.SECURE_ERASE):
        return dev.supports_discard
    if op is Op.WRITE_ZEROES:
        return dev.supports_write_zeroes
    return True


def _validate(req: IoRequest, regions: Sequence[Region]) -> None:
    if len(regions) > MAX_REGIONS:
        raise ValueError(f"{len(regions)} regions: dm-io takes at most {MAX_REGIONS}")
    if req.op not in (Op.READ, Op.WRITE, *_SPECIAL_OPS):
        raise ValueError(f"dm-io cannot do {req.op.name}; flush with WRITE|PREFLUSH, count 0")
    if req.op is Op.READ and len(regions) > 1:
        raise ValueError("a dm-io READ takes exactly one region")
    if not req.op.has_data:
        return
    need = max((r.count for r in regions), default=0) << SECTOR_SHIFT
    if need and (req.mem is None or req.mem.nbytes < need):
        have = 0 if req.mem is None else req.mem.nbytes
        raise ValueError(f"memory of {have} bytes is shorter than the region ({need} bytes)")
    if need and req.op is Op.READ and req.mem is not None and req.mem.readonly:
        raise ValueError("cannot read into read-only memory")


async def dm_io(client: DmIoClient, req: IoRequest, regions: Sequence[Region]) -> int:
    """Run ``req`` on ``regions``, the kernel's ``dm_io()``.

    Synchronous form (``req.notify_fn`` None): adds REQ_SYNC, waits for every
    bio and returns the error bitset (bit i = ``regions[i]`` failed).
    Asynchronous form: starts the I/O in the client's nursery and returns 0 at
    once; ``notify_fn(error_bits, context)`` runs from that nursery when every
    bio has completed.  Both forms are cancellation points; the synchronous
    one yields to the scheduler only as often as its bios do (a bio run inline
    yields once every ``IoPolicy.yield_every`` syscalls, see ``docs/io-policy.md``).

    Raises:
        ValueError: misuse (see the module docstring); no I/O was started.
        RuntimeError: the asynchronous form on a client that is not entered.
    """
    regions = list(regions)
    _validate(req, regions)
    if req.notify_fn is None:
        return await client.execute(req, regions, req.flags | ReqFlag.SYNC)
    await trio.lowlevel.checkpoint()
    client.start(req, regions)
    return 0


async def dm_io_wait(client: DmIoClient, req: IoRequest, regions: Sequence[Region]) -> int:
    """The asynchronous form run to completion in the calling task (dmuser).

    Flags are used as given (no REQ_SYNC, as the asynchronous form), the I/O
    runs in the calling task instead of the client's nursery, and the error
    bitset is returned instead of passed to a notify function; so it needs no
    entered client and costs no task.  Cancellation is that of the synchronous
    form: the caller shields the call if a partly issued write must not be
    abandoned.

    Raises:
        ValueError: misuse, or ``req`` has a notify function.
    """
    if req.notify_fn is not None:
        raise ValueError("dm_io_wait takes a request without notify_fn")
    regions = list(regions)
    _validate(req, regions)
    return await client.execute(req, regions, req.flags)


class DmIoRegionError(DmIOError):
    """A synchronous dm-io request failed on the regions in ``error_bits``."""

    def __init__(self, error_bits: int) -> None:
        super().__init__(f"dm-io failed on regions {error_bits:#x}")
        self.error_bits = error_bits


async def dm_io_sync(client: DmIoClient, req: IoRequest, regions: Sequence[Region]) -> None:
    """Synchronous :func:`dm_io` that raises instead of returning the bitset.

    Raises:
        DmIoRegionError: some region failed; ``.error_bits`` says which.
        ValueError: misuse, or ``req`` has a notify function.
    """
    if req.notify_fn is not None:
        raise ValueError("dm_io_sync takes a synchronous request (notify_fn None)")
    error_bits = await dm_io(client, req, regions)
    if error_bits:
        raise DmIoRegionError(error_bits)
