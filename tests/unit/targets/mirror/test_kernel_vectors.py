"""The mirror-disklog golden vector (kernel 6.1), replayed in process.

Every step of ``tests/vectors/mirror-disklog/manifest.json``: create with a
disk log, status until in sync, table/status strings, the log device's bytes
after the resync / after writes / after removal, writes through the mirror,
hashes of the mirror and both legs, re-creation on the clean log (no resync),
the ``nosync`` variant, and the final images (compared with the decompressed
``.img.xz`` files).  Device names are mapped to the guest's ``MAJ:MIN``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from support.targets import make_manager
from support.vectors import (
    final_image,
    initial_image,
    load_manifest,
    parse_hexdump,
    vector_pattern,
)

from dmuser.control import dispatch
from dmuser.core.config import Config
from dmuser.core.manager import DeviceManager

VECTOR = "mirror-disklog"
S = 512


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def manifest() -> dict[str, Any]:
    return load_manifest(VECTOR)


@pytest.fixture
async def mgr(nursery: trio.Nursery) -> AsyncIterator[DeviceManager]:
    # The kernel clears a region in the log at the next daemon pass (dmuser delays it).
    manager = make_manager(config=Config(mirror_clean_delay=0.0))
    manager.service_nursery = nursery
    yield manager
    await manager.remove_all()


async def test_mirror_disklog_vector(tmp_path: Path, manifest: dict[str, Any],
                                     mgr: DeviceManager) -> None:
    images = {img["name"]: img for img in manifest["images"]}
    initial = {name: initial_image(image) for name, image in images.items()}
    for name, data in initial.items():
        assert sha256(data) == images[name]["initial_sha256"], name
        (tmp_path / name).write_bytes(data)
    guest = {"/dev/vda": "log.img", "/dev/vdb": "leg0.img", "/dev/vdc": "leg1.img"}
    majmin = {str(tmp_path / "log.img"): "254:0", str(tmp_path / "leg0.img"): "254:16",
              str(tmp_path / "leg1.img"): "254:32"}

    def guestify(text: str) -> str:
        for path, mm in majmin.items():
            text = text.replace(path, mm)
        return text

    async def verb(**req: Any) -> str:
        reply = await dispatch(mgr, {"cwd": str(tmp_path), **req})
        return guestify(reply.output)

    def log_bytes(n: int = 2048) -> bytes:
        return (tmp_path / "log.img").read_bytes()[:n]

    async def wait_for(predicate: Any, what: str) -> None:
        with trio.move_on_after(20):
            while not predicate():
                await trio.sleep(0.005)
        assert predicate(), what

    steps = manifest["boots"][0]["steps"]
    poll_lines: list[str] = []
    for step in steps:
        action, expected = step["action"], step.get("output", "")
        command = step["command"]
        if action == "devices":
            continue
        if action == "create":
            table = step["table"][0]
            for dev, img in guest.items():
                table = table.replace(dev, img)
            assert await verb(verb="create", name="mirr", table=table) == ""
        elif action == "poll status":
            first = expected.splitlines()[0].split(" ", 1)[1]
            first_now = await verb(verb="status", name="mirr")
            counts = [int(re.search(r" (\d+)/64 ", first_now)[1])]  # type: ignore[index]
            if first.split()[6] == "64/64":  # a clean log: in sync at once
                assert first_now == first + "\n"
            final = expected.splitlines()[-1].split(" ", 1)[1]
            while True:
                line = await verb(verb="status", name="mirr")
                counts.append(int(re.search(r" (\d+)/64 ", line)[1]))  # type: ignore[index]
                poll_lines.append(line)
                if counts[-1] == 64:
                    break
                await trio.sleep(0.001)
            assert counts == sorted(counts), "the in-sync count never goes back"
            assert line == final + "\n"
        elif action in ("dmsetup table", "dmsetup status"):
            kind = "table" if action == "dmsetup table" else "status"
            req = {"verb": kind, **({"name": "mirr"} if command.endswith("mirr") else {})}
            assert await verb(**req) == expected, step["step"]
        elif action == "hexdump":
            log_want = parse_hexdump(expected, 2048)
            await wait_for(lambda want=log_want: log_bytes() == want,
                           f"log bytes at step {step['step']}")
        elif action == "write":
            data = vector_pattern(step["pattern_seed"], step["offset_sector"],
                                  step["length_sectors"])
            await mgr.get("mirr").write(step["offset_sector"], data)
        elif action == "hash":
            hashes = {line.split()[1]: line.split()[0] for line in expected.splitlines()}
            for dev, digest in hashes.items():
                if dev == "/dev/mapper/mirr":
                    md = mgr.get("mirr")
                    got = sha256(await md.read(0, md.nr_sectors))
                else:
                    got = sha256((tmp_path / guest[dev]).read_bytes())
                assert got == digest, f"step {step['step']}: {dev}"
        elif action == "remove":
            assert await verb(verb="remove", name="mirr") == ""
        else:  # pragma: no cover - a new kind of step in the manifest
            pytest.fail(f"unknown step {action}")
    for name, img in images.items():
        final = final_image(VECTOR, name)
        ours = (tmp_path / name).read_bytes()
        assert sha256(ours) == img["final_sha256"] == sha256(final), name
