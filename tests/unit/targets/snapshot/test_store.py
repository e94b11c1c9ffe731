"""Exception stores (dm-spec §3): the persistent store's on-disk format against the
independent reader (``support.oracles``, written from dm-spec §3.2 alone, so a format
bug in the store cannot hide behind a shared bug), reload, group commit, merge, and
the transient store."""

from __future__ import annotations

import struct

import pytest
from support.fakes import MemDevice
from support.oracles import cow_exceptions, first_data_chunks, read_cow
from support.targets import commit_one, new_store

from dmuser.core.errors import DmIOError
from dmuser.targets.snapshot.store import CowFullError, StoreArgError, StoreError, create_store
from dmuser.targets.snapshot.store.persistent import PersistentStore
from dmuser.targets.snapshot.store.transient import TransientStore

# -- persistent store ----------------------------------------------------------------------


async def test_new_store_writes_header_and_zero_area() -> None:
    cow = MemDevice(4096, "cow")
    cow.buf[:] = b"\xaa" * len(cow.buf)
    cow.buf[:4096] = bytes(4096)  # lvcreate zeroed the header chunk only
    store, cow, loaded = await new_store(cow=cow)
    assert loaded == {}
    assert bytes(cow.buf[:16]) == b"SnAp" + struct.pack("<III", 1, 1, 8)
    assert bytes(cow.buf[16:4096]) == bytes(4080)
    assert bytes(cow.buf[4096:8192]) == bytes(4096)          # area 0 zeroed
    assert bytes(cow.buf[8192:8200]) == b"\xaa" * 8          # data chunks untouched
    assert store.usage() == (16, 4096, 16)
    assert store.table_fragment() == " P 8"


async def test_allocation_skips_metadata_chunks() -> None:
    store, _, _ = await new_store(cow_sectors=8 * 1200)
    got = [store.prepare_exception() for _ in range(700)]
    assert got == first_data_chunks(700, 8)
    assert 258 not in got and 515 not in got
    assert got[255:258] == [257, 259, 260]


async def test_commit_round_trip_through_spec_decoder_and_reload() -> None:
    store, cow, _ = await new_store(cow_sectors=8 * 1200)
    expect = {}
    for i in range(600):
        old = 10_000 + 7 * i
        expect[old] = await commit_one(store, old)
    img = read_cow(bytes(cow.buf))
    assert img.magic == 0x70416E53 and img.valid == 1 and img.version == 1
    assert dict(img.records) == expect and len(img.areas) == 3
    assert store.usage() == (first_data_chunks(601, 8)[-1] * 8, 8 * 1200, 32)
    # a second activation finds the same state
    again, _, loaded = await new_store(cow=cow)
    assert loaded == expect
    assert (again.next_free, again.current_area, again.current_committed) == \
        (store.next_free, store.current_area, store.current_committed)
    assert again.usage() == store.usage()
    # and continues where the first left off
    assert again.prepare_exception() == store.prepare_exception()


async def test_group_commit_one_flush_per_batch() -> None:
    store, cow, _ = await new_store()
    news = [store.prepare_exception() for _ in range(3)]
    flushes = cow.flushes
    assert await store.commit_exception(5, news[0], True, "a") == []
    assert await store.commit_exception(6, news[1], True, "b") == []
    assert cow.flushes == flushes                      # nothing written yet
    assert cow_exceptions(bytes(cow.buf)) == {}
    assert await store.commit_exception(7, news[2], True, "c") == \
        [("a", True), ("b", True), ("c", True)]
    assert cow.flushes == flushes + 1
    assert cow_exceptions(bytes(cow.buf)) == {5: 2, 6: 3, 7: 4}


async def test_full_area_zeroes_next_area_and_commits_without_waiting() -> None:
    cow = MemDevice(8 * 600, "cow")
    store, cow, _ = await new_store(cow=cow)
    cow.buf[258 * 4096:259 * 4096] = b"\xff" * 4096     # garbage where area 1 will be
    news = [store.prepare_exception() for _ in range(257)]  # one more stays pending
    for i in range(255):
        assert await store.commit_exception(i, news[i], True, i) == []
    done = await store.commit_exception(255, news[255], True, 255)
    assert len(done) == 256 and all(ok for _, ok in done)  # the full area was written
    assert bytes(cow.buf[258 * 4096:259 * 4096]) == bytes(4096)
    assert (store.current_area, store.current_committed) == (1, 0)
    assert await store.commit_exception(999, news[256], True, "x") == [("x", True)]
    assert cow_exceptions(bytes(cow.buf))[999] == 259


async def test_partial_last_area_ignores_stale_records() -> None:
    store, cow, _ = await new_store()
    for old in (3, 4, 5):
        await commit_one(store, old)
    # a stale record after the terminator (e.g. left by a torn write) at index 4
    struct.pack_into("<QQ", cow.buf, 4096 + 4 * 16, 77, 40)
    again, _, loaded = await new_store(cow=cow)
    assert loaded == {3: 2, 4: 3, 5: 4}
    assert again.next_free == 5 and again.current_committed == 3
    # uncommitted copies are forgotten and their chunks handed out again
    assert await commit_one(again, 6) == 5
    # and the stale record does not come back when the list reaches the slot before it
    assert cow_exceptions(bytes(cow.buf)) == {3: 2, 4: 3, 5: 4, 6: 5}


async def test_invalidation_is_durable() -> None:
    store, cow, _ = await new_store()
    await commit_one(store, 1)
    await store.drop_snapshot()
    assert struct.unpack_from("<IIII", cow.buf, 0) == (0x70416E53, 0, 1, 8)
    again, _, loaded = await new_store(cow=cow)
    assert again.loaded_valid is False and loaded == {}  # type: ignore[attr-defined]


async def test_failed_copy_or_write_invalidates() -> None:
    store, cow, _ = await new_store()
    new = store.prepare_exception()
    assert await store.commit_exception(1, new, False, "a") == [("a", False)]
    assert not store.valid
    store2, cow2, _ = await new_store()
    new = store2.prepare_exception()
    cow2.fail_sectors.add(8)  # area 0
    assert await store2.commit_exception(1, new, True, "b") == [("b", False)]
    cow2.fail_sectors.clear()
    new = store2.prepare_exception()
    assert await store2.commit_exception(2, new, True, "c") == [("c", False)]


async def test_cow_full() -> None:
    store, _, _ = await new_store(cow_sectors=8 * 4)
    assert [store.prepare_exception(), store.prepare_exception()] == [2, 3]
    with pytest.raises(CowFullError):
        store.prepare_exception()


async def test_default_and_on_disk_chunk_size(caplog: pytest.LogCaptureFixture) -> None:
    store, cow, _ = await new_store(cs=0)
    assert store.chunk_size == 32 and store.usage() == (64, 4096, 64)
    again, _, _ = await new_store(cow=cow, cs=16)
    assert again.chunk_size == 32 and again.table_fragment() == " P 32"
    assert "chunk size 32 in device metadata overrides table chunk size of 16." in caplog.text


@pytest.mark.parametrize("header,text", [
    (struct.pack("<IIII", 0x12345678, 1, 1, 8), "Invalid or corrupt snapshot"),
    (struct.pack("<IIII", 0x70416E53, 1, 2, 8), "version"),
    (struct.pack("<IIII", 0x70416E53, 1, 1, 12), "invalid on-disk chunk size"),
])
async def test_bad_header(header: bytes, text: str) -> None:
    cow = MemDevice(4096, "cow")
    cow.buf[:16] = header
    with pytest.raises(StoreError, match=text):
        await new_store(cow=cow)


async def test_unreadable_metadata() -> None:
    cow = MemDevice(4096, "cow")
    cow.fail_sectors.add(0)
    with pytest.raises(StoreError):
        await new_store(cow=cow)


async def test_merge_runs_newest_first() -> None:
    store, cow, _ = await new_store()
    for old in (100, 101, 102, 50, 51, 7):
        await commit_one(store, old)
    assert await store.prepare_merge() == (1, 7, 7)
    await store.commit_merge(1)
    assert await store.prepare_merge() == (2, 51, 6)
    await store.commit_merge(2)
    assert await store.prepare_merge() == (3, 102, 4)
    await store.commit_merge(3)
    assert store.usage() == (16, 4096, 16)
    assert await store.prepare_merge() == (0, 0, 0)
    assert cow_exceptions(bytes(cow.buf)) == {}


async def test_merge_walks_back_over_areas() -> None:
    store, cow, _ = await new_store(cow_sectors=8 * 600)
    for i in range(258):
        await commit_one(store, 2 * i)  # never consecutive in old
    assert store.current_area == 1
    total = 0
    while True:
        n, _, _ = await store.prepare_merge()
        if not n:
            break
        await store.commit_merge(n)
        total += n
    assert total == 258 and cow_exceptions(bytes(cow.buf)) == {}
    assert store.usage() == (16, 8 * 600, 16)


@pytest.mark.parametrize("words,error", [
    (["P"], "Insufficient exception store arguments"),
    (["X", "8"], "Exception store type is not P or N"),
    (["P", "8x"], "Invalid chunk size"),
    (["P", "-8"], "Invalid chunk size"),
    (["P", "12"], "Chunk size is not a power of 2"),
    (["P", str(1 << 22)], "Chunk size is too high"),
    (["Px", "8"], "Exception store type constructor failed"),
])
def test_create_store_errors(words: list[str], error: str) -> None:
    with pytest.raises(StoreArgError) as info:
        create_store(words, MemDevice(64), MemDevice(64))
    assert info.value.message == error


@pytest.mark.parametrize("word,cls,fragment", [
    ("p", PersistentStore, " P 8"), ("PO", PersistentStore, " PO 8"),
    ("poxyz", PersistentStore, " PO 8"), ("N", TransientStore, " N 8"),
    ("nfoo", TransientStore, " N 8"),
])
def test_create_store_types(word: str, cls: type, fragment: str) -> None:
    store = create_store([word, "8"], MemDevice(64), MemDevice(64))
    assert type(store) is cls and store.table_fragment() == fragment
    assert (store.chunk_mask, store.chunk_shift) == (7, 3)
    assert create_store([word, str(1 << 21)], MemDevice(64), MemDevice(64)).chunk_shift == 21


# -- transient store -----------------------------------------------------------------------


async def test_transient_store() -> None:
    cow = MemDevice(48, "cow")
    store = create_store(["N", "16"], cow, MemDevice(64))
    assert await store.read_metadata(lambda o, n: None) is True
    assert store.usage() == (0, 48, 0)
    assert [store.prepare_exception() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(CowFullError):
        store.prepare_exception()
    assert await store.commit_exception(9, 0, True, "a") == [("a", True)]
    assert await store.commit_exception(9, 1, False, "b") == [("b", False)]
    assert store.usage() == (48, 48, 0)
    assert bytes(cow.buf) == bytes(48 * 512)  # nothing written


async def test_store_io_error_on_header_write() -> None:
    cow = MemDevice(4096, "cow")
    cow.fail_sectors.add(0)
    store = create_store(["P", "8"], cow, MemDevice(64))
    with pytest.raises(StoreError):
        await store.read_metadata(lambda o, n: None)
    assert isinstance(StoreError("x"), Exception) and not isinstance(StoreError("x"), DmIOError)
