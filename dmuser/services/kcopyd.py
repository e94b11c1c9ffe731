"""kcopyd: copy a region to up to 8 others, or zero them (the kernel's ``dm-kcopyd.c``).

Snapshot copy-out, snapshot merge and mirror resync use it.  All I/O goes
through :mod:`dmuser.services.dm_io` with the asynchronous form's flags (no REQ_SYNC, as
in the kernel), run by :func:`~dmuser.services.dm_io.dm_io_wait` in the sub-job's own
task (the same bios as ``dm_io`` + a notify function, without a task and an
event per request).  Pages are taken without a checkpoint when they are free.
A small copy whose bios all run inline (``BlockDevice.runs_inline``: plain
file I/O), submitted while the callback worker is idle, is run by the worker
itself, I/O then callback: one scheduler pass per job, like a bare task doing
read + write (dm-io's bios then never wait, so the worker cannot be held up
by a device).  Otherwise a job has its own task and the worker runs only its
callback.  Slice buffers are the slice's size and are reused once their
write completed; the cache of free ones is bounded by the pool (see *Memory*).

Guarantees:

* **Splitting.**  A job of at most ``sub_job_size`` sectors is one read, then
  one dm-io write to every destination.  A larger job runs ``split_count``
  sub-jobs, each taking the next slice of at most ``sub_job_size`` sectors until
  none is left; slices may complete out of order.  Destination counts are
  ignored (as in the kernel): every destination receives the source's count.
* **Errors.**  ``read_err`` is True if any read failed; ``write_err`` is the OR
  of dm-io's per-destination bits (bit i = ``dests[i]``).  After the first error
  no new slice is started unless IGNORE_ERROR is set; without it a failed read
  slice is not written.  With IGNORE_ERROR a failed read slice (zero-filled by
  dm-io) is written as zeros and the errors are still reported.
* **WRITE_SEQ** cancels IGNORE_ERROR.  Slice writes happen strictly in
  ascending order: a slice's write starts only after the previous slice's write
  has *completed* (stronger than the kernel, which only issues them in order,
  because trio tasks and I/O threads do not keep submission order).  Once a
  slice failed, later slices end without writing.
* **Callbacks** ``fn(read_err, write_err, context)`` run one at a time from the
  client's single worker task, in completion order (no order between jobs; a
  job the worker ran itself calls back after completions queued meanwhile).
  A callback may return an awaitable, which the worker awaits before running
  the next callback, so it must not wait for another job of the same client.
  An exception from a callback propagates out of the client's ``async with``.
* **Memory.**  Each copy sub-job holds ``ceil(count / 8)`` pages of the
  client's pool (taken before the slice, so sub-jobs never wait for pages while
  holding a slice another one waits on); a sub-job larger than the pool runs
  alone.  Its buffer is the size of its slice.  Free buffers kept for reuse
  never exceed the pool's free pages, so buffers in use plus cached stay
  within ``max(nr_pages, one sub-job)`` pages.  Zeroing uses a shared zero
  buffer and takes no pages.
* **Lifetime / cancellation.**  Leaving ``async with KcopydClient()`` normally
  waits for every job and its callback (dm_kcopyd_client_destroy), including
  jobs started by callbacks.  If the block raises or is cancelled, jobs in
  progress are cancelled and their callbacks never run; bios already inside a
  device still finish (``blockdev`` never abandons a started write).
  Cancelling :meth:`KcopydClient.copy_wait` does not stop the job.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

import trio

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.units import SECTOR_SHIFT, pages_for
from dmuser.services.dm_io import BufferMem, DmIoClient, IoRequest, PagePool, Region, dm_io_wait
from dmuser.services.kcopyd_job import (
    DEFAULT_SUB_JOB_SIZE,
    MAX_DESTS,
    MAX_SUB_JOB_SIZE,
    SPLIT_COUNT,
    CopyNotifyFn,
    CopyResult,
    KcopydFlag,
    KcopydStatistics,
    KcopydThrottle,
    _Job,
    _SliceBuf,
)

__all__ = ["MAX_DESTS", "CopyNotifyFn", "CopyResult", "KcopydClient", "KcopydFlag",
           "KcopydStatistics", "KcopydThrottle", "PreparedCallback"]


class PreparedCallback:
    """A callback-only job (dm_kcopyd_prepare_callback); fire it with :meth:`do_callback`."""

    def __init__(self, kc: KcopydClient, job: _Job) -> None:
        self._kc, self._job = kc, job

    def do_callback(self, read_err: bool = False, write_err: int = 0) -> None:
        """Run the callback from the client's worker with these errors; sync, at most once."""
        if self._job.done:
            raise RuntimeError("do_callback called twice")
        self._job.read_err, self._job.write_err = read_err, write_err
        self._kc.complete_job(self._job)


class KcopydClient:
    """A kcopyd client: page pool, dm-io client, job nursery and callback worker.

    Args:
        nr_pages: pages bounding copy memory; default enough for one sub-job.
        sub_job_size: slice size in sectors; 0 means the default (1024), values
            above 2048 are clamped, as the kernel does with its module parameter.
        split_count: sub-jobs per large job.
        throttle: a percentage or a (shareable) :class:`KcopydThrottle`.
        io_reserved_pages: the reservation of the client's own dm-io client
            (default :data:`dmuser.services.dm_io.DEFAULT_RESERVED_PAGES`).
    """

    def __init__(
        self, nr_pages: int | None = None, *, sub_job_size: int = DEFAULT_SUB_JOB_SIZE,
        split_count: int = SPLIT_COUNT, throttle: KcopydThrottle | int | None = None,
        io_reserved_pages: int | None = None,
    ) -> None:
        if sub_job_size < 0 or split_count < 1:
            raise ValueError("sub_job_size must be >= 0 and split_count >= 1")
        self.sub_job_size = min(sub_job_size or DEFAULT_SUB_JOB_SIZE, MAX_SUB_JOB_SIZE)
        self.split_count = split_count
        self._pages = PagePool(pages_for(self.sub_job_size) if nr_pages is None else nr_pages)
        # Free slice buffers for reuse, by size in bytes, each with its read and
        # write requests (built once per buffer); ``_cached_pages`` counts them.
        self._free_bufs: dict[int, list[_SliceBuf]] = {}
        self._cached_pages = 0
        self.throttle = throttle if isinstance(throttle, KcopydThrottle) else \
            KcopydThrottle(100 if throttle is None else throttle)
        self._io_client = DmIoClient() if io_reserved_pages is None else \
            DmIoClient(io_reserved_pages)
        self._zeros = memoryview(bytes(self.sub_job_size << SECTOR_SHIFT))
        self._nursery: trio.Nursery | None = None
        self._send: trio.MemorySendChannel[_Job] | None = None
        self._nr_jobs = 0  # jobs started whose callback has not finished
        self._queued = 0  # jobs sent to the worker and not yet received
        self._worker_free = True  # the worker waits for a job (none being handled)
        self._idle = trio.Event()
        self._jobs_done = 0
        self._sectors_copied = 0
        self._cm: Any = None

    @asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[None]:
        self._nr_jobs = 0  # jobs cancelled by an earlier failed exit never called back
        self._queued, self._worker_free = 0, True
        async with self._io_client, trio.open_nursery() as nursery:
            send, recv = trio.open_memory_channel[_Job](math.inf)
            nursery.start_soon(self._worker, recv)
            self._nursery, self._send = nursery, send
            try:
                yield
                while self._nr_jobs:
                    await self._idle.wait()
            finally:
                self._nursery = None
                send.close()

    async def __aenter__(self) -> KcopydClient:
        if self._cm is not None:
            raise RuntimeError("KcopydClient entered twice")
        self._cm = self._lifetime()
        await self._cm.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        cm, self._cm = self._cm, None
        return await cm.__aexit__(exc_type, exc, tb)  # type: ignore[no-any-return]

    async def _worker(self, recv: trio.MemoryReceiveChannel[_Job]) -> None:
        """The single task that runs every callback of this client (and runs
        small inline jobs itself, see the module docstring)."""
        async for job in recv:
            self._queued -= 1
            self._worker_free = False
            try:
                if job.in_worker:
                    job.in_worker = False
                    if not await self._run_in_worker(job):
                        continue
                await self._callback(job)
            finally:
                self._worker_free = True

    async def _run_in_worker(self, job: _Job) -> bool:
        """Run a small job's I/O here; True if its callback is due now.

        Without free pages the job gets its own task instead (the worker never
        waits for pages).  Completions queued while the I/O ran came first:
        the job then queues its own behind them.
        """
        want = pages_for(job.count)
        if not self._pages.try_acquire(want):
            self._running().start_soon(self._run_job, job)
            return False
        await self._take_slice(job, want)
        if self._queued:
            self.complete_job(job)
            return False
        job.done = True
        return True

    async def _callback(self, job: _Job) -> None:
        try:
            result = job.fn(job.read_err, job.write_err, job.context)
            if inspect.isawaitable(result):
                await result
        finally:
            self._jobs_done += 1
            self._nr_jobs -= 1
            if not self._nr_jobs:
                self._idle.set()
                self._idle = trio.Event()

    def complete_job(self, job: _Job) -> None:
        job.done = True
        if self._send is not None and self._nursery is not None:
            self._queued += 1
            self._send.send_nowait(job)

    @property
    def running(self) -> bool:
        """True while jobs can be submitted (entered and not yet left)."""
        return self._nursery is not None

    def _running(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("KcopydClient is not running (use async with)")
        return self._nursery

    def statistics(self) -> KcopydStatistics:
        pool = self._pages.statistics()
        return KcopydStatistics(self._jobs_done, self._nr_jobs, self._sectors_copied,
                                pool.nr_pages, pool.pages_in_use, self.throttle.sleeps)

    def copy(self, src: Region, dests: Sequence[Region], flags: KcopydFlag | int,
             fn: CopyNotifyFn, context: Any = None) -> None:
        """Copy ``src`` to every destination (dm_kcopyd_copy); returns at once.

        Raises:
            ValueError: no destination or more than 8.
            RuntimeError: the client is not entered.
        """
        self._submit(_Job(src, tuple(dests), src.count, KcopydFlag(flags), Op.WRITE, fn, context))

    def zero(self, dests: Sequence[Region], flags: KcopydFlag | int, fn: CopyNotifyFn,
             context: Any = None) -> None:
        """Zero ``dests[0].count`` sectors of every destination (dm_kcopyd_zero).

        Uses WRITE_ZEROES when every destination device supports it, otherwise
        WRITE of zeros.  ``read_err`` is always False.
        """
        dests = tuple(dests)
        if not dests:
            raise ValueError("kcopyd needs at least one destination")
        op = Op.WRITE_ZEROES if all(d.dev.supports_write_zeroes for d in dests) else Op.WRITE
        self._submit(_Job(None, dests, dests[0].count, KcopydFlag(flags), op, fn, context))

    async def copy_wait(self, src: Region, dests: Sequence[Region],
                        flags: KcopydFlag | int = KcopydFlag.NONE) -> CopyResult:
        """:meth:`copy` and wait for its callback; cancelling does not stop the job."""
        return await self._wait(lambda fn: self.copy(src, dests, flags, fn))

    async def zero_wait(self, dests: Sequence[Region],
                        flags: KcopydFlag | int = KcopydFlag.NONE) -> CopyResult:
        """:meth:`zero` and wait for its callback."""
        return await self._wait(lambda fn: self.zero(dests, flags, fn))

    def prepare_callback(self, fn: CopyNotifyFn, context: Any = None) -> PreparedCallback:
        """A job with no I/O whose callback runs in the worker when fired.

        Counts as a job in flight until its callback has run, so the client's
        exit waits for it: fire every prepared callback.
        """
        self._running()
        self._nr_jobs += 1
        return PreparedCallback(self, _Job(None, (), 0, KcopydFlag.NONE, Op.WRITE, fn, context))

    async def _wait(self, start: Callable[[CopyNotifyFn], None]) -> CopyResult:
        done = trio.Event()
        results: list[CopyResult] = []

        def fn(read_err: bool, write_err: int, _context: Any) -> None:
            results.append(CopyResult(read_err, write_err))
            done.set()

        start(fn)
        await done.wait()
        return results[0]

    def _submit(self, job: _Job) -> None:
        nursery = self._running()
        if not 1 <= len(job.dests) <= MAX_DESTS:
            raise ValueError(f"kcopyd takes 1 to {MAX_DESTS} destinations, not {len(job.dests)}")
        if job.flags & KcopydFlag.WRITE_SEQ:
            job.flags &= ~KcopydFlag.IGNORE_ERROR
        self._nr_jobs += 1
        if job.count == 0:
            self.complete_job(job)
        elif self._worker_free and not self._queued and self._runs_inline(job):
            assert self._send is not None
            job.in_worker = True
            self._queued += 1
            self._send.send_nowait(job)
        else:
            nursery.start_soon(self._run_job, job)

    def _runs_inline(self, job: _Job) -> bool:
        """A copy of one slice, unthrottled, whose bios all run inline: the
        worker can run it without waiting for anything but pages, which it
        only takes when free."""
        n = job.count
        if job.src is None or n > self.sub_job_size or self.throttle.percent < 100:
            return False
        bio = Bio(Op.READ, job.src.sector, n)
        if not job.src.dev.runs_inline(bio):
            return False
        bio.op = Op.WRITE
        return all(d.dev.runs_inline(bio) for d in job.dests)

    async def _run_job(self, job: _Job) -> None:
        if job.count <= self.sub_job_size:
            await self._sub_job(job)
        else:
            async with trio.open_nursery() as nursery:
                for _ in range(self.split_count):
                    nursery.start_soon(self._sub_job, job)
        self.complete_job(job)

    async def _sub_job(self, job: _Job) -> None:
        """Take slices until none is left or the job stopped on an error."""
        want = pages_for(min(self.sub_job_size, job.count)) if job.src is not None else 0
        while job.progress < job.count and not job.stopped:
            # Pages first, then the slice: a sub-job never holds a slice while
            # waiting for pages, so WRITE_SEQ cannot deadlock on the pool.
            if want and not self._pages.try_acquire(want):
                await self._pages.acquire(want)
            await self._take_slice(job, want)

    async def _take_slice(self, job: _Job, held: int) -> None:
        """With ``held`` pages taken: run the job's next slice, if any is left
        and the job has not stopped, then give the pages back."""
        try:
            if job.progress >= job.count or job.stopped:
                return
            offset = job.progress
            n = min(self.sub_job_size, job.count - offset)
            job.progress += n
            if job.src is not None and pages_for(n) < held:
                self._pages.release(held - pages_for(n))
                held = pages_for(n)
            await self._slice(job, offset, n)
        finally:
            if held:
                self._pages.release(held)

    async def _slice(self, job: _Job, offset: int, n: int) -> None:
        """Read one slice (unless zeroing), then write it to every destination."""
        if job.src is None:
            await self._write_slice(job, offset, n, None)
            return
        buf = self._get_buf(n << SECTOR_SHIFT)
        try:
            src = job.src
            read = src if offset == 0 and n == src.count else \
                Region(src.dev, src.sector + offset, n)
            if await self._io(buf.read, [read]):
                job.read_err = True
                if not job.flags & KcopydFlag.IGNORE_ERROR:
                    if job.flags & KcopydFlag.WRITE_SEQ:
                        job.seq_advance(offset, None)
                    return
            await self._write_slice(job, offset, n, buf.write)
        finally:
            # Reused only once every bio on it has completed (dm-io waits for
            # them, shielded threads included), so no I/O can still touch it.
            self._put_buf(buf)

    def _get_buf(self, nbytes: int) -> _SliceBuf:
        """A slice buffer of ``nbytes`` (contents undefined), called with the
        slice's pages taken: a cached one if any, else a new one, after dropping
        cached buffers until cache + pages in use fit in the pool."""
        free = self._free_bufs.get(nbytes)
        if free:
            self._cached_pages -= pages_for(nbytes >> SECTOR_SHIFT)
            buf = free.pop()
            if not free:
                del self._free_bufs[nbytes]
            return buf
        pool = self._pages.statistics()
        while self._cached_pages and self._cached_pages + pool.pages_in_use > pool.nr_pages:
            size, bufs = next(iter(self._free_bufs.items()))
            bufs.pop()
            self._cached_pages -= pages_for(size >> SECTOR_SHIFT)
            if not bufs:
                del self._free_bufs[size]
        return _SliceBuf(nbytes)

    def _put_buf(self, buf: _SliceBuf) -> None:
        """Keep ``buf`` for reuse if the cache then fits in the pool's free pages
        (called while the slice still holds its pages, which it gives back next)."""
        pages = pages_for(buf.nbytes >> SECTOR_SHIFT)
        pool = self._pages.statistics()
        if self._cached_pages + pages > pool.nr_pages - pool.pages_in_use + pages:
            return
        self._cached_pages += pages
        self._free_bufs.setdefault(buf.nbytes, []).append(buf)

    async def _write_slice(self, job: _Job, offset: int, n: int, req: IoRequest | None) -> None:
        """Write one slice (``req`` None: zeroing) to every destination, in WRITE_SEQ order."""
        seq = bool(job.flags & KcopydFlag.WRITE_SEQ) if job.flags else False
        if req is None:
            mem = BufferMem(self._zeros[: n << SECTOR_SHIFT]) if job.write_op is Op.WRITE \
                else None
            req = IoRequest(job.write_op, ReqFlag.NONE, mem)
        if seq:
            while job.seq_offset != offset and not job.seq_blocked(offset):
                if job.seq_changed is None:
                    job.seq_changed = trio.Event()
                await job.seq_changed.wait()
            if job.seq_blocked(offset):
                return
        if offset == 0 and all(d.count == n for d in job.dests):
            regions = list(job.dests)
        else:
            regions = [Region(d.dev, d.sector + offset, n) for d in job.dests]
        error_bits = await self._io(req, regions)
        job.write_err |= error_bits
        if not error_bits:
            self._sectors_copied += n
        if seq:
            job.seq_advance(offset, None if error_bits else offset + n)

    async def _io(self, req: IoRequest, regions: list[Region]) -> int:
        """One throttled asynchronous dm-io request; returns its error bits."""
        throttle = self.throttle
        if not throttle.io_start_nowait():  # unlimited: no coroutine (io_start would not sleep)
            await throttle.io_start()
        try:
            # The asynchronous form's flags (no REQ_SYNC), run in this sub-job's
            # task: the same I/O as dm_io + notify, without a task and an event.
            return await dm_io_wait(self._io_client, req, regions)
        finally:
            self.throttle.io_finish()
