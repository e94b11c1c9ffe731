"""``dmuser cow inspect|check``: reports on valid, damaged, blank, foreign and dropped
COW devices (the images made with the persistent store)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from support.targets import commit_one, new_store

from dmuser import cow_tool


async def cow_image(tmp_path: Path, records: list[tuple[int, int]],
                    cow_sectors: int = 4096) -> Path:
    store, cow, _ = await new_store(cow_sectors=cow_sectors)
    for i, (old, new) in enumerate(records):
        struct.pack_into("<QQ", cow.buf, 4096 + 16 * i, old, new)
    path = tmp_path / "cow.img"
    path.write_bytes(bytes(cow.buf))
    return path


async def test_cow_tool_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, cow, _ = await new_store(cow_sectors=8 * 600)
    for i in range(300):
        await commit_one(store, 3 * i)
    path = tmp_path / "cow.img"
    path.write_bytes(bytes(cow.buf))
    assert cow_tool.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    a, t, m = store.usage()
    assert f"usage:               {a}/{t} {m}" in out
    assert "exceptions:          300" in out and "metadata areas:      2 (chunks 1, 258)" in out
    assert cow_tool.main(["check", str(path), "--json"]) == 0
    assert '"exceptions": 300' in capsys.readouterr().out


@pytest.mark.parametrize("records,problem", [
    ([(1, 2), (1, 3)], "metadata area 0 record 1: origin chunk 1 already has an exception "
                       "(metadata area 0 record 0)"),
    ([(1, 2), (2, 2)], "metadata area 0 record 1: COW chunk 2 is already used by metadata "
                       "area 0 record 0"),
    ([(1, 2), (2, 258)], "metadata area 0 record 1: COW chunk 258 is a metadata area, "
                         "not a data chunk"),
    ([(1, 9999)], "metadata area 0 record 0: COW chunk 9999 lies beyond the end of the "
                  "device (512 chunks)"),
])
async def test_cow_tool_check_finds_damage(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           records: list[tuple[int, int]], problem: str) -> None:
    path = await cow_image(tmp_path, records)
    assert cow_tool.main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"damage: {problem}" in out and "check: FAILED" in out


async def test_cow_tool_other_states(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(8192))
    assert cow_tool.main(["check", str(blank)]) == 0
    assert "new (no header yet" in capsys.readouterr().out
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"JUNK" + bytes(8188))
    assert cow_tool.main(["inspect", str(junk)]) == 1
    assert cow_tool.main(["check", str(tmp_path / "missing.img")]) == 2
    assert cow_tool.main(["frobnicate", str(junk)]) == 2
    store, cow, _ = await new_store()
    await store.drop_snapshot()
    dropped = tmp_path / "dropped.img"
    dropped.write_bytes(bytes(cow.buf))
    assert cow_tool.main(["check", str(dropped)]) == 0
    assert "invalidated" in capsys.readouterr().out
