"""Damaged persistent COW devices: the loader and ``dmuser cow check`` agree, and refuse clearly.

The fixed cases are the five kinds of impossible exception record that once
activated silently (a record past the device, into the header, into a
metadata area, an origin chunk twice, a COW chunk twice, random bytes in an
area).  The seeded loop then corrupts a valid two-area COW image at random
(header fields, single records, whole areas, truncation) and feeds each image
to the persistent store's loader and to ``dmuser cow check``:

* neither may raise anything but the loader's :class:`StoreError`;
* the loader refuses exactly the images the checker calls damaged (or that
  are not a valid snapshot header), naming the metadata area and record;
* an image the loader accepts loads consistently: every exception points at
  a data chunk inside the device, no chunk twice, and the usage ``dmsetup
  status`` would show matches the checker's.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from support.fakes import MemDevice
from support.fuzz import FuzzCounts, fuzz_rng, iterations

from dmuser import cow_tool
from dmuser.formats.cow import (
    SNAP_MAGIC,
    area_location,
    encode_header,
    exceptions_per_area,
    is_metadata_chunk,
    pack_record,
)
from dmuser.targets.snapshot.store import StoreError
from dmuser.targets.snapshot.store.persistent import PersistentStore

CS = 8                      # chunk size in sectors (4 KiB chunks, 256 records an area)
PER_AREA = exceptions_per_area(CS)
DEVICE_CHUNKS = 1200        # room for two full areas of data and a third area
RECORDS = PER_AREA + 40     # area 0 full, area 1 partly used


def valid_image() -> bytearray:
    """A COW as dmuser or the kernel writes it: RECORDS exceptions over two areas."""
    img = bytearray(DEVICE_CHUNKS * CS * 512)
    img[: CS * 512] = encode_header(True, CS)
    new = 2
    for i in range(RECORDS):
        area, index = divmod(i, PER_AREA)
        if is_metadata_chunk(CS, new):
            new += 1
        buf = bytearray(CS * 512)
        start = area_location(CS, area) * CS * 512
        buf[:] = img[start : start + CS * 512]
        pack_record(buf, index, 3 * i + 1, new)
        img[start : start + CS * 512] = buf
        new += 1
    return img


def set_record(img: bytearray, area: int, index: int, old: int, new: int) -> None:
    struct.pack_into("<QQ", img, area_location(CS, area) * CS * 512 + 16 * index, old, new)


async def load(img: bytes) -> tuple[bool, dict[int, int] | str, PersistentStore]:
    """Run the loader on ``img``: (loaded, exceptions or the error text, store)."""
    cow = MemDevice(len(img) // 512, "cow")
    cow.buf[:] = img
    store = PersistentStore(cow, MemDevice(DEVICE_CHUNKS * CS, "origin"), CS, "")
    found: dict[int, int] = {}
    try:
        await store.read_metadata(lambda old, new: found.__setitem__(old, new))
    except StoreError as exc:
        return False, exc.message, store
    return True, found, store


def check(tmp_path: Path, img: bytes) -> cow_tool.CowReport:
    path = tmp_path / "cow.img"
    path.write_bytes(img)
    return cow_tool.analyse(str(path), check=True)


# -- the fixed cases -------------------------------------------------------------------


def _beyond(img: bytearray) -> None:
    set_record(img, 1, 5, 999_999, DEVICE_CHUNKS + 7)


def _first_area(img: bytearray) -> None:
    set_record(img, 1, 5, 999_999, 1)  # chunk 1, right after the header: area 0


def _area(img: bytearray) -> None:
    set_record(img, 1, 5, 999_999, area_location(CS, 1))


def _twice_origin(img: bytearray) -> None:
    set_record(img, 1, 5, 1, 1100)  # origin chunk 1 already has record 0 of area 0


def _twice_cow(img: bytearray) -> None:
    set_record(img, 1, 5, 999_999, 2)  # COW chunk 2 belongs to record 0 of area 0


def _random_area(img: bytearray) -> None:
    start = area_location(CS, 1) * CS * 512
    img[start : start + CS * 512] = random.Random(7).randbytes(CS * 512)


FIXED = {
    "past the end of the COW device": (_beyond, "metadata area 1 record 5: COW chunk "
                                       f"{DEVICE_CHUNKS + 7} lies beyond the end"),
    "into a metadata area": (_area, "metadata area 1 record 5: COW chunk "
                             f"{area_location(CS, 1)} is a metadata area"),
    "into the first metadata area, next to the header": (
        _first_area, "metadata area 1 record 5: COW chunk 1 is a metadata area"),
    "an origin chunk twice": (_twice_origin, "metadata area 1 record 5: origin chunk 1 "
                              "already has an exception (metadata area 0 record 0)"),
    "a COW chunk twice": (_twice_cow, "metadata area 1 record 5: COW chunk 2 is already used "
                          "by metadata area 0 record 0"),
    "random bytes in an area": (_random_area, "metadata area 1 record 0: "),
}


@pytest.mark.parametrize("case", FIXED)
async def test_impossible_records_are_refused_by_loader_and_checker(
        tmp_path: Path, case: str) -> None:
    damage, expected = FIXED[case]
    img = valid_image()
    damage(img)
    loaded, result, _ = await load(bytes(img))
    assert not loaded and isinstance(result, str)
    assert result.startswith("damaged metadata: " + expected), result
    report = check(tmp_path, bytes(img))
    assert report.problems and report.problems[0].startswith(expected), report.problems


async def test_a_terminator_inside_a_full_area_only_shortens_the_list(tmp_path: Path) -> None:
    """A record cannot name the header chunk: new_chunk 0 ends the list (the
    kernel's format).  Such a record is not damage: the list is shorter, and
    loader and checker agree on it."""
    img = valid_image()
    set_record(img, 0, 3, 999_999, 0)
    loaded, result, _ = await load(bytes(img))
    assert loaded and isinstance(result, dict) and len(result) == 3
    report = check(tmp_path, bytes(img))
    assert not report.problems and report.exceptions == 3


async def test_the_valid_image_loads(tmp_path: Path) -> None:
    loaded, result, store = await load(bytes(valid_image()))
    assert loaded and isinstance(result, dict) and len(result) == RECORDS
    report = check(tmp_path, bytes(valid_image()))
    assert not report.problems and report.exceptions == RECORDS
    allocated, total, metadata = store.usage()
    assert report.usage == f"{allocated}/{total} {metadata}"


# -- the seeded random corruption ------------------------------------------------------


def mutate(rng: random.Random, img: bytearray) -> tuple[str, bytearray]:
    """One random corruption of a valid image: (what was done, the new image)."""
    kind = rng.choice(["header-field", "record", "record-field", "area-bytes", "flip",
                       "truncate", "terminator"])
    if kind == "header-field":
        field = rng.randrange(4)
        value = rng.choice([0, 1, 2, 7, 16, 64, SNAP_MAGIC, 0xFFFFFFFF, rng.getrandbits(32)])
        struct.pack_into("<I", img, 4 * field, value)
        return f"header field {field} = {value:#x}", img
    area = rng.randrange(2)
    count = PER_AREA if area == 0 else RECORDS - PER_AREA
    index = rng.randrange(count)
    if kind == "record":
        old = rng.choice([rng.getrandbits(64), rng.randrange(4 * RECORDS), 1])
        new = rng.choice([rng.getrandbits(64), rng.randrange(DEVICE_CHUNKS + 50), 2,
                          area_location(CS, rng.randrange(3)), 1])
        set_record(img, area, index, old, new)
        return f"area {area} record {index} = ({old}, {new})", img
    if kind == "record-field":
        offset = area_location(CS, area) * CS * 512 + 16 * index + 8 * rng.randrange(2)
        struct.pack_into("<Q", img, offset, rng.getrandbits(rng.choice([8, 16, 64])))
        return f"area {area} record {index} field", img
    if kind == "area-bytes":
        start = area_location(CS, area) * CS * 512
        n = rng.choice([16, 512, CS * 512])
        img[start : start + n] = rng.randbytes(n)
        return f"area {area}: {n} random bytes", img
    if kind == "flip":
        where = rng.choice([0, area_location(CS, area) * CS * 512]) + rng.randrange(CS * 512)
        img[where] ^= 1 << rng.randrange(8)
        return f"bit flip at byte {where}", img
    if kind == "truncate":
        chunks = rng.choice([1, 2, area_location(CS, 1), area_location(CS, 1) + 1,
                             rng.randrange(1, DEVICE_CHUNKS)])
        return f"truncated to {chunks} chunks", img[: chunks * CS * 512]
    set_record(img, area, index, 0, 0)
    return f"terminator at area {area} record {index}", img


async def test_random_cow_corruption(tmp_path: Path, fuzz_counts: FuzzCounts) -> None:
    rng = fuzz_rng("cow")
    base = valid_image()
    for i in range(iterations(300)):
        what, img = mutate(rng, bytearray(base))
        label = f"input {i} ({what})"
        loaded, result, store = await load(bytes(img))
        report = check(tmp_path, bytes(img))
        header_ok = report.magic == SNAP_MAGIC and report.exceptions_per_area > 0 \
            and report.valid and not report.state.startswith("unsupported")
        if not loaded:
            assert isinstance(result, str) and result and "\n" not in result, label
            assert report.problems or not header_ok, f"{label}: loader refused, check ok"
            fuzz_counts.add("cow", "rejected")
            continue
        assert isinstance(result, dict)
        fuzz_counts.add("cow", "loaded")
        if report.magic == 0 or not report.valid:
            continue  # a new store (initialised) or an invalid one (nothing loaded)
        assert not report.problems, f"{label}: loaded, but check says {report.problems}"
        chunks = len(img) // (CS * 512)
        assert all(new < chunks and not is_metadata_chunk(CS, new)
                   for new in result.values()), label
        assert len(set(result.values())) == len(result), label
        allocated, total, metadata = store.usage()
        assert report.usage == f"{allocated}/{total} {metadata}", label
