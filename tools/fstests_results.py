"""Test lists and results of an fstests run (stdlib only; used by ``tools/fstests``).

A result comes from the files fstests leaves in ``RESULT_BASE`` (the run's
``results`` directory) and from ``./check``'s output, never from exit codes:
``TEST.notrun`` holds the reason a test did not run, the ``Failures:`` line of
``check.log`` or a ``TEST.out.bad`` marks a failure (a post-test file-system
check fails a test without ``.out.bad``; the reason is what ``check`` printed
for the test), a test named on the ``Ran:`` line with neither passed, and a test that
``check`` never reached (interrupted, crashed) is ``missing``.
``check.time`` gives each test's seconds.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

#: The CI tier, per file system: one or more tests for each dm target fstests uses
#: here (docs/fstests.md says why each is there and how long it takes).
CI: dict[str, list[str]] = {
    "ext4": [
        "generic/034",   # flakey drop_writes ("power fail"), then journal replay: dir i_size
        "generic/039",   # flakey: fsync after the link count dropped, replay
        "generic/056",   # flakey: fsynced data survives a later hard link
        "generic/090",   # flakey: sync, link, append, fsync: data after replay
        "generic/106",   # flakey: unlink a hard link, evict, fsync, power fail
        "generic/322",   # flakey: rename + fsync corner cases
        "generic/336",   # flakey: fsync after links moved between directories
        "generic/343",   # flakey: hard link + move into that directory, fsync
        "generic/441",   # error: a writeback error reaches fsync on every open fd
        "generic/442",   # error: the same on the block device's page cache
        "generic/475",   # error: table swap to error under fsstress, then log recovery
        "generic/620",   # zero + snapshot: the huge disk (dmhugedisk)
        "generic/741",   # flakey: mounting the device under a live table gets EBUSY
    ],
    "xfs": [
        "generic/085",   # linear: suspend/resume (with the fs freeze) races mount/umount
        "xfs/311",       # delay: unmount with directory readahead still in flight
    ],
    "btrfs": [           # dust: fstests' only dust tests are btrfs raid1 read-repair ones
        "btrfs/142",     # dust: O_DIRECT read of a bad block repaired from the other mirror
        "btrfs/143",     # dust: the same for buffered reads
    ],
}
#: fstests' SOAK_DURATION for the CI tier: generic/475 loops this long, not 100 rounds
CI_SOAK_SECONDS = 20

#: Tests the ``full`` list leaves out: they need the thin-pool target, which dmuser lacks.
NEEDS_THIN_POOL = "_require_dm_target thin-pool"
_DM_TEST = re.compile(r"^\. \./common/dm|_require_dm_target|_require_log_writes|"
                      r"_require_dmhugedisk|_require_flakey", re.M)


def full_list(tree: Path, fs: str) -> list[str]:
    """Every ``generic/`` and ``FS/`` test that needs a dm target other than thin-pool."""
    found = []
    for group in ("generic", fs):
        for f in sorted((tree / "tests" / group).glob("[0-9][0-9][0-9]")):
            text = f.read_text(errors="replace")
            if _DM_TEST.search(text) and NEEDS_THIN_POOL not in text:
                found.append(f"{group}/{f.name}")
    return found


def read_list(path: Path) -> list[str]:
    """A list file: one test a line (``generic/034``), ``#`` starts a comment."""
    tests = []
    for line in path.read_text().splitlines():
        word = line.split("#", 1)[0].strip()
        if word:
            tests.append(word)
    return tests


@dataclass
class Result:
    fs: str
    test: str
    status: str          # pass | fail | notrun | missing
    seconds: int | None
    reason: str


def _check_output_blocks(output: str, tests: list[str]) -> dict[str, str]:
    """What ``check`` printed for each test: from its name to the next test's name."""
    blocks: dict[str, list[str]] = {}
    current = None
    names = set(tests)
    for line in output.splitlines():
        word = line.split(" ", 1)[0]
        if word in names:
            current = word
            blocks[current] = [line]
        elif current is not None and line.startswith(("    ", "\t", "-", "(")):
            blocks[current].append(line)
        else:
            current = None
    return {t: "\n".join(lines) for t, lines in blocks.items()}


def _check_log(check_log: Path) -> tuple[set[str], set[str]]:
    """The tests on the ``Ran:`` and on the ``Failures:`` lines of ``check.log``."""
    ran: set[str] = set()
    failed: set[str] = set()
    if check_log.is_file():
        for line in check_log.read_text(errors="replace").splitlines():
            if line.startswith("Ran:"):
                ran.update(line.split()[1:])
            elif line.startswith("Failures:"):
                failed.update(line.split()[1:])
    return ran, failed


def _times(check_time: Path) -> dict[str, int]:
    times = {}
    if check_time.is_file():
        for line in check_time.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                times[parts[0]] = int(parts[1])
    return times


def _fail_reason(block: str) -> str:
    """``[failed, exit status N]``, what else ``check`` said, and the first lines of the
    diff against the golden output (the whole diff is in ``TEST.out.bad``)."""
    lines = block.splitlines()
    head = lines[0].split(None, 1)[1] if lines and len(lines[0].split(None, 1)) > 1 else ""
    head = re.sub(r"\s*\(see [^)]*\)", "", re.sub(r"^\d+s( \.\.\.\s*\d+s)?\s*", "", head))
    diff = [ln.strip() for ln in lines[1:]
            if ln.strip()[:1] in "+-" and not ln.strip().startswith(("---", "+++"))]
    other = [ln.strip() for ln in lines[1:] if ln.strip() and not ln.startswith("    ")
             and not ln.startswith(("(see ", "(Run "))]
    return " ".join([head, *other[:2], *diff[:3]])[:400]


def collect(fs: str, tests: list[str], results: Path, check_output: str) -> list[Result]:
    """The result of every test in ``tests`` from the run's ``results`` directory."""
    blocks = _check_output_blocks(check_output, tests)
    ran, failed = _check_log(results / "check.log")
    times = _times(results / "check.time")
    out = []
    for test in tests:
        notrun = results / f"{test}.notrun"
        bad = results / f"{test}.out.bad"
        block = blocks.get(test, "")
        if notrun.is_file():
            status, reason = "notrun", notrun.read_text(errors="replace").strip()
        elif test in failed or bad.is_file() or "[failed" in block or "output mismatch" in block:
            status, reason = "fail", _fail_reason(block) or "output mismatch"
        elif test in ran or re.search(r"\b\d+s\b", block):
            status, reason = "pass", ""
        else:
            status, reason = "missing", "check did not report this test (interrupted?)"
        out.append(Result(fs, test, status, times.get(test), " ".join(reason.split())))
    return out


@dataclass
class Run:
    """One ``tools/fstests`` invocation: its command line, UTC date and results."""

    command: str
    date: str
    results: list[Result]


def save_json(path: Path, run: Run) -> None:
    path.write_text(json.dumps({"command": run.command, "date": run.date,
                                "results": [asdict(r) for r in run.results]}, indent=1) + "\n")


def load_json(path: Path) -> Run:
    data = json.loads(path.read_text())
    return Run(data["command"], data["date"], [Result(**r) for r in data["results"]])


def counts(results: list[Result]) -> dict[str, int]:
    c = {"pass": 0, "fail": 0, "notrun": 0, "missing": 0}
    for r in results:
        c[r.status] += 1
    return c


def summary(results: list[Result]) -> str:
    """Plain-text lines: one per test that did not pass, then the counts per fs."""
    lines = []
    for r in results:
        if r.status != "pass":
            lines.append(f"{r.fs:5} {r.test:12} {r.status:7} {r.reason}")
    for fs in dict.fromkeys(r.fs for r in results):
        c = counts([r for r in results if r.fs == fs])
        secs = sum(r.seconds or 0 for r in results if r.fs == fs)
        lines.append(f"{fs}: {c['pass']} passed, {c['fail']} failed, {c['notrun']} not run"
                     + (f", {c['missing']} missing" if c["missing"] else "")
                     + f" ({secs} s of tests)")
    return "\n".join(lines)


BEGIN = "<!-- tools/fstests --report: begin (generated; edit outside these markers) -->"
END = "<!-- tools/fstests --report: end -->"


def markdown(runs: list[Run]) -> str:
    """The generated part of docs/fstests.md: commands, dates, counts, every non-pass."""
    results = [r for run in runs for r in run.results]
    out = [BEGIN, ""]
    out += [f"* `{run.command}` ({run.date})" for run in runs]
    out += ["", "| fs | passed | failed | not run | missing | seconds |",
            "|---|---|---|---|---|---|"]
    for fs in dict.fromkeys(r.fs for r in results):
        rs = [r for r in results if r.fs == fs]
        c = counts(rs)
        out.append(f"| {fs} | {c['pass']} | {c['fail']} | {c['notrun']} | {c['missing']} | "
                   f"{sum(r.seconds or 0 for r in rs)} |")
    out += ["", "| fs | test | result | seconds | reason |", "|---|---|---|---|---|"]
    for r in results:
        if r.status != "pass":
            reason = r.reason.replace("|", "\\|")
            out.append(f"| {r.fs} | {r.test} | {r.status} | {r.seconds or ''} | {reason} |")
    for fs in dict.fromkeys(r.fs for r in results):
        passed = [f"{r.test} ({r.seconds}s)" for r in results if r.fs == fs and r.status == "pass"]
        out += ["", f"Passed on {fs}: " + (", ".join(passed) or "none") + "."]
    out += ["", END]
    return "\n".join(out) + "\n"


def write_report(path: Path, runs: list[Run]) -> None:
    """Replace the generated part of ``path`` (or append it), keeping the rest."""
    block = markdown(runs)
    text = path.read_text() if path.is_file() else "# fstests with dmuser\n\n"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
