"""dmuser.status: typed status, table and info objects, against the kernel's own strings
(the golden ``statuses`` vector) and the states a snapshot or a mirror can be in."""

from __future__ import annotations

import doctest

import pytest
from support.vectors import status_examples

import dmuser.status
import dmuser.tables
from dmuser.status import (
    DeviceInfo,
    EmptyStatus,
    FlakeyTable,
    LinearTable,
    MirrorStatus,
    MirrorTable,
    RawStatus,
    RawTable,
    SnapshotMergeStatus,
    SnapshotOriginTable,
    SnapshotStatus,
    SnapshotTable,
    parse_status,
    parse_table,
)


def _kernel_lines(target_type: str) -> list[tuple[str, str]]:
    """(status line, table line) pairs the kernel printed for ``target_type``."""
    out = []
    for e in status_examples(target_type):
        if e["create_rc"] == 0:
            for key in ("dmsetup_status_right_after_create", "dmsetup_status_at_end"):
                out.append((e[key].rstrip("\n"), e["dmsetup_table"].rstrip("\n")))
    assert out, target_type
    return out


@pytest.mark.parametrize("target_type", ["linear", "zero", "error", "flakey",
                                         "snapshot-origin"])
def test_kernel_strings_of_targets_that_report_nothing(target_type: str) -> None:
    for status, table in _kernel_lines(target_type):
        st = parse_status(status)
        assert isinstance(st, EmptyStatus) and st.params == () and st.target_type == target_type
        t = parse_table(table)
        assert str(t) == table.rstrip()
        if target_type == "linear":
            assert isinstance(t, LinearTable) and (t.device, t.offset) == ("254:0", 2048)
        elif target_type == "flakey":
            assert isinstance(t, FlakeyTable) and t.device == "254:0"
        elif target_type == "snapshot-origin":
            assert isinstance(t, SnapshotOriginTable) and t.origin == "254:0"
        else:
            assert type(t) is RawTable and t.args == ()


def test_kernel_flakey_tables() -> None:
    tables = {parse_table(table) for _, table in _kernel_lines("flakey")}
    got = {(t.up_interval, t.down_interval, t.features) for t in tables
           if isinstance(t, FlakeyTable)}
    assert got == {(5, 5, ()), (0, 10, ("corrupt_bio_byte", "32", "w", "1", "0")),
                   (0, 10, ("drop_writes",))}


def test_kernel_snapshot_strings() -> None:
    seen = set()
    for status, table in _kernel_lines("snapshot"):
        st = parse_status(status)
        assert isinstance(st, SnapshotStatus) and st.valid and not st.invalid
        seen.add((st.used_sectors, st.total_sectors, st.metadata_sectors))
        t = parse_table(table)
        assert isinstance(t, SnapshotTable) and t.origin == "254:0" and t.features == ()
        assert (t.mode, t.chunk_size, t.persistent) in {("P", 8, True), ("N", 16, False)}
    assert seen == {(16, 8192, 16), (24, 8192, 16), (0, 8192, 0), (32, 8192, 0)}


def test_snapshot_states() -> None:
    for text, state in (("Invalid", "invalid"), ("Overflow", "overflow"),
                        ("Merge failed", "merge_failed")):
        st = parse_status(f"0 32768 snapshot {text}")
        assert isinstance(st, SnapshotStatus) and st.state == state and not st.valid
        assert (st.used_sectors, st.total_sectors, st.metadata_sectors) == (None, None, None)
    assert parse_status("0 32768 snapshot Invalid").invalid
    assert parse_status("0 32768 snapshot Overflow").overflow
    assert parse_status("0 32768 snapshot Merge failed").merge_failed
    m = parse_status("0 32768 snapshot-merge Merge failed")
    assert isinstance(m, SnapshotMergeStatus) and m.merge_failed and m.remaining_sectors is None


def test_snapshot_merge_progress() -> None:
    m = parse_status("0 32768 snapshot-merge 40/8192 16")
    assert isinstance(m, SnapshotMergeStatus)
    assert (m.remaining_sectors, m.merged) == (24, False)
    done = parse_status("0 32768 snapshot-merge 16/8192 16")
    assert isinstance(done, SnapshotMergeStatus) and done.merged
    t = parse_table("0 32768 snapshot-merge 254:0 254:16 P 8 1 discard_zeroes_cow")
    assert isinstance(t, SnapshotTable) and t.features == ("discard_zeroes_cow",)


def test_kernel_mirror_strings() -> None:
    for status, table in _kernel_lines("mirror"):
        st = parse_status(status)
        assert isinstance(st, MirrorStatus)
        assert [(leg.device, leg.health) for leg in st.legs] == [("254:0", "A"), ("254:64", "A")]
        assert (st.in_sync_regions, st.total_regions, st.in_sync, st.degraded) == (8, 8, True,
                                                                                    False)
        t = parse_table(table)
        assert isinstance(t, MirrorTable) and t.legs[0][0] == "254:0" and t.features == ()
        if st.log_type == "disk":
            assert (st.log_device, st.log_health, st.log_args) == ("254:48", "A", ("254:48", "A"))
            assert t.log_type == "disk" and t.log_args == ("254:48", "1024")
        else:
            assert st.log_type == "core" and st.log_device is None and st.log_args == ()
            assert t.log_type == "core" and t.log_args[0] == "1024"


def test_mirror_states() -> None:
    st = parse_status("0 8192 mirror 3 a b c 5/8 1 ADS 3 disk l F")
    assert isinstance(st, MirrorStatus)
    assert [leg.alive for leg in st.legs] == [True, False, False] and st.degraded
    assert (st.in_sync, st.log_health) == (False, "F")
    t = parse_table("0 8192 mirror disk 3 l 128 nosync 2 a 0 b 8 2 handle_errors keep_log")
    assert isinstance(t, MirrorTable)
    assert t.log_args == ("l", "128", "nosync") and t.legs == (("a", 0), ("b", 8))
    assert t.features == ("handle_errors", "keep_log")


def test_unknown_targets_fall_back_to_raw() -> None:
    st = parse_status("0 100 thin-pool 1 2/3 4/5 - rw")
    assert type(st) is RawStatus and st.params == ("1", "2/3", "4/5", "-", "rw")
    t = parse_table("8 100 delay 254:0 0 500")
    assert type(t) is RawTable and t.start == 8 and str(t) == "8 100 delay 254:0 0 500"


@pytest.mark.parametrize("line", [
    "", "0 8", "x 8 linear", "0 8 snapshot 1/2", "0 8 snapshot garbage words",
    "0 8 snapshot -1/2 3", "0 8 mirror 2 a 1/1 1 AA 1 core", "0 8 mirror 1 a 1/1 1 AA 2 core",
    "0 8 mirror x",
])
def test_malformed_status_raises_value_error(line: str) -> None:
    with pytest.raises(ValueError):
        parse_status(line)


@pytest.mark.parametrize("line", [
    "0 8 linear dev", "0 8 linear dev x", "0 8 flakey d 0 1", "0 8 flakey d 0 1 1 2 a",
    "0 8 snapshot o c P", "0 8 mirror core 1", "0 8 mirror core 1 1024 2 a 0",
    "0 8 snapshot-origin",
])
def test_malformed_table_raises_value_error(line: str) -> None:
    with pytest.raises(ValueError):
        parse_table(line)


def test_device_info_from_data() -> None:
    data = {"name": "a", "uuid": "", "suspended": False, "live": True, "inactive": False,
            "open_count": 1, "event_nr": 3, "nr_targets": 1, "nr_sectors": 8, "path": "/m/a",
            "in_flight": 0, "added_later": 1}
    info = DeviceInfo.from_data(data)
    assert info.event_nr == 3 and info.path == "/m/a"
    del data["event_nr"]
    with pytest.raises(ValueError, match="event_nr"):
        DeviceInfo.from_data(data)


@pytest.mark.parametrize("module", [dmuser.status, dmuser.tables])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.attempted >= 1 and result.failed == 0
