"""dmuser's persistent COW format (``dmuser.formats.cow``, written by the persistent
store) read back by the independent reader, ``support.oracles.read_cow``.

The reader is written from dm-spec §3.2 alone (it imports nothing of dmuser):
header chunk 0 (le32 magic 0x70416E53 "SnAp", le32 valid, le32 version 1, le32
chunk size, rest zero), metadata areas of ``chunk_size * 32`` records ``(le64
old, le64 new)`` at chunk ``1 + k * (per_area + 1)``, each followed by its data
chunks; the first record with ``new == 0`` ends the list, an area without one
is full and the list goes on in the next area.

dmuser writes the COW in process (DeviceManager + control.dispatch on image
files in a temp dir): a snapshot is taken, then origin writes (copy-outs) and
snapshot writes (partial chunks: copy then write; whole chunks: the write is
the copy) are issued concurrently, with enough chunks to fill more than one
area.  Every record is then checked against the snapshot target's in-memory
table, the layout rules, and the data: the COW chunk at ``new`` holds the
snapshot's content of origin chunk ``old`` -- the origin's pre-write data where
the snapshot itself did not write.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
from support.oracles import COW_MAGIC, COW_VERSION, area_chunk, read_cow
from support.targets import make_manager

from dmuser.control import dispatch
from dmuser.core.bio import Bio
from dmuser.core.manager import DeviceManager

SECTOR = 512


# -- dmuser writes a COW --------------------------------------------------------------------


async def run(mgr: DeviceManager, verb: str, **req: Any) -> Any:
    return (await dispatch(mgr, {"verb": verb, **req})).data


CASES = [
    # chunk size (sectors), origin chunks (+ extra sectors: a partial last chunk)
    pytest.param(8, 700, 0, id="chunk8-3areas"),
    pytest.param(16, 600, 5, id="chunk16-2areas-partial-last"),
    pytest.param(32, 1100, 0, id="chunk32-2areas"),
    pytest.param(64, 200, 40, id="chunk64-1area-partial-last"),
]


@pytest.mark.parametrize(("cs", "nchunks", "extra"), CASES)
async def test_dmuser_cow_matches_independent_reader(tmp_path: Path, cs: int, nchunks: int,
                                                     extra: int) -> None:
    rng = random.Random(cs * 1000 + nchunks)
    chunk_bytes = cs * SECTOR
    nr = nchunks * cs + extra
    base = rng.randbytes(nr * SECTOR)
    (tmp_path / "origin.img").write_bytes(base)
    # garbage everywhere but the header chunk, so that a chunk never written shows
    cow_chunks = nchunks + 1 + 4 + nchunks // (cs * 32)
    (tmp_path / "cow.img").write_bytes(bytes(chunk_bytes)
                                       + rng.randbytes((cow_chunks - 1) * chunk_bytes))
    origin_now = bytearray(base)
    snap_view = bytearray(base)      # the snapshot's content: base + its own writes
    snap_written: set[int] = set()   # chunks the snapshot itself wrote to

    mgr = make_manager()
    cwd = str(tmp_path)
    try:
        await run(mgr, "create", name="origin", cwd=cwd,
                  table=f"0 {nr} snapshot-origin origin.img")
        await run(mgr, "suspend", name="origin")
        await run(mgr, "create", name="snap", cwd=cwd,
                  table=f"0 {nr} snapshot origin.img cow.img P {cs}")
        await run(mgr, "resume", name="origin")
        origin_md, snap_md = mgr.get("origin"), mgr.get("snap")

        # Most chunks get an origin write, a few a snapshot write, in random order;
        # writes run concurrently (several exceptions in flight: group commits).
        chunks = list(range(nchunks + (1 if extra else 0)))
        rng.shuffle(chunks)
        ops = []
        for i, c in enumerate(chunks):
            start = c * cs
            length = min(cs, nr - start)
            kind = i % 10
            if kind == 7:    # snapshot, part of a chunk: copy first, then write
                off, n = 1, max(1, length // 2)
                ops.append(("snap", start + off, rng.randbytes(n * SECTOR)))
            elif kind == 8 and length == cs:  # snapshot, one whole chunk: no copy
                ops.append(("snap", start, rng.randbytes(cs * SECTOR)))
            else:            # origin, part or all of the chunk
                off = rng.randrange(length)
                n = rng.randint(1, length - off)
                ops.append(("origin", start + off, rng.randbytes(n * SECTOR)))
        # a write spanning several chunks, and a second write to a copied chunk
        ops.append(("origin", 3 * cs - 2, rng.randbytes(4 * cs * SECTOR)))
        ops.append(("origin", chunks[0] * cs, rng.randbytes(SECTOR)))

        for dev, sector, data in ops:
            lo, hi = sector * SECTOR, sector * SECTOR + len(data)
            if dev == "origin":
                origin_now[lo:hi] = data
            else:
                snap_view[lo:hi] = data
                snap_written.update(range(sector // cs, (hi // SECTOR - 1) // cs + 1))

        sem = trio.Semaphore(16)

        async def issue(dev: str, sector: int, data: bytes) -> None:
            async with sem:
                md = origin_md if dev == "origin" else snap_md
                await md.submit(Bio.write(sector, bytearray(data)))

        # ops touching the same chunk must stay ordered: concurrency only between batches
        # of distinct chunks
        batch: list[tuple[str, int, bytes]] = []
        touched: set[int] = set()
        batches = []
        for op in ops:
            _, sector, data = op
            span = set(range(sector // cs, (sector + len(data) // SECTOR - 1) // cs + 1))
            if span & touched:
                batches.append(batch)
                batch, touched = [], set()
            batch.append(op)
            touched |= span
        batches.append(batch)
        for batch in batches:
            async with trio.open_nursery() as nursery:
                for op in batch:
                    nursery.start_soon(issue, *op)

        await origin_md.submit(Bio.flush())  # commits the held origin writes' exceptions
        target = snap_md.live.targets[0]  # type: ignore[union-attr]
        in_memory = dict(target.snap.complete.items())
        status = (await run(mgr, "status", name="snap"))["snap"][0].split()
        buf = bytearray(nr * SECTOR)
        await snap_md.submit(Bio.read(0, buf))
        assert bytes(buf) == bytes(snap_view), "the snapshot device's content"
        await run(mgr, "remove", name="snap")
        await run(mgr, "remove", name="origin")
    finally:
        for name in ("snap", "origin"):
            if name in mgr.devices:
                await mgr.remove(name, force=True)

    assert (tmp_path / "origin.img").read_bytes() == bytes(origin_now)

    # -- decode and check ----------------------------------------------------------------
    raw = (tmp_path / "cow.img").read_bytes()
    cow = read_cow(raw)
    assert raw[:4] == b"SnAp"
    assert (cow.magic, cow.valid, cow.version, cow.chunk_size) == (COW_MAGIC, 1, COW_VERSION, cs)
    assert cow.header_rest_zero
    per_area = cs * 32
    assert cow.per_area == per_area

    records = cow.records
    n = len(records)
    assert n == nchunks + (1 if extra else 0), "one exception per chunk written"
    assert len(cow.areas) == n // per_area + 1
    if cs <= 32:
        assert len(cow.areas) >= 2, "the test should fill more than one area"
    for k, (idx, loc, recs, end) in enumerate(cow.areas):
        assert idx == k and loc == 1 + k * (per_area + 1)
        if k < len(cow.areas) - 1:
            assert end is None and len(recs) == per_area, f"area {k} is full"
        else:
            # end of list: the last area has a terminator (after a full area, the next
            # one was zeroed and its record 0 ends the list)
            assert end == len(recs) == n - k * per_area
    assert cow.stale == [], "nothing but zeros after the terminator"

    # the records are dmuser's in-memory table
    assert dict(records) == in_memory
    assert len({old for old, _ in records}) == n
    # new chunks: handed out in order, never the header nor an area, inside the COW
    area_chunks = {loc for _, loc, _, _ in cow.areas} | {area_chunk(per_area, len(cow.areas))}
    for j, (old, new) in enumerate(records):
        assert new == 2 + j + j // per_area, (j, old, new)
        assert new != 0 and new % (per_area + 1) != 1 and new not in area_chunks
        assert (new + 1) * chunk_bytes <= len(raw)

    # status: <next_free * cs>/<cow sectors> <(current_area + 2) * cs>
    next_free = records[-1][1] + 1
    if next_free % (per_area + 1) == 1:
        next_free += 1
    assert status[3:] == [f"{next_free * cs}/{len(raw) // SECTOR}",
                          str((len(cow.areas) - 1 + 2) * cs)]

    # data: the COW chunk holds the snapshot's content of the origin chunk -- the
    # origin's pre-write data wherever the snapshot did not write itself
    for old, new in records:
        lo = old * chunk_bytes
        hi = min(lo + chunk_bytes, nr * SECTOR)  # a partial last chunk: only what exists
        got = cow.chunk(raw, new)[:hi - lo]
        assert got == bytes(snap_view[lo:hi]), f"COW chunk {new} (origin chunk {old})"
        if old not in snap_written:
            assert got == base[lo:hi], f"COW chunk {new}: pre-write origin data"
            assert got != bytes(origin_now[lo:hi]), f"origin chunk {old} was overwritten"


# -- the reader itself ------------------------------------------------------------------------


def test_reader_rejects_what_is_not_a_cow() -> None:
    assert read_cow(bytes(4096)).magic == 0
    assert read_cow(b"\xde\xad\xbe\xef" + bytes(4092)).magic != COW_MAGIC
    # a full area continues into the next one; a terminator in record 0 ends at once
    cs, per = 1, 32
    raw = bytearray(SECTOR * (2 + 2 * (per + 1)))
    struct.pack_into("<IIII", raw, 0, COW_MAGIC, 1, 1, cs)
    for i in range(per):
        struct.pack_into("<QQ", raw, SECTOR + 16 * i, 100 + i, 2 + i)
    cow = read_cow(bytes(raw))
    assert [len(a[2]) for a in cow.areas] == [per, 0] and cow.areas[1][1] == 1 + per + 1
