"""dmuser.table: parsing, the kernel's table-level checks, device release on failure, splitting."""

from __future__ import annotations

import errno

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from support.data import make_image, pattern
from support.fakes import MemDevice
from support.system import fds_open_on
from support.targets import DictResolver, ProbeTarget, make_manager

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.errors import DmIOError, NotSupportedError, TableError
from dmuser.core.mapped_device import MappedDevice
from dmuser.core.table import TargetSpec, parse_table
from dmuser.core.target import StatusType

S = 512

# -- parse_table --------------------------------------------------------------------------


def test_parse_skips_comments_and_blank_lines() -> None:
    text = "# header\n\n   \n0 8 zero\n  # indented comment\n8 16 linear /dev/x 5\n\n"
    specs = parse_table(text)
    assert specs == [
        TargetSpec(0, 8, "zero", (), 4),
        TargetSpec(8, 16, "linear", ("/dev/x", "5"), 6),
    ]
    assert str(specs[1]) == "8 16 linear /dev/x 5"


def test_parse_tabs_and_repeated_spaces_separate_words() -> None:
    (spec,) = parse_table("0\t8   linear\t a  7")
    assert (spec.start, spec.length, spec.type_name, spec.args) == (0, 8, "linear", ("a", "7"))


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "  \n# x\n"])
def test_parse_empty_table(text: str) -> None:
    with pytest.raises(TableError, match="empty table"):
        parse_table(text)


@pytest.mark.parametrize("bad", ["12abc", "-1", "0x10", "+5", "1.5", str(1 << 64)])
def test_parse_bad_start(bad: str) -> None:
    with pytest.raises(TableError, match=r"line 2: invalid start sector"):
        parse_table(f"0 8 zero\n{bad} 8 zero")


@pytest.mark.parametrize("bad", ["12abc", "-1", "0x10", "+5", "x", str(1 << 64)])
def test_parse_bad_length(bad: str) -> None:
    with pytest.raises(TableError, match=r"line 1: invalid length"):
        parse_table(f"0 {bad} zero")


@pytest.mark.parametrize("text", ["0 8", "0", "zero"])
def test_parse_too_few_words(text: str) -> None:
    with pytest.raises(TableError, match="line 1: invalid format"):
        parse_table(text)


# -- Table.build: table-level errors ------------------------------------------------------


async def build_error(text: str, devices: dict | None = None) -> TableError:
    res = DictResolver(devices or {})
    with pytest.raises(TableError) as info:
        await res.build(text, md_name="vol")
    assert res.outstanding() == 0, "a failed build must release every device it acquired"
    return info.value


async def test_zero_length_target() -> None:
    exc = await build_error("0 0 zero")
    assert exc.message == "vol: zero-length target"
    assert exc.errno == errno.EINVAL


async def test_zero_length_checked_before_type() -> None:
    exc = await build_error("0 0 no-such-type")
    assert "zero-length target" in exc.message


async def test_unknown_target_type() -> None:
    exc = await build_error("0 8 no-such-type")
    assert exc.message == "vol: no-such-type: unknown target type"


@pytest.mark.parametrize(
    "text",
    ["8 8 zero",                     # first target not at 0
     "0 8 zero\n16 8 zero",          # gap
     "0 8 zero\n4 8 zero",           # overlap
     "0 8 zero\n0 8 zero"],          # duplicate start
)
async def test_gap_in_table(text: str) -> None:
    exc = await build_error(text)
    assert exc.message.startswith("vol: Gap in table")


async def test_linear_argument_count() -> None:
    devs = {"d": MemDevice(64)}
    for args in ["", "d", "d 0 1"]:
        exc = await build_error(f"0 8 linear {args}", devs)
        assert exc.message == "vol: linear: Invalid argument count"
        assert exc.errno == errno.EINVAL


@pytest.mark.parametrize("offset", ["x", "12abc", "-1", "0x10", str(1 << 64)])
async def test_linear_invalid_device_sector(offset: str) -> None:
    # the offset is checked before the device is looked up: "missing" does not exist
    exc = await build_error(f"0 8 linear missing {offset}")
    assert exc.message == "vol: linear: Invalid device sector"


async def test_linear_device_lookup_failed() -> None:
    exc = await build_error("0 8 linear missing 0")
    assert exc.message.startswith("vol: linear: Device lookup failed")


async def test_zero_takes_no_arguments() -> None:
    exc = await build_error("0 8 zero extra")
    assert exc.message == "vol: zero: No arguments required"


@pytest.mark.parametrize(
    ("offset", "length"),
    [(10, 8),    # end beyond device
     (16, 1),    # start == dev_size
     (17, 1),    # start beyond device
     (0, 17)],   # length beyond device
)
async def test_device_too_small(offset: int, length: int) -> None:
    exc = await build_error(f"0 {length} linear d {offset}", {"d": MemDevice(16, "memd")})
    assert exc.message == (f"vol: memd too small for target: start={offset}, len={length}, "
                           "dev_size=16")
    assert exc.errno == errno.EINVAL


async def test_device_exactly_big_enough() -> None:
    res = DictResolver({"d": MemDevice(16)})
    table = await res.build("0 8 linear d 8")
    assert table.nr_sectors == 8
    await table.close()
    assert res.outstanding() == 0


async def test_error_target_two_args_are_validated() -> None:
    devs = {"d": MemDevice(16, "memd")}
    exc = await build_error("0 8 error d x", devs)
    assert exc.message == "vol: error: Invalid device sector"
    exc = await build_error("0 8 error missing 0", devs)
    assert exc.message.startswith("vol: error: Device lookup failed")
    exc = await build_error("0 8 error d 12", devs)
    assert exc.message == "vol: memd too small for target: start=12, len=8, dev_size=16"
    res = DictResolver(devs)
    table = await res.build("0 8 error d 8")
    assert res.refs == {"d": 1}
    await table.close()
    assert res.refs == {"d": 0}


@pytest.mark.parametrize("args", ["", "a", "a b c", "whatever 12abc -1 x"])
async def test_error_target_other_counts_accepted(args: str) -> None:
    res = DictResolver({})
    table = await res.build(f"0 8 error {args}")
    assert [t.name for t in table.targets] == ["error"]
    assert res.refs == {}  # nothing looked up
    await table.close()


async def test_failed_later_target_releases_earlier_devices() -> None:
    res = DictResolver({"a": MemDevice(64), "b": MemDevice(64)})
    with pytest.raises(TableError, match="Device lookup failed"):
        await res.build("0 8 linear a 0\n8 8 linear b 0\n16 8 linear missing 0")
    assert res.refs == {"a": 0, "b": 0}
    assert len(res.released) == 2


async def test_failed_open_closes_and_releases() -> None:
    res = DictResolver({"a": MemDevice(64)})
    with pytest.raises(DmIOError, match="probe: open failed"):
        await res.build("0 8 linear a 0\n8 8 unit-probe 0 a 8 failopen")
    assert res.refs == {"a": 0}
    (probe,) = ProbeTarget.instances
    assert probe.events == ["open", "close"]


async def test_device_check_failure_closes_targets() -> None:
    res = DictResolver({"a": MemDevice(16, "small")})
    with pytest.raises(TableError, match="too small for target"):
        await res.build("0 8 unit-probe 0 a 0\n8 16 linear a 4")
    assert res.refs == {"a": 0}
    assert ProbeTarget.instances[0].closed


async def test_max_io_len_too_large() -> None:
    res = DictResolver({"a": MemDevice(64)})
    with pytest.raises(TableError, match="Maximum size of target IO is too large"):
        await res.build(f"0 8 linear a 0\n8 8 unit-probe {1 << 32} a 0")
    assert res.refs == {"a": 0}, "devices of the rejected target must be released too"
    assert ProbeTarget.instances[0].closed, "the rejected target must be destroyed"
    table = await res.build(f"0 8 unit-probe {(1 << 32) - 1}")
    await table.close()


async def test_failed_build_closes_backing_files(tmp_path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, 64 * S, seed=0)
    make_image(b, 64 * S, seed=0)
    mgr = make_manager()
    md = MappedDevice("vol")
    with pytest.raises(TableError, match="vol: zero: No arguments required"):
        await mgr.build_table(md, "0 8 linear a.img 0\n8 8 linear b.img 0\n16 8 zero x",
                              str(tmp_path))
    assert mgr._backing == {}
    assert fds_open_on(a) == 0
    assert fds_open_on(b) == 0


async def test_backing_files_shared_and_refcounted(tmp_path) -> None:
    a = tmp_path / "a.img"
    make_image(a, 64 * S, seed=0)
    mgr = make_manager()
    md = MappedDevice("vol")
    table = await mgr.build_table(md, f"0 8 linear a.img 0\n8 8 linear {a} 8", str(tmp_path))
    (entry,) = mgr._backing.values()
    assert entry[1] == 2
    assert table.targets[0].dev is table.targets[1].dev
    assert fds_open_on(a) == 1
    await table.close()
    assert mgr._backing == {}
    assert fds_open_on(a) == 0
    await table.close()  # idempotent
    assert mgr._backing == {}


async def test_lines_and_target_at() -> None:
    res = DictResolver({"d": MemDevice(64, "memd")})
    table = await res.build("0 8 linear d 16\n8 4 zero\n12 4 error a b c")
    assert table.lines(StatusType.TABLE) == ["0 8 linear memd 16", "8 4 zero ", "12 4 error "]
    assert table.lines(StatusType.INFO) == ["0 8 linear ", "8 4 zero ", "12 4 error "]
    assert [table.target_at(s).name for s in (0, 7, 8, 11, 12, 15)] == \
        ["linear", "linear", "zero", "zero", "error", "error"]
    with pytest.raises(DmIOError):
        table.target_at(16)
    await table.close()


# -- submit --------------------------------------------------------------------------------


async def test_submit_beyond_end_fails() -> None:
    res = DictResolver({})
    table = await res.build("0 8 zero")
    with pytest.raises(DmIOError, match="beyond end"):
        await table.submit(Bio.read(7, bytearray(1024)))
    with pytest.raises(DmIOError):
        await table.submit(Bio(Op.DISCARD, 8, 1))
    await table.submit(Bio.read(7, bytearray(512)))


async def test_submit_waits_for_all_pieces_then_fails() -> None:
    mem = MemDevice(8)
    res = DictResolver({"m": mem})
    table = await res.build("0 8 error\n8 8 linear m 0")
    data = pattern(1, 16 * S)
    with pytest.raises(DmIOError):
        await table.submit(Bio.write(0, data))
    # the linear half ran to completion although the error half failed
    assert bytes(mem.buf) == data[8 * 512:]


async def test_flush_reaches_flush_targets_only() -> None:
    m1, m2 = MemDevice(8), MemDevice(8)
    res = DictResolver({"m1": m1, "m2": m2})
    table = await res.build("0 8 linear m1 0\n8 8 zero\n16 8 error\n24 8 linear m2 0")
    await table.submit(Bio.flush())
    assert (m1.flushes, m2.flushes) == (1, 1)
    # PREFLUSH with data: flush everything, then write the data without the flag
    data = pattern(2, S)
    await table.submit(Bio.write(0, data, ReqFlag.PREFLUSH))
    assert (m1.flushes, m2.flushes) == (2, 2)
    assert bytes(m1.buf[:512]) == data


async def test_discard_and_write_zeroes_support() -> None:
    res = DictResolver({"m": MemDevice(8)})
    table = await res.build("0 8 linear m 0\n8 8 zero")
    await table.submit(Bio(Op.DISCARD, 0, 16))
    await table.submit(Bio(Op.WRITE_ZEROES, 0, 8))
    with pytest.raises(NotSupportedError):
        await table.submit(Bio(Op.WRITE_ZEROES, 4, 8))  # reaches the zero target


# -- splitting ----------------------------------------------------------------------------


async def test_split_at_target_boundaries() -> None:
    res = DictResolver({})
    table = await res.build("0 8 zero\n8 8 error\n16 8 zero")
    buf = bytearray(20 * 512)
    pieces = list(table.split(Bio.read(2, buf)))
    assert [(t.name, b.sector, b.nr_sectors) for t, b in pieces] == \
        [("zero", 2, 6), ("error", 8, 8), ("zero", 16, 6)]
    assert pieces[2][0] is table.targets[2]
    # a bio ending exactly at a boundary is one piece
    assert [(b.sector, b.nr_sectors) for _, b in table.split(Bio.read(8, bytearray(4096)))] == \
        [(8, 8)]


async def test_split_max_io_len_counted_from_target_begin() -> None:
    res = DictResolver({})
    table = await res.build("0 5 zero\n5 20 unit-probe 4")
    pieces = [(b.sector, b.nr_sectors) for _, b in table.split(Bio.read(0, bytearray(25 * 512)))]
    # multiples of 4 from sector 5 (9, 13, 17, 21), not from 0 (8, 12, ...)
    assert pieces == [(0, 5), (5, 4), (9, 4), (13, 4), (17, 4), (21, 4)]
    pieces = [(b.sector, b.nr_sectors) for _, b in table.split(Bio.read(10, bytearray(6 * 512)))]
    assert pieces == [(10, 3), (13, 3)]


async def test_submit_delivers_split_pieces_to_target() -> None:
    res = DictResolver({})
    table = await res.build("0 3 zero\n3 10 unit-probe 4")
    buf = bytearray(13 * 512)
    await table.submit(Bio.read(0, buf))
    (probe,) = ProbeTarget.instances
    assert sorted(probe.seen) == [(Op.READ, 3, 4), (Op.READ, 7, 4), (Op.READ, 11, 2)]
    # the probe's pattern landed in the caller's buffer at the right places
    for sector in range(3, 13):
        assert buf[sector * 512 : (sector + 1) * 512] == bytes([sector]) * 512
    assert buf[: 3 * 512] == bytes(3 * 512)


segments = st.lists(
    st.tuples(st.integers(1, 40), st.sampled_from([0, 0, 1, 2, 3, 4, 8, 16])),
    min_size=1, max_size=6)


@settings(max_examples=150, deadline=None, database=None)
@given(segs=segments, data=st.data())
def test_split_property(segs: list[tuple[int, int]],
                        data: st.DataObject) -> None:
    lines, start = [], 0
    for length, max_io in segs:
        lines.append(f"{start} {length} unit-probe {max_io}")
        start += length
    total = start
    table = trio.run(DictResolver({}).build, "\n".join(lines))
    begin = data.draw(st.integers(0, total - 1))
    nr = data.draw(st.integers(1, total - begin))
    buf = bytearray(nr * 512)
    bio = Bio.write(begin, buf)
    pieces = list(table.split(bio))

    pos = begin
    for target, piece in pieces:
        ti = target.ti
        assert piece.sector == pos, "pieces must be contiguous"
        assert piece.nr_sectors > 0
        assert ti.begin <= piece.sector and piece.end_sector <= ti.begin + ti.len, \
            "a piece must stay inside its target"
        if ti.max_io_len:
            rel = piece.sector - ti.begin
            assert rel // ti.max_io_len == (rel + piece.nr_sectors - 1) // ti.max_io_len, \
                "a piece must not cross a max_io_len multiple"
        # the piece's data is the matching slice of the original buffer
        assert piece.data is not None and len(piece.data) == piece.nr_sectors * 512
        piece.data[:1] = bytes([piece.sector & 0xFF or 1])
        assert buf[(piece.sector - begin) * 512] == (piece.sector & 0xFF or 1)
        assert piece.op is Op.WRITE
        pos = piece.end_sector
    assert pos == begin + nr, "pieces must cover the bio exactly"
    # maximal pieces: every cut is at a target end or a max_io_len multiple
    for target, piece in pieces[:-1]:
        ti = target.ti
        at_end = piece.end_sector == ti.begin + ti.len
        at_multiple = bool(ti.max_io_len) and (piece.end_sector - ti.begin) % ti.max_io_len == 0
        assert at_end or at_multiple
    trio.run(table.close)


async def test_close_continues_after_a_failing_target_close(
        monkeypatch: pytest.MonkeyPatch) -> None:
    res = DictResolver({"a": MemDevice(64), "b": MemDevice(64)})
    table = await res.build("0 8 linear a 0\n8 8 unit-probe 0\n16 8 linear b 0")

    async def broken_close(self: object) -> None:
        raise DmIOError("close failed")

    monkeypatch.setattr(ProbeTarget, "close", broken_close)
    with pytest.raises(DmIOError, match="close failed"):
        await table.close()
    assert res.refs == {"a": 0, "b": 0}
