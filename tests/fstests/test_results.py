"""``tools/fstests_results.py`` reads fstests' result files the way ``check`` wrote them.

A synthetic ``results`` directory (what ``check`` leaves: ``TEST.notrun``,
``TEST.out.bad``, ``check.log``, ``check.time``) and ``check`` output give one
test of each kind, and a failure by the post-test file-system check (no
``.out.bad``); no fstests run is needed.  The report keeps what is written
around its markers.
"""

from __future__ import annotations

from pathlib import Path

import fstests_results as fr

CHECK_OUTPUT = """\
FSTYP         -- ext4
generic/034 3s ...  4s
generic/081       [not run] This test requires dm snapshot support
generic/441       [failed, exit status 1]- output mismatch (see /r/generic/441.out.bad)
    --- tests/generic/441.out	2026-01-01 13:14:26.000000000 +0000
    +++ /r/generic/441.out.bad	2026-12-03 17:26:07.755670189 +0000
    @@ -1,2 +1,3 @@
     QA output created by 441
    +fsync on fd[0] did not fail
    ...
    (Run 'diff -u tests/generic/441.out /r/generic/441.out.bad'  to see the entire diff)
generic/753        _check_xfs_filesystem: filesystem on /dev/loop1 is inconsistent (r)
(see /r/generic/753.full for details)

Ran: generic/034 generic/081 generic/441 generic/753
Not run: generic/081
Failures: generic/441 generic/753
Failed 2 of 4 tests
"""


def _results(tmp_path: Path) -> Path:
    res = tmp_path / "results"
    (res / "generic").mkdir(parents=True)
    (res / "generic" / "081.notrun").write_text("This test requires dm snapshot support\n")
    (res / "generic" / "441.out.bad").write_text("QA output created by 441\n")
    (res / "check.log").write_text("Ran: generic/034 generic/081 generic/441 generic/753\n"
                                   "Not run: generic/081\nFailures: generic/441 generic/753\n")
    (res / "check.time").write_text("generic/034 4\ngeneric/441 7\n")
    return res


def test_collect_tells_pass_fail_notrun_and_missing(tmp_path: Path) -> None:
    tests = ["generic/034", "generic/081", "generic/441", "generic/753", "generic/475"]
    got = {r.test: r for r in fr.collect("ext4", tests, _results(tmp_path), CHECK_OUTPUT)}
    assert [got[t].status for t in tests] == ["pass", "notrun", "fail", "fail", "missing"]
    assert got["generic/081"].reason == "This test requires dm snapshot support"
    assert got["generic/441"].reason == \
        "[failed, exit status 1]- output mismatch +fsync on fd[0] did not fail"
    # a failed post-test fsck leaves no .out.bad: check.log's Failures line tells
    assert got["generic/753"].reason == \
        "_check_xfs_filesystem: filesystem on /dev/loop1 is inconsistent (r)"
    assert (got["generic/034"].seconds, got["generic/441"].seconds) == (4, 7)
    assert fr.counts(list(got.values())) == {"pass": 1, "fail": 2, "notrun": 1, "missing": 1}


def test_report_replaces_only_its_part_and_round_trips_json(tmp_path: Path) -> None:
    results = fr.collect("xfs", ["generic/034", "generic/441"], _results(tmp_path), CHECK_OUTPUT)
    saved = tmp_path / "r.json"
    fr.save_json(saved, fr.Run("tools/fstests --fs xfs", "2026-12-03 17:00 UTC", results))
    run = fr.load_json(saved)
    assert run.results == results
    doc = tmp_path / "fstests.md"
    doc.write_text(f"# title\n\nbefore\n\n{fr.BEGIN}\nold\n{fr.END}\n\nafter\n")
    fr.write_report(doc, [run])
    text = doc.read_text()
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith("\n\nafter\n")
    assert "old" not in text
    assert "| xfs | 1 | 1 | 0 | 0 | 11 |" in text
    assert "| xfs | generic/441 | fail | 7 |" in text
    assert "Passed on xfs: generic/034 (4s)." in text
