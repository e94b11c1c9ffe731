"""The plugin's contract with other suites, without FUSE: it registers only
``dmuser_``-prefixed fixtures (so it cannot shadow this repository's ``daemon`` /
``make_daemon`` or a user's own), ``-p no:dmuser`` turns it off, and the README's
example runs as written.  Plus the table splitting of ``swap_in_error``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dmuser.pytest_plugin.helpers import _split
from dmuser.status import parse_table

REPO = Path(__file__).resolve().parents[2]


def plugin_fixtures(result: pytest.RunResult) -> list[str]:
    text = result.stdout.str()
    section = text.split("fixtures defined from dmuser.pytest_plugin", 1)
    assert len(section) == 2, text
    body = re.split(r"\n-+ fixtures defined from ", section[1])[0]
    return re.findall(r"^(\w+)(?: \[\w+ scope\])? -- ", body, re.M)


def test_the_plugin_registers_only_prefixed_fixtures(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--fixtures", "-v", "-p", "no:cacheprovider")
    names = plugin_fixtures(result)
    assert set(names) == {"dmuser_daemon", "dmuser_private_daemon", "dmuser_client",
                          "dmuser_devices"}


def test_no_dmuser_turns_it_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(request):\n"
                        "    assert request.config.pluginmanager.get_plugin('dmuser') is None\n")
    pytester.runpytest_subprocess("-p", "no:dmuser", "-p", "no:cacheprovider") \
        .assert_outcomes(passed=1)


@pytest.mark.fuse
def test_the_readme_example_runs(pytester: pytest.Pytester) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## pytest plugin", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)
    assert code
    pytester.makepyfile(test_readme="\n".join(code))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=3)


def pieces(line: str, start: int, end: int) -> list[str]:
    return _split(parse_table(line), start, end)


def test_swap_in_error_splits_linear_lines() -> None:
    assert pieces("0 100 linear /a.img 10", 20, 30) == [
        "0 20 linear /a.img 10", "20 10 error", "30 70 linear /a.img 40"]
    assert pieces("100 50 linear /a.img 0", 0, 120) == [
        "100 20 error", "120 30 linear /a.img 20"]
    assert pieces("0 8 zero", 0, 8) == ["0 8 error"]
    assert pieces("0 8 linear /a.img 0", 8, 16) == ["0 8 linear /a.img 0"]
    with pytest.raises(ValueError, match="cannot split a snapshot-origin"):
        pieces("0 8 snapshot-origin /a.img", 0, 4)


def test_the_examples_are_short_enough_to_copy() -> None:
    """The issue's promise: each example suite is under 60 lines (and there are three)."""
    examples = sorted((REPO / "examples").glob("test_*.py"))
    assert len(examples) == 3
    long = {p.name: n for p in examples if (n := len(p.read_text().splitlines())) >= 60}
    assert long == {}
