"""``dmuser dmsetup``: dmsetup's command line and output formats, without a daemon.

The expected texts are dmsetup 1.02.185's (Debian 12), captured on Debian's
kernel with ``../shared/tools/kvm-dm``; where a dmuser device has no block
device the numbers are replaced as ``dmuser/dmsetup/report.py`` documents.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dmuser import dmsetup
from dmuser.calls import DaemonInfo, Reply
from dmuser.dmsetup import options, report
from dmuser.dmsetup.options import UsageError, parse
from dmuser.dmsetup.usage import USAGE
from dmuser.errors import DeviceBusy, NoSuchDevice
from dmuser.status import DeviceInfo


def info(name: str, *, uuid: str = "", live: bool = True, inactive: bool = False,
         suspended: bool = False, open_count: int = 0, targets: int = 1,
         events: int = 0) -> DeviceInfo:
    return DeviceInfo(name=name, uuid=uuid, suspended=suspended, live=live, inactive=inactive,
                      open_count=open_count, event_nr=events, nr_targets=targets,
                      nr_sectors=2048, path=f"/mnt/{name}", in_flight=0)


# -- options ------------------------------------------------------------------------------


def test_options_anywhere_and_clustered() -> None:
    o = parse(["remove", "NAME", "--deferred", "-fv", "--retry"])
    assert o.command == "remove" and o.operands == ["NAME"]
    assert o.has("deferred") and o.has("force") and o.has("verbose") and o.has("retry")
    o = parse(["info", "-c", "--noheadings", "-o", "major,minor", "vol"])
    assert o.has("columns") and o.get("options") == "major,minor" and o.operands == ["vol"]
    o = parse(["-C", "-omajor", "info", "--separator=,", "--tab", "0 8 zero"])
    assert o.has("columns") and o.get("options") == "major" and o.get("separator") == ","
    assert o.get("table") == "0 8 zero"  # a unique prefix of --table
    o = parse(["create", "-u", "U-1", "x", "--", "--notanoption"])
    assert o.get("uuid") == "U-1" and o.operands == ["x", "--notanoption"]
    o = parse(["-v", "-v", "--noudevsync", "--verifyudev", "-y", "udevcomplete_all"])
    assert o.switches["verbose"] == 2 and o.has("yes") and o.command == "udevcomplete_all"


@pytest.mark.parametrize(("argv", "message"), [
    (["--bogusopt", "ls"], "dmsetup: unrecognized option '--bogusopt'"),
    (["ls", "--bogusopt"], "dmsetup: unrecognized option '--bogusopt'"),
    (["table", "--target"], "dmsetup: option '--target' requires an argument"),
    (["info", "-c", "-o"], "dmsetup: option requires an argument -- 'o'"),
    (["-x", "ls"], "dmsetup: invalid option -- 'x'"),
    (["--force=1", "remove"], "dmsetup: option '--force' doesn't allow an argument"),
    (["--no", "ls"], "dmsetup: option '--no' is ambiguous; possibilities: '--noflush' "
                     "'--nogroup' '--noheadings' '--nolockfs' '--nomonitor' '--noopencount' "
                     "'--nosuffix' '--notable' '--notimesuffix' '--noudevrules' '--noudevsync'"),
])
def test_bad_options(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse(argv)
    assert str(exc.value) == message
    out, err = io.StringIO(), io.StringIO()
    assert dmsetup.main(argv, out=out, err=err) == 1
    assert err.getvalue() == message + "\nCouldn't process command line.\n"
    assert out.getvalue() == ""


def run(argv: list[str], client: Any = None, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = dmsetup.main(argv, client=client, out=out, err=err, stdin=io.StringIO(stdin))
    return rc, out.getvalue(), err.getvalue()


def test_usage_texts_and_status() -> None:
    assert USAGE.startswith("Usage:\n\ndmsetup\n"
                            "        [--version] [-h|--help [-c|-C|--columns]]\n")
    assert "\tremove [--deferred] [-f|--force] [--retry] <device>...\n" in USAGE
    assert USAGE.endswith("rw and uuid.\n\n")
    assert run(["--help"]) == (0, "", USAGE)
    assert run(["help"]) == (0, "", USAGE)
    assert run([]) == (1, "", USAGE)
    assert run(["bogus"]) == (1, "", "Unknown command.\n" + USAGE)
    assert run(["message", "a"]) == (1, "", "Incorrect number of arguments.\n" + USAGE)
    assert run(["ls", "extra"]) == (1, "", "Incorrect number of arguments.\n" + USAGE)
    assert set(options.COMMANDS) >= {"create", "load", "reload", "suspend", "resume", "remove",
                                     "remove_all", "message", "status", "table", "info", "ls",
                                     "targets", "version", "mknodes", "udevcomplete_all",
                                     "deps", "wait"}


@pytest.mark.skipif(not os.path.exists("/usr/sbin/dmsetup"), reason="dmsetup not installed")
def test_usage_is_the_installed_dmsetups() -> None:
    """Where Debian 12's dmsetup is installed: its --help is our usage, byte for byte."""
    real = subprocess.run(["/usr/sbin/dmsetup", "--help"], capture_output=True, text=True)
    version = subprocess.run(["/usr/sbin/dmsetup", "--version"], capture_output=True, text=True)
    if "1.02.185" not in version.stdout:
        pytest.skip("another dmsetup version")
    assert real.stderr == USAGE


# -- report formats -----------------------------------------------------------------------


ROWS = [report.Row(info("a", open_count=1)), report.Row(info("b", uuid="UUID-B")),
        report.Row(info("c", targets=2)), report.Row(info("d", live=False, targets=0))]


def test_info_columns_default() -> None:
    text = report.columns(ROWS, report.pick_fields(None))
    assert text == (
        "Name             Maj Min Stat Open Targ Event  UUID                            \n"
        "a                  -   - L--w    1    1      0                                 \n"
        "b                  -   - L--w    0    1      0 UUID-B                          \n"
        "c                  -   - L--w    0    2      0                                 \n"
        "d                  -   - ---w    0    0      0                                 \n")


def test_info_columns_options_noheadings_separator() -> None:
    fields = report.pick_fields("name,attr,open,segments,events,uuid,suspended")
    assert report.columns(ROWS[:2], fields) == (
        "Name             Stat Open Targ Event  UUID                             Suspended\n"
        "a                L--w    1    1      0                                  Active   \n"
        "b                L--w    0    1      0 UUID-B                           Active   \n")
    assert report.columns(ROWS, report.pick_fields(None), headings=False) == (
        "a:-:-:L--w:1:1:0:\nb:-:-:L--w:0:1:0:UUID-B\nc:-:-:L--w:0:2:0:\nd:-:-:---w:0:0:0:\n")
    assert report.columns(ROWS[:2], report.pick_fields("name,open"), headings=False,
                          separator=",") == "a,1\nb,0\n"
    assert report.columns(ROWS[:1], report.pick_fields("name,open"), separator=",") \
        == "Name,Open\na,1\n"
    assert [f.id for f in report.pick_fields("+suspended")][-2:] == ["uuid", "suspended"]
    suspended = report.Row(info("x", inactive=True, suspended=True))
    assert report.columns([suspended], report.pick_fields("attr,tables_loaded,suspended,"
                                                          "readonly"), headings=False) \
        == "LIsw:Both:Suspended:Writeable\n"
    long_name = report.Row(info("a-name-longer-than-16"))
    assert report.columns([long_name], report.pick_fields("name,open")) == (
        "Name                  Open\na-name-longer-than-16    0\n")


def test_unknown_field() -> None:
    with pytest.raises(report.FieldError) as exc:
        report.pick_fields("name,bogus")
    text = str(exc.value)
    assert text.startswith("Mapped Device Name Fields\n-------------------------\n"
                           "  name_all              - All fields in this section.\n"
                           "  name                  - Name of mapped device.\n")
    assert text.endswith(" \nUnrecognised field: bogus\n")


def test_info_long() -> None:
    assert report.info_long(info("b", uuid="UUID-B")) == (
        "Name:              b\nState:             ACTIVE\nTables present:    LIVE\n"
        "Open count:        0\nEvent number:      0\nNumber of targets: 1\nUUID: UUID-B\n\n")
    assert report.info_long(info("a", inactive=True, suspended=True, open_count=1)) == (
        "Name:              a\nState:             SUSPENDED\n"
        "Tables present:    LIVE & INACTIVE\nOpen count:        1\nEvent number:      0\n"
        "Number of targets: 1\n\n")
    assert "Tables present:    None\n" in report.info_long(info("d", live=False))


def test_lines_ls_deps_targets() -> None:
    assert report.dm_line("0 1024 zero") == "0 1024 zero "
    assert report.dm_line("0 2048 linear /a.img 0") == "0 2048 linear /a.img 0"
    assert report.ls_line("a", "/run/dmuser/a") == "a\t(/run/dmuser/a)\n"
    words = report.device_words(["0 8 mirror core 1 16 2 /x.img 0 8:16 0",
                                 "8 8 linear /x.img 8"])
    assert words == ["8:16", "/x.img"]  # the kernel's order: the last new one first
    assert report.deps_line(words, "m: ") == "m: 2 dependencies\t: (8, 16) (/x.img)\n"
    assert report.deps_line([]) == "0 dependencies\t:\n"
    assert report.targets_text({"linear": (1, 4, 0), "snapshot-origin": (1, 9, 0)}) == (
        "linear           v1.4.0\nsnapshot-origin  v1.9.0\n")


# -- commands on a fake client ------------------------------------------------------------


class FakeClient:
    """Records calls; knows devices ``a`` (a file) and ``b`` (stacked on ``a``)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.busy = 0

    def ping(self) -> DaemonInfo:
        return DaemonInfo(1, "/mnt")

    def ls(self) -> dict[str, str]:
        return {"a": "/mnt/a", "b": "/mnt/b"}

    def create(self, name: str, table: str | None, *, uuid: str = "",
               read_only: bool = False) -> str:
        self.calls.append(("create", name, table, uuid) + (("ro",) if read_only else ()))
        return "/mnt/" + name

    def reload(self, name: str, table: str, *, read_only: bool = False) -> None:
        self.calls.append(("reload", name, table) + (("ro",) if read_only else ()))

    def suspend(self, name: str, *, noflush: bool = False, nolockfs: bool = False) -> None:
        self.calls.append(("suspend", name, noflush) + (("nolockfs",) if nolockfs else ()))

    def resume(self, name: str, *, nolockfs: bool = False) -> None:
        self.calls.append(("resume", name) + (("nolockfs",) if nolockfs else ()))

    def info(self, name: str) -> DeviceInfo:
        return info(name)

    def remove(self, name: str, *, force: bool = False, deferred: bool = False) -> None:
        self.calls.append(("remove", name, force) + (("deferred",) if deferred else ()))
        if name == "nosuch":
            raise NoSuchDevice("Device nosuch does not exist.")
        if self.busy:
            self.busy -= 1
            raise DeviceBusy("Device a is busy.")

    def info_all(self) -> list[DeviceInfo]:
        return [info("a", uuid="U-A"), info("b")]

    def call(self, verb: str, **fields: Any) -> Reply:
        data = {"a": ["0 8 linear /x.img 0"], "b": ["0 8 linear /mnt/a 0", "8 8 zero"]}
        name = fields.get("name")
        return Reply("", {name: data[name]} if name else data)


def test_create_reads_tables_and_resolves_dev_mapper(tmp_path: Path) -> None:
    c = FakeClient()
    assert run(["create", "x", "--table", "0 8 linear /dev/mapper/a 0"], c) == (0, "", "")
    (tmp_path / "t").write_text("0 8 linear /dev/mapper/b 0\n8 8 linear /dev/mapper/zz 0\n")
    assert run(["create", "y", str(tmp_path / "t"), "-u", "U"], c)[0] == 0
    assert run(["create", "z"], c, stdin="0 8 zero\n")[0] == 0
    assert run(["create", "n", "--notable"], c)[0] == 0
    assert run(["load", "x"], c, stdin="0 8 error\n")[0] == 0
    assert c.calls == [("create", "x", "0 8 linear /mnt/a 0\n", ""),
                       ("create", "y", "0 8 linear /mnt/b 0\n8 8 linear /dev/mapper/zz 0\n",
                        "U"),
                       ("create", "z", "0 8 zero\n", ""), ("create", "n", None, ""),
                       ("reload", "x", "0 8 error\n")]
    assert run(["create"], c) == (1, "", "Please provide a name for the new device.\n"
                                         "Command failed.\n")
    assert run(["load", "x", "--notable"], c) == (
        1, "", "--notable only available when creating new device.\nCommand failed.\n")
    assert run(["load", "x", str(tmp_path / "missing")], c) == (
        1, "", f"Couldn't open '{tmp_path / 'missing'}' for reading.\nCommand failed.\n")


def test_device_arguments_and_multi_device_failures() -> None:
    c = FakeClient()
    assert run(["suspend", "--nolockfs", "--noflush", "/dev/mapper/a", "/mnt/b"], c) \
        == (0, "", "")
    assert c.calls == [("suspend", "a", True, "nolockfs"), ("suspend", "b", True, "nolockfs")]
    assert run(["suspend"], c) == (1, "", "No device specified.\nCommand failed.\n")
    rc, _, err = run(["remove", "nosuch", "a"], c)
    assert rc == 1 and err == (
        "dmuser: Device nosuch does not exist.\n"
        "device-mapper: remove ioctl on nosuch  failed: No such device or address\n"
        "Command failed.\n")
    assert c.calls[-1] == ("remove", "a", False)  # went on after the failure


def test_dm_dev_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """lvm2's test library runs with its own $DM_DEV_DIR: NAME is $DM_DEV_DIR/mapper/NAME."""
    monkeypatch.setenv("DM_DEV_DIR", "/tmp/lvmtest/dev")
    c = FakeClient()
    assert run(["status", "/tmp/lvmtest/dev/mapper/a"], c)[0] == 0
    assert run(["create", "x", "--table", "0 8 linear /tmp/lvmtest/dev/mapper/b 0"], c)[0] == 0
    assert c.calls == [("create", "x", "0 8 linear /mnt/b 0\n", "")]


def test_remove_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    from dmuser.dmsetup import verbs

    monkeypatch.setattr(verbs, "RETRY_PAUSE", 0.0)
    c = FakeClient()
    c.busy = 3
    assert run(["remove", "--retry", "-f", "a"], c) == (0, "", "")
    # --force as dmsetup: an error table of the device's size first, then removes
    assert c.calls == [("reload", "a", "0 2048 error\n"), ("resume", "a")] + [
        ("remove", "a", False)] * 4
    c.busy, c.calls = 1, []
    rc, _, err = run(["remove", "--deferred", "a"], c)
    assert c.calls == [("remove", "a", False, "deferred")]
    assert rc == 1 and "remove ioctl on a  failed: Device or resource busy\n" in err


def test_uuid_selects_the_device_and_table_listing() -> None:
    c = FakeClient()
    assert run(["-u", "U-A", "table"], c) == (0, "0 8 linear /x.img 0\n", "")
    assert run(["-u", "U-NONE", "table"], c) == (1, "", "Device does not exist.\n"
                                                        "Command failed.\n")
    assert run(["table", "--target", "zero"], c) == (0, "b: 8 8 zero \n", "")
    assert run(["info", "-c", "--noheadings", "-o", "name,devs_used,names_using_dev"], c) \
        == (0, "a::b\nb:a:\n", "")


def test_no_op_and_unsupported_commands() -> None:
    for argv in (["mknodes"], ["mknodes", "a"], ["udevcomplete_all"], ["-y", "udevcomplete_all"]):
        assert run(argv, FakeClient()) == (0, "", "")
    assert run(["rename", "a", "b"], FakeClient()) == (
        1, "", "dmuser: dmsetup rename is not supported\nCommand failed.\n")
    c = FakeClient()
    assert run(["create", "r", "-r", "--table", "0 8 zero"], c)[0] == 0
    assert c.calls == [("create", "r", "0 8 zero", "", "ro")]
    assert run(["create", "--concise", "x,,,,0 8 zero"], FakeClient()) == (
        1, "", "dmuser: --concise is not supported\nCommand failed.\n")
    c = FakeClient()
    assert run(["load", "-u", "U-A"], c, stdin="0 8 zero\n") == (0, "", "")
    assert run(["load", "/dev/mapper/b", "--table", "0 8 zero"], c) == (0, "", "")
    assert c.calls == [("reload", "a", "0 8 zero\n"), ("reload", "b", "0 8 zero")]


def test_install_shim(tmp_path: Path) -> None:
    rc, out, _ = run(["--install-shim", str(tmp_path / "bin"), "--socket", "/x/s.sock"])
    shim = tmp_path / "bin" / "dmsetup"
    assert rc == 0 and out == f"{shim}\n"
    assert shim.stat().st_mode & stat.S_IXUSR
    text = shim.read_text()
    assert text.startswith("#!/bin/sh\n") and '-m dmuser dmsetup "$@"' in text
    assert 'DMUSER_SOCKET="${DMUSER_SOCKET:-/x/s.sock}"' in text
    assert run(["--install-shim"])[0] == 2
