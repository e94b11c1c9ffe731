"""Crash-point replay (``dmuser.crashpoints``) on write logs built byte by byte with the
log format's encoder: no daemon, no FUSE.  Each point's image must equal the reference
``replay`` of the log's prefix, also when the user's check scribbles on the image."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from dmuser.crashpoints import IncompleteLog, crash_points
from dmuser.formats.logwrites import (
    END_MARK,
    LOG_DISCARD_FLAG,
    LOG_FLUSH_FLAG,
    LOG_FUA_FLAG,
    LOG_MARK_FLAG,
    decode_log,
    encode_record,
    encode_super,
    replay,
)

SIZE = 64 * 512


def write(sector: int, data: bytes, flags: int = 0) -> bytes:
    return encode_record(sector, len(data) // 512, flags, data)


def build_log(path: Path, records: list[bytes], end: bool = True) -> Path:
    if end:
        records = [*records, encode_record(0, 0, LOG_MARK_FLAG, mark=END_MARK)]
    path.write_bytes(encode_super(len(records)) + b"".join(records))
    return path


def workload(seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    records = []
    for i in range(40):
        sector = rnd.randrange(60)
        n = rnd.randrange(1, 64 - sector)
        kind = rnd.random()
        if kind < 0.15:
            records.append(encode_record(0, 0, LOG_FLUSH_FLAG))
        elif kind < 0.2:
            records.append(encode_record(sector, n, LOG_DISCARD_FLAG))
        elif kind < 0.25:
            records.append(encode_record(0, 0, LOG_MARK_FLAG, mark=f"m{i}".encode()))
        else:
            fua = LOG_FUA_FLAG if kind > 0.9 else 0
            records.append(write(sector, rnd.randbytes(n * 512), fua))
    return records


@pytest.mark.parametrize("seed", range(3))
def test_every_point_is_the_replayed_prefix(tmp_path: Path, seed: int) -> None:
    log = build_log(tmp_path / "log", workload(seed))
    _, entries = decode_log(log.read_bytes())
    expected_points = [e.index for e in entries
                       if e.flags & (LOG_FLUSH_FLAG | LOG_FUA_FLAG | LOG_MARK_FLAG)]
    seen = []
    for point in crash_points(log, tmp_path / "img", size=SIZE):
        want = bytearray(SIZE)
        replay(entries[:point.entry + 1], want)
        assert point.image.read_bytes() == bytes(want), point
        assert point.total == len(expected_points)
        seen.append(point.entry)
        with open(point.image, "r+b") as f:  # the user's check writes: must not matter
            f.write(os.urandom(SIZE))
    assert seen == expected_points
    assert point.mark == END_MARK.decode()
    assert not list(tmp_path.glob(".replay-base-*"))  # the base image is gone


def test_kinds_since_and_start(tmp_path: Path) -> None:
    start = tmp_path / "start"
    start.write_bytes(b"S" * SIZE)
    log = build_log(tmp_path / "log", [
        write(0, b"a" * 512), encode_record(0, 0, LOG_FLUSH_FLAG),
        encode_record(0, 0, LOG_MARK_FLAG, mark=b"go"),
        write(1, b"b" * 512, LOG_FUA_FLAG), write(2, b"c" * 512),
        encode_record(0, 0, LOG_FLUSH_FLAG), encode_record(3, 2, LOG_DISCARD_FLAG)])
    fua = list(crash_points(log, tmp_path / "img", at=("fua",)))
    assert [(p.entry, p.kind) for p in fua] == [(3, "FUA")]
    points = [(p.entry, p.kind, p.mark, p.image.read_bytes()[:6 * 512])
              for p in crash_points(log, tmp_path / "img", start=start, since="go")]
    s = b"S" * 512
    assert points == [
        (2, "MARK", "go", b"a" * 512 + s * 5),
        (3, "FUA", None, b"a" * 512 + b"b" * 512 + s * 4),
        (5, "FLUSH", None, b"a" * 512 + b"b" * 512 + b"c" * 512 + s * 3),
        (7, "MARK", END_MARK.decode(), b"a" * 512 + b"b" * 512 + b"c" * 512 + bytes(1024) + s)]
    with pytest.raises(ValueError, match="no mark 'nope'"):
        next(crash_points(log, tmp_path / "img", since="nope"))
    with pytest.raises(ValueError, match="unknown crash point kinds"):
        next(crash_points(log, tmp_path / "img", at=("flush", "sync")))


def test_an_unfinished_log_is_refused(tmp_path: Path) -> None:
    log = build_log(tmp_path / "log", [write(0, b"a" * 512, LOG_FUA_FLAG)], end=False)
    with pytest.raises(IncompleteLog, match="does not end with the dm-log-writes-end mark"):
        next(crash_points(log, tmp_path / "img"))
    (tmp_path / "zeros").write_bytes(bytes(4096))  # the super is written only at FUA/mark
    with pytest.raises(IncompleteLog, match="no write log super block"):
        next(crash_points(tmp_path / "zeros", tmp_path / "img"))
    assert not (tmp_path / "img").exists()
