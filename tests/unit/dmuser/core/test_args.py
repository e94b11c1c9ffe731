"""dmuser.args: the kernel's plain-unsigned-decimal rule and dm_read_arg(_group) (dm-spec §1.1)."""

from __future__ import annotations

import errno

import pytest

from dmuser.core.args import U32_MAX, ArgReader, parse_sector, parse_uint
from dmuser.core.errors import TargetArgError

U64_MAX = (1 << 64) - 1


@pytest.mark.parametrize(
    ("word", "value"),
    [("0", 0), ("7", 7), ("0007", 7), ("2048", 2048), (str(U32_MAX), U32_MAX),
     (str(U64_MAX), U64_MAX)],
)
def test_parse_uint_accepts_plain_decimals(word: str, value: int) -> None:
    assert parse_uint(word) == value


@pytest.mark.parametrize(
    "word",
    ["12abc", "-1", "0x10", "", "+5", " 5", "5 ", "1.0", "1e3", "1_000", "abc", "٣",  # Arabic 3
     "²", str(U64_MAX + 1), str(10**30)],
)
def test_parse_uint_rejects(word: str) -> None:
    assert parse_uint(word) is None


def test_parse_uint_max_value_is_inclusive() -> None:
    assert parse_uint("4", 4) == 4
    assert parse_uint("5", 4) is None
    assert parse_uint(str(U32_MAX), U32_MAX) == U32_MAX
    assert parse_uint(str(U32_MAX + 1), U32_MAX) is None


@pytest.mark.parametrize("word", ["12abc", "-1", "0x10", "", "+5", str(U64_MAX + 1)])
def test_parse_sector_rejects_with_given_error(word: str) -> None:
    with pytest.raises(TargetArgError) as info:
        parse_sector(word, "Invalid device sector")
    assert info.value.message == "Invalid device sector"
    assert info.value.errno == errno.EINVAL


def test_parse_sector_accepts_u64() -> None:
    assert parse_sector("0", "e") == 0
    assert parse_sector(str(U64_MAX), "e") == U64_MAX


# -- ArgReader ----------------------------------------------------------------------------


def test_shift_peek_rest() -> None:
    r = ArgReader(["a", "b", "c"])
    assert r.remaining == 3
    assert r.peek() == "a"
    assert r.shift() == "a"
    assert r.remaining == 2
    assert r.rest() == ["b", "c"]
    assert r.remaining == 0
    assert r.peek() is None
    with pytest.raises(TargetArgError, match="^Need more$"):
        r.shift("Need more")


def test_read_uint_in_range() -> None:
    r = ArgReader(["3", "10", "0"])
    assert r.read_uint(1, 5, "bad a") == 3
    assert r.read_uint(10, 10, "bad b") == 10
    assert r.read_uint(0, 0, "bad c") == 0
    assert r.remaining == 0


@pytest.mark.parametrize(
    ("words", "lo", "hi"),
    [(["0"], 1, 5), (["6"], 1, 5), (["12abc"], 0, 100), (["-1"], 0, 100), (["0x10"], 0, 100),
     ([""], 0, 100), ([], 0, 100), ([str(U32_MAX + 1)], 0, U32_MAX)],
)
def test_read_uint_errors_carry_the_callers_text(words: list[str], lo: int, hi: int) -> None:
    r = ArgReader(words)
    with pytest.raises(TargetArgError) as info:
        r.read_uint(lo, hi, "Invalid number of feature args")
    assert info.value.message == "Invalid number of feature args"


def test_read_group_count_must_fit_remaining_words() -> None:
    r = ArgReader(["3", "a", "b"])
    with pytest.raises(TargetArgError, match="^Invalid number of feature args$"):
        r.read_group(0, 10, "Invalid number of feature args")


def test_read_group_count_equal_to_remaining_is_fine() -> None:
    r = ArgReader(["2", "a", "b", ])
    assert r.read_group(0, 10, "e") == 2
    assert r.rest() == ["a", "b"]


def test_read_group_zero_and_range() -> None:
    assert ArgReader(["0"]).read_group(0, 10, "e") == 0
    with pytest.raises(TargetArgError):
        ArgReader(["5", "a", "b", "c", "d", "e"]).read_group(0, 4, "e")
    with pytest.raises(TargetArgError):
        ArgReader([]).read_group(0, 4, "e")
