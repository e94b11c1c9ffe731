"""``dmuser dmsetup`` against a real daemon: every verb, dmsetup's exact formats.

Most calls run ``dmuser.dmsetup.main`` in this process with a
:class:`dmuser.Client` of the test's daemon (fast); the command line, the
exit status and the shim are checked through subprocesses.  Expected texts
are dmsetup 1.02.185's (captured with ``../shared/tools/kvm-dm``), with each
device's file where dmsetup prints a major:minor.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.daemon import Daemon, dmuser_cmd
from support.data import make_image, pattern, read_at, write_at
from support.system import wait_until

import dmuser
from dmuser import dmsetup

pytestmark = [pytest.mark.fuse]


@pytest.fixture
def d(daemon: Daemon) -> Iterator[Daemon]:
    make_image(daemon.dir / "a.img", 4 << 20)
    yield daemon
    daemon.unstack()


def ds(d: Daemon, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    """``dmsetup ARGV`` in process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    rc = dmsetup.main(list(argv), client=dmuser.Client(d.sock, timeout=60), out=out, err=err,
                      stdin=io.StringIO(stdin))
    return rc, out.getvalue(), err.getvalue()


def ok(d: Daemon, *argv: str, stdin: str = "") -> str:
    rc, out, err = ds(d, *argv, stdin=stdin)
    assert (rc, err) == (0, ""), (argv, err)
    return out


def setup_devices(d: Daemon) -> None:
    img = d.dir / "a.img"
    ok(d, "create", "a", "--table", f"0 2048 linear {img} 0")
    ok(d, "create", "b", "-u", "UUID-B", "--table", "0 1024 zero")
    ok(d, "create", "c", stdin="0 1024 linear /dev/mapper/a 0\n1024 1024 error\n")
    ok(d, "create", "d", "--notable")


def test_create_ls_info_formats(d: Daemon) -> None:
    assert ok(d, "ls") == "No devices found\n"
    assert ok(d, "ls", "--target", "zero") == "No devices found\n"
    assert ok(d, "info") == "No devices found\n"
    assert ok(d, "info", "-c") == "No devices found\n"
    assert ok(d, "table") == ok(d, "status") == ok(d, "deps") == "No devices found\n"
    setup_devices(d)
    m = f"{d.mnt}/"
    assert ok(d, "ls") == f"a\t({m}a)\nb\t({m}b)\nc\t({m}c)\nd\t({m}d)\n"
    assert ok(d, "ls", "--target", "zero") == f"b\t({m}b)\n"
    assert ok(d, "ls", "--target", "nosuch") == ""
    assert ok(d, "info", "b") == (
        "Name:              b\nState:             ACTIVE\nTables present:    LIVE\n"
        "Open count:        0\nEvent number:      0\nNumber of targets: 1\nUUID: UUID-B\n\n")
    assert ok(d, "info", "d").startswith("Name:              d\nState:             ACTIVE\n"
                                         "Tables present:    None\n")
    assert ok(d, "info").count("\n\n") == 4
    assert ok(d, "info", "-c") == (
        "Name             Maj Min Stat Open Targ Event  UUID                            \n"
        "a                  -   - L--w    0    1      0                                 \n"
        "b                  -   - L--w    0    1      0 UUID-B                          \n"
        "c                  -   - L--w    0    2      0                                 \n"
        "d                  -   - ---w    0    0      0                                 \n")
    assert ok(d, "info", "-C", "--noheadings") == (
        "a:-:-:L--w:0:1:0:\nb:-:-:L--w:0:1:0:UUID-B\nc:-:-:L--w:0:2:0:\nd:-:-:---w:0:0:0:\n")
    assert ok(d, "info", "-c", "-o", "name,attr,open,segments,events,uuid,suspended", "b") == (
        "Name             Stat Open Targ Event  UUID                             Suspended\n"
        "b                L--w    0    1      0 UUID-B                           Active   \n")
    assert ok(d, "info", "-c", "--noheadings", "-o", "uuid", "b") == "UUID-B\n"
    assert ok(d, "info", "--noheadings", "-c", "-o", "tables_loaded", "d") == "None\n"
    assert ok(d, "info", "-c", "--noheadings", "-o", "name,open", "--separator", ",") == (
        "a,0\nb,0\nc,0\nd,0\n")
    assert ok(d, "info", "-c", "--noheadings", "-o", "name,devs_used,names_using_dev") == (
        "a::c\nb::\nc:a:\nd::\n")
    assert ok(d, "info", "-c", "--noheadings", "-o", "blkdevname", "a") == f"{m}a\n"


def test_open_count_and_wait(d: Daemon) -> None:
    setup_devices(d)
    with open(d.path("a"), "rb"):
        assert ok(d, "info", "-c", "--noheadings", "-o", "open", "a") == "1\n"
    assert ok(d, "info", "-c", "--noheadings", "-o", "open", "a") == "0\n"
    ok(d, "create", "m", "--table", "0 2048 snapshot-origin /dev/mapper/a")
    cow = d.dir / "cow.img"
    make_image(cow, 64 << 10)
    # a transient snapshot whose COW fills becomes invalid: an event, which ends the wait
    ok(d, "create", "s", "--table", f"0 2048 snapshot /dev/mapper/a {cow} N 8")
    done: list[tuple[int, str, str]] = []
    waiter = threading.Thread(target=lambda: done.append(ds(d, "wait", "s", "0")))
    waiter.start()
    write_at(d.path("m"), 0, pattern("fill", 512 << 10))
    waiter.join(30)
    assert done == [(0, "", "")]
    assert ok(d, "status", "s") == "0 2048 snapshot Invalid\n"
    assert ok(d, "info", "-c", "--noheadings", "-o", "events", "s") != "0\n"
    rc, _, err = ds(d, "wait", "nosuch")
    assert rc == 1 and err.endswith(
        "device-mapper: waitevent ioctl on nosuch  failed: No such device or address\n"
        "Command failed.\n")


def test_table_status_deps(d: Daemon) -> None:
    setup_devices(d)
    img, m = d.dir / "a.img", f"{d.mnt}/"
    assert ok(d, "table") == (f"a: 0 2048 linear {img} 0\nb: 0 1024 zero \n"
                              f"c: 0 1024 linear {m}a 0\nc: 1024 1024 error \nd: \n")
    assert ok(d, "table", "c") == f"0 1024 linear {m}a 0\n1024 1024 error \n"
    assert ok(d, "table", "a", "/dev/mapper/c") == (
        f"a: 0 2048 linear {img} 0\nc: 0 1024 linear {m}a 0\nc: 1024 1024 error \n")
    assert ok(d, "table", "--target", "linear") == (
        f"a: 0 2048 linear {img} 0\nc: 0 1024 linear {m}a 0\n")
    assert ok(d, "table", "c", "--target", "error", "--showkeys") == "1024 1024 error \n"
    assert ok(d, "status") == ("a: 0 2048 linear \nb: 0 1024 zero \nc: 0 1024 linear \n"
                               "c: 1024 1024 error \nd: \n")
    assert ok(d, "status", "--target", "error") == "c: 1024 1024 error \n"
    assert ok(d, "status", "c", "--target", "linear") == "0 1024 linear \n"
    assert ok(d, "status", "c", "--target", "zero") == ""
    assert ok(d, "status", f"{m}c") == "0 1024 linear \n1024 1024 error \n"
    assert ok(d, "deps", "c") == f"1 dependencies\t: ({m}a)\n"
    assert ok(d, "deps") == (f"a: 1 dependencies\t: ({img})\nb: 0 dependencies\t:\n"
                             f"c: 1 dependencies\t: ({m}a)\nd: 0 dependencies\t:\n")


def test_suspend_load_resume_message_remove(d: Daemon) -> None:
    setup_devices(d)
    data = pattern("dmsetup", 4096)
    write_at(d.path("a"), 0, data)
    ok(d, "suspend", "--nolockfs", "a")
    assert ok(d, "info", "-c", "--noheadings", "-o", "attr,suspended", "a") == "L-sw:Suspended\n"
    ok(d, "load", "a", "--table", "0 2048 zero")
    assert ok(d, "info", "a").split("\n")[1:3] == ["State:             SUSPENDED",
                                                   "Tables present:    LIVE & INACTIVE"]
    assert ok(d, "table", "--inactive", "a") == "0 2048 zero \n"
    ok(d, "resume", "--nolockfs", "a")
    assert read_at(d.path("a"), 0, 4096) == bytes(4096)
    ok(d, "suspend", "--noflush", "a")
    ok(d, "reload", "a", stdin=f"0 2048 linear {d.dir / 'a.img'} 0\n")
    ok(d, "resume", "a")
    assert read_at(d.path("a"), 0, 4096) == data
    ok(d, "create", "f", "--table", f"0 2048 flakey {d.dir / 'a.img'} 0 1 0")
    rc, _, err = ds(d, "message", "f", "0", "bogus")
    assert rc == 1 and err.endswith("device-mapper: message ioctl on f  failed: "
                                    "Invalid argument\nCommand failed.\n")
    ok(d, "remove", "--deferred", "f")
    rc, _, err = ds(d, "remove", "a")
    assert rc == 1 and err.endswith(
        "device-mapper: remove ioctl on a  failed: Device or resource busy\nCommand failed.\n")
    ok(d, "remove", "--retry", "c", "/dev/mapper/d")
    ok(d, "remove_all", "--force")
    assert ok(d, "ls") == "No devices found\n"
    ok(d, "remove_all")


def test_errors(d: Daemon) -> None:
    setup_devices(d)
    assert ds(d, "info", "nosuch") == (1, "", "Device does not exist.\nCommand failed.\n")
    assert ds(d, "info", "-c", "nosuch") == (1, "", "Device does not exist.\nCommand failed.\n")
    assert ds(d, "status", "nosuch") == (1, "", "Device does not exist.\nCommand failed.\n")
    for argv, ioctl in ((["table", "nosuch"], "table"), (["suspend", "nosuch"], "suspend"),
                        (["resume", "nosuch"], "resume"), (["remove", "nosuch"], "remove"),
                        (["message", "nosuch", "0", "hi"], "message"),
                        (["load", "nosuch", "--table", "0 8 zero"], "reload")):
        rc, out, err = ds(d, *argv)
        assert (rc, out) == (1, "")
        assert err.endswith(f"device-mapper: {ioctl} ioctl on nosuch  failed: "
                            "No such device or address\nCommand failed.\n"), err
    rc, _, err = ds(d, "create", "a", "--table", "0 10 zero")
    assert rc == 1 and err.endswith("device-mapper: create ioctl on a  failed: "
                                    "Device or resource busy\nCommand failed.\n")
    rc, _, err = ds(d, "create", "x", "--table", "0 10 bogus")
    assert rc == 1 and err.endswith("device-mapper: reload ioctl on x  failed: "
                                    "Invalid argument\nCommand failed.\n")
    rc, _, err = ds(d, "info", "-c", "-o", "name,bogus")
    assert rc == 1 and err.endswith("Unrecognised field: bogus\n")
    assert "x" not in ok(d, "ls")


def test_targets_version_noops(d: Daemon) -> None:
    lines = ok(d, "targets").splitlines()
    assert any(line.startswith("linear ") for line in lines)
    assert all(len(line.split()[0]) >= 16 or line[16] == " " for line in lines)
    version = ok(d, "version").splitlines()
    assert version[0].startswith("Library version:   ")
    assert version[1] == "Driver version:    4.47.0"
    assert ok(d, "--version") == ok(d, "version")
    for argv in (["mknodes"], ["udevcomplete_all"], ["-y", "udevcomplete_all"],
                 ["--noudevsync", "--verifyudev", "-v", "mknodes"]):
        assert ok(d, *argv) == ""
    assert ok(d, "target-version", "zero").startswith("zero             v")


def run_cli(d: Daemon, *args: str, env: dict[str, str] | None = None,
            stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=d.dir, timeout=60,
                          input=stdin, env={**os.environ, "DMUSER_SOCKET": str(d.sock),
                                            **(env or {})})


def test_command_line_and_shim(d: Daemon, tmp_path: Path) -> None:
    res = run_cli(d, *dmuser_cmd("dmsetup", "create", "vol", "--table", "0 2048 linear a.img 0"))
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    res = run_cli(d, *dmuser_cmd("dmsetup", "bogus"))
    assert res.returncode == 1 and res.stderr.startswith("Unknown command.\nUsage:\n")
    res = run_cli(d, *dmuser_cmd("dmsetup", "--install-shim", str(tmp_path / "bin")))
    assert res.returncode == 0, res.stderr
    shim = str(tmp_path / "bin" / "dmsetup")
    path = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    res = run_cli(d, "sh", "-c", "dmsetup info -c --noheadings -o name,attr vol", env=path)
    assert (res.returncode, res.stdout) == (0, "vol:L--w\n"), res.stderr
    # fstests' common/dmflakey way: a table on stdin through $DMSETUP_PROG
    script = ('$DMSETUP_PROG suspend --nolockfs vol && '
              'echo -e "0 2048 flakey a.img 0 180 0" | $DMSETUP_PROG load vol && '
              '$DMSETUP_PROG resume vol && $DMSETUP_PROG table vol && '
              '$DMSETUP_PROG targets 2>&1 | grep -q ^flakey && '
              '$DMSETUP_PROG remove --deferred vol')
    res = run_cli(d, "bash", "-c", script, env={"DMSETUP_PROG": shim})
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"0 2048 flakey {d.dir / 'a.img'} 0 180 0 0\n"
    res = run_cli(d, shim, "info", "vol")
    assert (res.returncode, res.stderr) == (1, "Device does not exist.\nCommand failed.\n")


def test_readonly_and_deferred_remove_on_the_file(d: Daemon) -> None:
    """Without block devices: a read-only table fails writes to the file with EPERM;
    a deferred remove of an open file goes at its close."""
    img = d.dir / "a.img"
    ok(d, "create", "r", "-r", "--table", f"0 2048 linear {img} 0")
    assert ok(d, "info", "-c", "--noheadings", "-o", "attr,readonly", "r") == "L--r:Read-only\n"
    assert ok(d, "info", "r").splitlines()[1] == "State:             ACTIVE (READ-ONLY)"
    with pytest.raises(PermissionError) as exc:
        write_at(d.path("r"), 0, b"x" * 512)
    assert exc.value.errno == errno.EPERM
    assert read_at(d.path("r"), 0, 512) == read_at(img, 0, 512)
    with open(d.path("r"), "rb"):
        ok(d, "remove", "--deferred", "r")
        assert ok(d, "info", "r").splitlines()[1] == \
            "State:             ACTIVE (READ-ONLY) (DEFERRED REMOVE)"
    wait_until(lambda: d.devices() == [], 10, what="the deferred remove")
