"""Replay the real-kernel snapshot vectors in process and compare every recorded output.

Each vector's manifest lists the guest's steps (dmsetup verbs, O_DIRECT writes
of a seeded pattern, reads, device hashes, hexdumps, dmesg) with the kernel's
exact output.  The runner below maps ``/dev/vdX`` to image files in a tmp dir,
runs the verbs through ``control.dispatch`` on a fresh DeviceManager, and
compares: table/status strings (with ``MAJ:MIN`` for the image paths), device
sha256s, hexdumps of the COW, kernel log messages, and the images' final hashes.

Each vector runs twice (``MODES``): with origin-write holding off (the kernel's
commit before every origin write completes), and with the default holding plus
a flush after every write step, which must give the kernel's bytes and
statuses too (holding changes when areas are written, never what is in them).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.targets import make_manager
from support.vectors import (
    final_image,
    hexdump_c,
    initial_image,
    load_manifest,
    status_examples,
    steps_of,
    vector_pattern,
)

from dmuser import control
from dmuser.core.blockdev import BlockDevice
from dmuser.core.config import Config
from dmuser.core.errors import DmError


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs directory when there is one: 600 metadata commits are 1200 fdatasyncs."""
    if os.access("/dev/shm", os.W_OK):
        with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="dmuser-vec-") as d:
            yield Path(d)
    else:
        yield tmp_path


class Runner:
    """Executes manifest steps against dmuser; collects mismatches instead of stopping."""

    def __init__(self, tmp: Path, devices: dict[str, str], mode: str = "kernel") -> None:
        self.tmp = tmp
        self.files = devices                      # /dev/vda -> origin.img
        self.majmin: dict[str, str] = {}          # /dev/vda -> 254:0
        self.flush_writes = mode == "held"
        self.mgr = make_manager(config=Config() if self.flush_writes
                                else Config(snapshot_hold_bytes=0))
        self.mismatches: list[str] = []

    def _check(self, step: dict[str, Any], got: str, rc: int) -> None:
        if (got, rc) != (step["output"], step["rc"]):
            self.mismatches.append(f"step {step['step']} {step['command'][:60]!r}:\n"
                                   f"  kernel ({step['rc']}): {step['output']!r}\n"
                                   f"  dmuser ({rc}): {got!r}")

    def _subst(self, text: str) -> str:
        for dev, name in self.files.items():
            text = re.sub(rf"{dev}\b", name, text)
        return text

    def _normalise(self, text: str) -> str:
        for dev, name in self.files.items():
            text = text.replace(str(self.tmp / name), self.majmin.get(dev, dev))
        return text

    async def dispatch(self, **req: Any) -> str:
        reply = await control.dispatch(self.mgr, {"cwd": str(self.tmp), **req})
        return reply.output

    def device(self, path: str) -> BlockDevice | Path:
        if path.startswith("/dev/mapper/"):
            return self.mgr.get(path.rsplit("/", 1)[1])
        return self.tmp / self.files[path]

    async def digest(self, path: str, limit_bytes: int | None = None) -> tuple[str, bytes] | None:
        """(sha256, first ``limit_bytes`` bytes) of a device, read in 1 MiB requests."""
        dev = self.device(path)
        if isinstance(dev, Path):
            data = dev.read_bytes()
            return hashlib.sha256(data).hexdigest(), data[:limit_bytes or 0]
        h, head = hashlib.sha256(), b""
        try:
            for sector in range(0, dev.nr_sectors, 2048):
                buf = await dev.read(sector, min(2048, dev.nr_sectors - sector))
                h.update(buf)
                if limit_bytes and len(head) < limit_bytes:
                    head += bytes(buf[:limit_bytes - len(head)])
        except DmError:
            return None
        return h.hexdigest(), head

    async def step(self, step: dict[str, Any]) -> None:
        action, cmd = step["action"], step["command"]
        words = shlex.split(cmd) if not action.startswith(("bulk", "dmesg", "devices")) else []
        if action == "devices":
            for line in step["output"].splitlines():
                dev, majmin = line.split()[:2]
                self.majmin[dev] = majmin
            return
        if action in ("create", "suspend", "resume", "remove"):
            req: dict[str, Any] = {"verb": action, "name": words[2]}
            if action == "create":
                req["table"] = self._subst("\n".join(step["table"]))
            try:
                await self.dispatch(**req)
                rc = 0
            except DmError:
                rc = 1
            if rc != step["rc"]:
                self._check(step, step["output"] if rc == 0 else "<error>", rc)
            return
        if action in ("dmsetup table", "dmsetup status"):
            name = words[2] if len(words) > 2 else None
            out = await self.dispatch(verb=words[1], name=name)
            self._check(step, self._normalise(out), 0)
            return
        if action == "write":
            data = vector_pattern(step["pattern_seed"], step["offset_sector"],
                                  step["length_sectors"])
            rc = await self._write(step["device"], step["offset_sector"], data)
            if rc != step["rc"]:
                self._check(step, step["output"] if rc == 0 else "<error>", rc)
            return
        if action == "bulk write":
            failed = 0
            for w in step["writes"]:
                data = vector_pattern(w["pattern_seed"], w["offset_sector"], w["length_sectors"])
                failed += await self._write(step["device"], w["offset_sector"], data)
            if failed:
                self.mismatches.append(f"step {step['step']}: {failed} bulk writes failed")
            return
        if action == "read":
            dev = self.device(words[1])
            assert not isinstance(dev, Path)
            try:
                buf = await dev.read(int(words[2]), int(words[3]))
                out = f"read {len(buf)} bytes sha256 {hashlib.sha256(buf).hexdigest()}\n"
                rc = 0
            except DmError:
                out, rc = step["output"] if step["rc"] else "<error>", 1
            self._check(step, out, rc)
            return
        if action == "hash":
            lines = []
            for path in words[1:]:
                result = await self.digest(path)
                if result is None:
                    lines.append(next(line for line in step["output"].splitlines()
                                      if line.endswith(path) or path + ":" in line)
                                 if "READ-ERROR" in step["output"] else f"READ-ERROR  {path}")
                else:
                    lines.append(f"{result[0]}  {path}")
            self._check(step, "".join(line + "\n" for line in lines), 0)
            return
        if action == "hexdump":
            result = await self.digest(words[1], int(words[2]) * 1024)
            assert result is not None
            self._check(step, hexdump_c(result[1]), 0)
            return
        # dmesg is checked by the caller against the log; sleep, info, ls are not modelled

    async def _write(self, path: str, sector: int, data: bytes) -> int:
        dev = self.device(path)
        assert not isinstance(dev, Path)
        try:
            await dev.write(sector, data)
            if self.flush_writes:
                await dev.flush()
            return 0
        except DmError:
            return 1


def kernel_messages(steps: list[dict[str, Any]]) -> list[str]:
    """dm messages of the dmesg steps, without timestamp and ``device-mapper: x:`` prefix."""
    out = []
    for step in steps:
        if step["action"] == "dmesg":
            for line in step["output"].splitlines():
                m = re.match(r"\[[ \d.]+\] device-mapper: [a-z ]+: (.*)$", line)
                if m:
                    out.append(m[1])
    return out


MODES = pytest.mark.parametrize("mode", ["kernel", "held"])


async def replay(name: str, tmp: Path, caplog: pytest.LogCaptureFixture,
                 mode: str, skip: tuple[str, ...] = ()) -> Runner:
    manifest = load_manifest(name)
    runner = Runner(tmp, {"/dev/vda": "origin.img", "/dev/vdb": "cow.img"}, mode)
    steps = steps_of(manifest)
    try:
        for step in steps:
            if not any(s in step["command"] for s in skip):
                await runner.step(step)
    finally:
        await runner.mgr.remove_all()
    for msg in kernel_messages(steps):
        if msg not in caplog.text:
            runner.mismatches.append(f"kernel logged {msg!r}; dmuser did not")
    for image in manifest["images"]:
        digest = hashlib.sha256((tmp / image["name"]).read_bytes()).hexdigest()
        if digest != image["final_sha256"]:
            runner.mismatches.append(f"final {image['name']} differs")
    return runner


def initial_images(name: str, tmp: Path) -> None:
    for image in load_manifest(name)["images"]:
        data = initial_image(image)
        assert hashlib.sha256(data).hexdigest() == image["initial_sha256"]
        (tmp / image["name"]).write_bytes(data)


@MODES
async def test_snap_persistent_4k(tmp: Path, caplog: pytest.LogCaptureFixture, mode: str) -> None:
    initial_images("snap-persistent-4k", tmp)
    runner = await replay("snap-persistent-4k", tmp, caplog, mode)
    assert not runner.mismatches, "\n".join(runner.mismatches)
    # the stored images are the kernel's bytes after teardown
    for image in ("origin.img", "cow.img"):
        assert (tmp / image).read_bytes() == final_image("snap-persistent-4k", image)


@MODES
async def test_snap_reactivate(tmp: Path, caplog: pytest.LogCaptureFixture, mode: str) -> None:
    for image in ("origin.img", "cow.img"):
        (tmp / image).write_bytes(final_image("snap-persistent-4k", image))
    runner = await replay("snap-reactivate", tmp, caplog, mode)
    assert not runner.mismatches, "\n".join(runner.mismatches)


@MODES
async def test_snap_overflow(tmp: Path, caplog: pytest.LogCaptureFixture, mode: str) -> None:
    initial_images("snap-overflow", tmp)
    runner = await replay("snap-overflow", tmp, caplog, mode)
    assert not runner.mismatches, "\n".join(runner.mismatches)
    # the stored images are the kernel's bytes after teardown
    for image in ("origin.img", "cow.img"):
        assert (tmp / image).read_bytes() == final_image("snap-overflow", image)


async def test_statuses_snapshot_examples(tmp: Path) -> None:
    manifest = load_manifest("statuses")
    images = {i["name"]: i for i in manifest["images"]}
    for name in ("base.img", "cow1.img", "cow2.img"):
        (tmp / name).write_bytes(initial_image(images[name]))
    runner = Runner(tmp, {"/dev/vda": "base.img", "/dev/vdb": "cow1.img",
                               "/dev/vdc": "cow2.img"})
    wanted = ("orig", "snapP", "snapN", "devices")
    try:
        for step in steps_of(manifest):
            cmd = step["command"]
            if step["action"] in ("dmsetup table", "dmsetup status") and len(cmd.split()) == 2:
                continue  # all-device listings include targets outside this test
            if step["action"] == "devices" or any(f" {w} " in cmd + " " or f"/{w} " in cmd
                                                  for w in wanted):
                await runner.step(step)
        examples = {e["device"]: e for t in ("snapshot-origin", "snapshot")
                    for e in status_examples(t)}
        for name in ("orig", "snapP", "snapN"):
            out = await runner.dispatch(verb="status", name=name)
            assert out == examples[name]["dmsetup_status_at_end"] + "\n"
    finally:
        await runner.mgr.remove_all()
    assert not runner.mismatches, "\n".join(runner.mismatches)
    for name in ("base.img", "cow1.img", "cow2.img"):
        digest = hashlib.sha256((tmp / name).read_bytes()).hexdigest()
        assert digest == images[name]["final_sha256"], name
