"""Test data and file I/O: the one :func:`pattern`, image files, exact reads and writes.

:func:`pattern` is the data every test writes: pseudo-random bytes from a seed,
so that a byte landing anywhere but its place shows.  (The golden kernel
vectors fix a different generator, the guest scripts' PATTERN; it lives beside
their loaders, :func:`support.vectors.vector_pattern`.)
"""

from __future__ import annotations

import hashlib
import os
import random
import time

SECTOR = 512


def pattern(seed: int | str, nbytes: int) -> bytes:
    """``nbytes`` deterministic pseudo-random bytes: the same ``seed`` and length give
    the same bytes (``random.Random(seed).randbytes``)."""
    return random.Random(seed).randbytes(nbytes)


def make_image(path: str | os.PathLike[str], nbytes: int, seed: int | str | None = None) -> bytes:
    """Create an image file of ``nbytes``: sparse zeros, or ``pattern(seed, nbytes)``.
    Returns its content."""
    data = bytes(nbytes) if seed is None else pattern(seed, nbytes)
    with open(path, "wb") as f:
        if seed is None:
            f.truncate(nbytes)
        else:
            f.write(data)
    return data


def sha(path: str | os.PathLike[str], offset: int = 0, nbytes: int | None = None) -> str:
    """sha256 (hex) of ``nbytes`` of a file from ``offset`` (default: to its end),
    read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = os.fstat(f.fileno()).st_size - offset if nbytes is None else nbytes
        while left > 0:
            block = f.read(min(left, 1 << 20))
            if not block:
                raise EOFError(f"{path}: short read at byte {f.tell()}")
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def write_at(path: str | os.PathLike[str], offset: int, data: bytes, fsync: bool = True) -> None:
    """pwrite all of ``data`` at byte ``offset`` (then fsync, unless told not to)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: str | os.PathLike[str], offset: int, nbytes: int) -> bytes:
    """pread ``nbytes`` from byte ``offset`` (fewer at the end of the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        done = 0
        while done < nbytes:
            chunk = os.pread(fd, nbytes - done, offset + done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def assert_bytes(actual: bytes, expected: bytes, what: str = "data") -> None:
    """Assert equality with a short message (first differing offset) instead of a huge diff."""
    if actual == expected:
        return
    n = min(len(actual), len(expected)) if len(actual) != len(expected) else len(actual)
    first = next((i for i in range(n) if actual[i] != expected[i]), n)
    raise AssertionError(f"{what}: mismatch at byte {first} (got {len(actual)} bytes, "
                         f"expected {len(expected)}): got {actual[first:first + 16].hex()} "
                         f"expected {expected[first:first + 16].hex()}")


def verify_at(path: str | os.PathLike[str], offset: int, expected: bytes, what: str = "") -> None:
    """Assert that the file holds ``expected`` at byte ``offset``."""
    assert_bytes(read_at(path, offset, len(expected)), expected,
                 what or f"{path} at byte {offset}")


def check_pattern_io(path: str | os.PathLike[str], seed: int | str, offset: int = 0,
                     nbytes: int = 64 * 1024) -> None:
    """Write a fresh pattern through ``path``, fsync, read it back."""
    data = pattern(f"{seed}-{time.monotonic_ns()}", nbytes)
    write_at(path, offset, data)
    verify_at(path, offset, data)
