"""Files on the demo's ext4 file systems, and the writer workload.

Two ways into a file system, with one interface (:class:`Tree`):

* :class:`MountedTree`: a directory where the kernel mounted it (``losetup`` on the
  device file, ``mount``): root with loop devices.
* :class:`DebugfsTree`: the unmounted file system on the device file, through
  ``debugfs`` (``write``, ``rm``, ``rdump``, ``blocks``): without loop devices.
  An in-place update of a file's blocks is then a ``pwrite`` to the device at
  the blocks' addresses, which is what the kernel would send down for it.

Contents are deterministic (:func:`pattern`) so that what is expected can be
recomputed and compared by sha256.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from dmuser.demo.session import DemoFailed, tool

#: the file systems' block size (mkfs.ext4 -b 4096), also the snapshot's chunk size
BLOCK = 4096
SYNC_EVERY = 256


def pattern(seed: str, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class FileInfo:
    size: int
    sha: str
    #: the first line of a small text file, else ""
    head: str

    @classmethod
    def of(cls, data: bytes) -> FileInfo:
        head = ""
        if len(data) < 4096:
            try:
                head = data.decode().splitlines()[0] if data else ""
            except UnicodeDecodeError:
                head = ""
        return cls(len(data), sha256(data), head)


def sums(infos: Mapping[str, FileInfo]) -> dict[str, str]:
    return {name: i.sha for name, i in infos.items()}


def scan_dir(root: str) -> dict[str, FileInfo]:
    """relative path -> FileInfo of every regular file below ``root`` (lost+found aside)."""
    out: dict[str, FileInfo] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if not (dirpath == root and d == "lost+found"))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = FileInfo.of(f.read())
    return out


class Tree(ABC):
    #: how the tree is reached, for the transcript
    where: str

    @abstractmethod
    def write(self, files: Mapping[str, bytes]) -> None: ...

    @abstractmethod
    def remove(self, names: Iterable[str]) -> None: ...

    @abstractmethod
    def scan(self) -> dict[str, FileInfo]: ...

    @abstractmethod
    def _block_writer(self, name: str) -> tuple[int, list[int] | None]:
        """An open fd to write the file's blocks through, and the fd's block number of
        each file block (None: the same numbers)."""

    def update_blocks(self, name: str, updates: Iterator[tuple[int, bytes]],
                      deadline: float) -> int:
        """Rewrite whole blocks of ``name`` in place until ``updates`` run out or the
        clock passes ``deadline``, fsyncing every SYNC_EVERY blocks; how many were done."""
        fd, where = self._block_writer(name)
        done = 0
        try:
            for block, data in updates:
                if time.monotonic() >= deadline:
                    break
                os.pwrite(fd, data, (block if where is None else where[block]) * BLOCK)
                done += 1
                if done % SYNC_EVERY == 0:
                    os.fsync(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        return done


class MountedTree(Tree):
    def __init__(self, root: str, shown: str, loop: str) -> None:
        self.root, self.where, self.loop = root, shown, loop

    def write(self, files: Mapping[str, bytes]) -> None:
        for name, data in files.items():
            path = os.path.join(self.root, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            os.unlink(os.path.join(self.root, name))

    def scan(self) -> dict[str, FileInfo]:
        return scan_dir(self.root)

    def _block_writer(self, name: str) -> tuple[int, list[int] | None]:
        return os.open(os.path.join(self.root, name), os.O_RDWR), None


class DebugfsTree(Tree):
    def __init__(self, device: str, scratch: str, shown: str) -> None:
        self.device, self.scratch, self.shown = device, scratch, shown
        self.where = f"debugfs on {shown}"
        self.known: set[str] = set()
        self.dirs: set[str] = set()

    def _debugfs(self, *args: str) -> str:
        res = subprocess.run([tool("debugfs"), *args, self.device], capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL)
        # rdump keeps the owners if it can; not as a normal user, which is fine here
        errors = [line for line in res.stderr.splitlines()
                  if line.strip() and not line.startswith("debugfs ")
                  and "while changing ownership" not in line]
        if res.returncode or errors:
            raise DemoFailed(f"debugfs {' '.join(args)} {self.shown}: "
                             + ("; ".join(errors) or f"exit status {res.returncode}"))
        return res.stdout

    def _commands(self, lines: list[str]) -> None:
        fd, cmds = tempfile.mkstemp(dir=self.scratch, suffix=".debugfs")
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        try:
            self._debugfs("-w", "-f", cmds)
        finally:
            os.unlink(cmds)

    def write(self, files: Mapping[str, bytes]) -> None:
        lines, sources = [], []
        for name, data in files.items():
            parts = name.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in self.dirs:
                    lines.append(f"mkdir {d}")
                    self.dirs.add(d)
            if name in self.known:
                lines.append(f"rm {name}")
            fd, src = tempfile.mkstemp(dir=self.scratch)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            sources.append(src)
            lines.append(f"write {src} {name}")
            self.known.add(name)
        try:
            self._commands(lines)
        finally:
            for src in sources:
                os.unlink(src)

    def remove(self, names: Iterable[str]) -> None:
        names = list(names)
        self._commands([f"rm {name}" for name in names])
        self.known.difference_update(names)

    def scan(self) -> dict[str, FileInfo]:
        out = tempfile.mkdtemp(dir=self.scratch)
        try:
            self._debugfs("-R", f"rdump / {out}")
            return scan_dir(out)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def _block_writer(self, name: str) -> tuple[int, list[int] | None]:
        phys = [int(w) for w in self._debugfs("-R", f"blocks /{name}").split()]
        return os.open(self.device, os.O_RDWR), phys


class Writer(threading.Thread):
    """Writes 1 MiB files round-robin over ``slots`` names until stopped; keeps the
    sha256 of what each name last got, and the first error."""

    def __init__(self, tree: Tree, slots: int = 40, size: int = 1 << 20,
                 pause: float = 0.02) -> None:
        super().__init__(name="demo-writer", daemon=True)
        self.tree, self.slots, self.size, self.pause = tree, slots, size, pause
        self.halt = threading.Event()
        self.count = 0
        self.sums: dict[str, str] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                name = f"writer/w{self.count % self.slots:02d}.bin"
                data = pattern(f"writer-{self.count}", self.size)
                self.tree.write({name: data})
                self.sums[name] = sha256(data)
                self.count += 1
                self.halt.wait(self.pause)
        except BaseException as exc:  # noqa: BLE001  (reported by the demo)
            self.error = exc

    def stop(self) -> None:
        self.halt.set()


def file_sha(path: str) -> str:
    """sha256 of a whole file (a device file: the whole device)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
