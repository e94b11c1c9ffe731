"""Image files on a disk with a volatile write cache, modelled at the syscall level.

:class:`VolatileDisk` wraps (with pytest's ``monkeypatch``) the syscalls that
``dmuser/core/blockdev.py`` makes on a backing file: ``os.pwrite``,
``os.pwritev`` (``RWF_DSYNC`` is FUA), ``os.fdatasync``/``os.fsync``, the
ctypes ``sync_file_range`` (write-behind).  For a
descriptor of a tracked file (found by its inode, so ``dup``\\ s count) it
keeps two shadows:

* ``cache``: what the page cache holds.  Every write lands on the real file
  too, so reads (``pread``, which is not wrapped) see it; :meth:`check_cache`
  compares both at the end, which proves every write went through the model.
* ``durable``: what a power cut leaves.  A plain write reaches it at once with
  probability ``p_write`` (all or nothing), else its sectors stay dirty until a
  random writeback (at any wrapped syscall, sector by sector, so a multi-sector
  write may land torn), a ``sync_file_range`` (a random part of what is dirty),
  an ``fdatasync``/``fsync`` (everything) or an ``RWF_DSYNC`` write (its range).

The real ``fdatasync`` is not called: the model is the disk.  Descriptors of
other files pass straight through.  Calls may come from worker threads
(``IoPolicy.sync``, write-behind): one lock guards the model, and each wrapped
call runs its syscall and its model update under it, so the shadows follow the
order in which the syscalls ran.  :attr:`on_syscall` (called with the lock held,
before each wrapped syscall) lets a test take crash images between any two
syscalls, including those no checkpoint separates.
"""

from __future__ import annotations

import os
import random
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from dmuser.core import blockdev

SECTOR = 512


class TrackedFile:
    """The model of one image file."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            data = f.read()
        assert len(data) % SECTOR == 0, f"{path}: not whole sectors"
        self.cache = bytearray(data)
        self.durable = bytearray(data)
        self.dirty: set[int] = set()  # sectors whose cache differs (maybe) from durable
        self._image: bytes | None = None  # bytes(durable), until durable changes

    def persist(self, start: int, end: int) -> None:
        """Sectors ``[start, end)`` reach the disk."""
        self.durable[start * SECTOR:end * SECTOR] = self.cache[start * SECTOR:end * SECTOR]
        self.dirty.difference_update(range(start, end))
        self._image = None

    def sync(self) -> None:
        """Everything reaches the disk."""
        self.durable[:] = self.cache
        self.dirty.clear()
        self._image = None

    def image(self) -> bytes:
        """``durable`` as bytes; the same object while it does not change (images
        taken one after the other share what did not change)."""
        if self._image is None:
            self._image = bytes(self.durable)
        return self._image


class VolatileDisk:
    """The write caches of the tracked files (see the module docstring).

    Attributes:
        counts: wrapped syscalls on tracked files by kind, and ``writeback`` (sectors
            written back at random moments).
        version: bumped whenever a ``durable`` shadow may have changed (a test skips
            crash images equal to the last one).
        on_syscall: called with the lock held before each wrapped syscall on a
            tracked file.
    """

    def __init__(self, rng: random.Random, p_write: float = 0.3,
                 p_writeback: float = 0.05) -> None:
        self.rng = rng
        self.p_write, self.p_writeback = p_write, p_writeback
        self.lock = threading.Lock()
        self.files: dict[tuple[int, int], TrackedFile] = {}
        self.counts: Counter[str] = Counter()
        self.version = 0
        self.on_syscall: Callable[[], None] | None = None

    def track(self, path: str) -> TrackedFile:
        """Model ``path`` from now on; its current content counts as durable."""
        st = os.stat(path)
        f = self.files[(st.st_dev, st.st_ino)] = TrackedFile(path)
        return f

    def durable(self, f: TrackedFile) -> bytes:
        """``f``'s durable shadow now."""
        with self.lock:
            return f.image()

    def durable_images(self, files: Sequence[TrackedFile]) -> list[bytes]:
        """The ``durable`` shadows of ``files`` at one moment (a crash image); call
        with :attr:`lock` held (:attr:`on_syscall` is)."""
        return [f.image() for f in files]

    def check_cache(self) -> None:
        """Every tracked file's content equals its ``cache``: no write bypassed the model."""
        for f in self.files.values():
            with open(f.path, "rb") as fh:
                assert fh.read() == bytes(f.cache), f"{f.path}: a write bypassed the model"

    # -- the wrapped syscalls ------------------------------------------------------------

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Wrap the syscalls (undone by ``monkeypatch`` at the end of the test)."""
        real_pwrite, real_pwritev = os.pwrite, os.pwritev
        real_fdatasync, real_fsync = os.fdatasync, os.fsync
        real_sfr = blockdev._libc.sync_file_range

        def pwrite(fd: int, data: Any, offset: int) -> int:
            f = self._lookup(fd)
            if f is None:
                return real_pwrite(fd, data, offset)
            with self.lock:
                self._step("pwrite")
                n = real_pwrite(fd, data, offset)
                self._wrote(f, data, offset, n, durable=False)
                return n

        def pwritev(fd: int, buffers: Sequence[Any], offset: int, flags: int = 0) -> int:
            f = self._lookup(fd)
            if f is None:
                return real_pwritev(fd, buffers, offset, flags)
            with self.lock:
                dsync = bool(flags & os.RWF_DSYNC)
                self._step("pwritev_dsync" if dsync else "pwritev")
                n = real_pwritev(fd, buffers, offset, flags & ~os.RWF_DSYNC)
                self._wrote(f, b"".join(bytes(b) for b in buffers), offset, n, durable=dsync)
                return n

        def make_sync(real: Callable[[int], None], kind: str) -> Callable[[int], None]:
            def sync(fd: int) -> None:
                f = self._lookup(fd)
                if f is None:
                    real(fd)
                    return
                with self.lock:
                    self._step(kind)
                    f.sync()
                    self.version += 1
            return sync

        def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> int:
            f = self._lookup(fd)
            if f is None:
                return int(real_sfr(fd, offset, nbytes, flags))
            with self.lock:
                self._step("sync_file_range")
                self._writeback(f, 0.5)
            return 0

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "pwritev", pwritev)
        monkeypatch.setattr(os, "fdatasync", make_sync(real_fdatasync, "fdatasync"))
        monkeypatch.setattr(os, "fsync", make_sync(real_fsync, "fsync"))
        monkeypatch.setattr(blockdev._libc, "sync_file_range", sync_file_range)

    def _lookup(self, fd: int) -> TrackedFile | None:
        if not self.files:
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            return None  # the real call reports it
        return self.files.get((st.st_dev, st.st_ino))

    def _step(self, kind: str) -> None:
        """Before a syscall (lock held): count it, let the test look, write back at random."""
        self.counts[kind] += 1
        if self.on_syscall is not None:
            self.on_syscall()
        if self.rng.random() < self.p_writeback:
            self._writeback(self.rng.choice(list(self.files.values())), 0.3)

    def _writeback(self, f: TrackedFile, share: float) -> None:
        """A random ``share`` of ``f``'s dirty sectors reaches the disk."""
        done = [s for s in f.dirty if self.rng.random() < share]
        for s in done:
            f.persist(s, s + 1)
        self.counts["writeback"] += len(done)
        self.version += 1

    def _wrote(self, f: TrackedFile, data: Any, offset: int, n: int, durable: bool) -> None:
        assert offset % SECTOR == 0 and n % SECTOR == 0, "unaligned write to an image"
        f.cache[offset:offset + n] = memoryview(data).cast("B")[:n]
        start, end = offset // SECTOR, (offset + n) // SECTOR
        if durable or self.rng.random() < self.p_write:
            f.persist(start, end)
            self.version += 1
        else:
            f.dirty.update(range(start, end))
