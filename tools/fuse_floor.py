"""The floor of the frame: the least a pyfuse3 + trio daemon can do per request.

``tools/bench --setups floor`` serves the backing file through this minimal
pass-through file system: one file, ``direct_io``, the dmuser daemon's mount
options, and handlers that are one inline ``os.pread``/``os.pwrite`` each.
No table, no targets, no locks, no error translation: nothing dmuser could
leave out.  Its figures are what pyfuse3's request dispatch (receive, handler
coroutine, reply, trio's epoll wait) costs on this machine, so ``linear/floor``
is the share of the reachable speed that dmuser achieves, and ``floor/qsd``
says whether a goal relative to qemu-storage-daemon is reachable in this
frame at all.

With ``--cow COW_FILE CHUNK_BYTES`` it is also the floor of a copy-on-write
origin (``tools/bench_targets.py snapshot --setups floor-cow``): the first
write to a chunk first copies the chunk, one ``os.pread`` of the backing file
and one ``os.pwrite`` to the next free chunk of the COW file, remembered in a
dict; a flush ``fdatasync``\ s the COW file, then the backing file.  No
metadata, no ordering, no crash safety: the least any
snapshot served in this frame must do, so ``floor-cow/qcow2`` says whether a
first-write goal against qcow2 is reachable here.

Usage: python tools/fuse_floor.py BACKING_FILE MOUNTPOINT [--cow COW_FILE CHUNK_BYTES]
(runs until SIGTERM)
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1
FILE_NAME = b"dev"


class FloorFS(pyfuse3.Operations):
    def __init__(self, path: str, cow_path: str | None = None, chunk: int = 0) -> None:
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.size = os.fstat(self.fd).st_size
        self.cow_fd = os.open(cow_path, os.O_RDWR | os.O_CLOEXEC) if cow_path else -1
        self.chunk = chunk
        self.copied: dict[int, int] = {}  # origin chunk -> COW chunk

    def _attrs(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            entry.st_mode, entry.st_size = stat.S_IFDIR | 0o755, 0
        else:
            entry.st_mode, entry.st_size = stat.S_IFREG | 0o600, self.size
        entry.st_uid, entry.st_gid = os.getuid(), os.getgid()
        entry.attr_timeout = entry.entry_timeout = 0  # as dmuser: sizes may change
        return entry

    async def lookup(self, parent_inode: int, name: bytes, ctx: object = None) -> object:
        if parent_inode != pyfuse3.ROOT_INODE or name != FILE_NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE_INODE)

    async def getattr(self, inode: int, ctx: object = None) -> object:
        return self._attrs(inode)

    async def opendir(self, inode: int, ctx: object) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: object) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, FILE_NAME, self._attrs(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: object) -> object:
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        if self.cow_fd >= 0:
            for c in range(off // self.chunk, (off + len(buf) - 1) // self.chunk + 1):
                if c not in self.copied:
                    new = self.copied[c] = len(self.copied)
                    os.pwrite(self.cow_fd, os.pread(self.fd, self.chunk, c * self.chunk),
                              new * self.chunk)
        return os.pwrite(self.fd, buf, off)

    async def flush(self, fh: int) -> None:
        self._sync()

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._sync()

    def _sync(self) -> None:
        if self.cow_fd >= 0:
            os.fdatasync(self.cow_fd)  # what a flush of any snapshot must cover
        os.fdatasync(self.fd)

    async def release(self, fh: int) -> None:
        pass


async def serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                pyfuse3.terminate()
                break


def main() -> int:
    args = sys.argv[1:]
    if len(args) not in (2, 5) or len(args) == 5 and (args[2] != "--cow" or
                                                      not args[4].isdigit() or int(args[4]) <= 0):
        print("usage: " + __doc__.strip().splitlines()[-2].split(": ", 1)[1], file=sys.stderr)
        return 2
    fs = FloorFS(args[0], *((args[3], int(args[4])) if len(args) == 5 else ()))
    pyfuse3.init(fs, sys.argv[2], {"fsname=dmuser-floor", "subtype=floor", "default_permissions"})
    try:
        trio.run(serve)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
