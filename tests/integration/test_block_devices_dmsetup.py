"""``dmuser dmsetup`` on block devices: the kernel's numbers in ``ls``/``info``/
``deps``/``table``/``status``, ``mknodes``, and ``remove`` (deferred, forced,
of a suspended device), checked against tests/vectors/dmsetup-blockdev and
tests/vectors/dm-table-devno.  Helpers: ``support/blockdev.py``.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.blockdev import (
    bd_name,
    block_device_daemon,
    ds,
    getsz,
    mapper,
    ok,
    settle,
    udev_rules_of,
)
from support.daemon import Daemon, DaemonFactory
from support.data import make_image
from support.system import udevd_running, wait_until

MiB = 1 << 20

pytestmark = [pytest.mark.root, pytest.mark.loop, pytest.mark.fuse]


@pytest.fixture
def bd(make_daemon: DaemonFactory) -> Iterator[Daemon]:
    with block_device_daemon(make_daemon) as d:
        yield d


def test_mknodes_repairs_the_links(bd: Daemon) -> None:
    """``dmsetup mknodes [NAME]`` as the kernel's (tests/vectors/dm-table-devno), but
    it removes only dmuser's own stale links: /dev/mapper is shared."""
    d = bd
    a, b = bd_name("a"), bd_name("b")
    make_image(d.dir / "a.img", 8 * MiB)
    ok(d, "create", a, "--table", f"0 8192 linear {d.dir / 'a.img'} 0")
    ok(d, "create", b, "--table", f"0 4096 linear {d.dir / 'a.img'} 8192")
    loop = {n: os.path.basename(d.info(n)["block_device"]) for n in (a, b)}
    mapper(a).unlink()  # missing
    mapper(b).unlink()
    mapper(b).symlink_to(f"../{loop[a]}")  # wrong
    stale = mapper(bd_name("up"))  # a dmuser link of no device (its loop is on our mount)
    stale.symlink_to(f"../{loop[a]}")
    dead = mapper(bd_name("dead"))  # a link to a detached loop device
    dead.symlink_to("../loop999999")
    foreign = mapper(bd_name("low"))  # not dmuser's: left alone
    foreign.symlink_to("../null")
    ok(d, "mknodes", a, "nosuch")  # an unknown name is ignored, as by dmsetup
    assert os.readlink(mapper(a)) == f"../{loop[a]}"
    assert os.readlink(mapper(b)) == f"../{loop[a]}"  # not named: untouched
    assert stale.is_symlink() and dead.is_symlink()
    ok(d, "mknodes")
    assert os.readlink(mapper(b)) == f"../{loop[b]}"
    assert getsz(mapper(b)) == 4096
    assert not stale.is_symlink() and not dead.is_symlink()
    assert os.readlink(foreign) == "../null"
    assert ok(d, "mknodes") == ""  # nothing left to do
    assert [os.readlink(mapper(n)) for n in (a, b)] == [f"../{loop[a]}", f"../{loop[b]}"]


def test_plain_remove_of_a_suspended_device(bd: Daemon) -> None:
    """udev probes no loop device of a suspended device (as the kernel's rules skip
    suspended dm devices): a probe would hang on it and hold it open, and a plain
    remove would fail with "busy".  The daemon's udev rule goes at shutdown."""
    with udevd_running():
        _plain_remove_of_a_suspended_device(bd)


def _plain_remove_of_a_suspended_device(d: Daemon) -> None:
    name = bd_name("a")
    make_image(d.dir / "a.img", 8 * MiB)
    ok(d, "create", name, "--table", f"0 16384 linear {d.dir / 'a.img'} 0")
    assert len(udev_rules_of(d)) == 1
    loop = os.path.basename(d.info(name)["block_device"])
    with open(mapper(name), "r+b") as f:  # a close after a write: udev's watch fires
        f.write(b"x" * 4096)
    ok(d, "suspend", name)
    Path(f"/sys/block/{loop}/uevent").write_text("change")  # as a probe's trigger would
    # every event is handled (a probe would still be stuck on the suspended device)
    settle = subprocess.run(["udevadm", "settle", "-t", "10"], capture_output=True,
                            text=True, timeout=60)
    assert settle.returncode == 0, settle.stderr
    assert ok(d, "remove", name) == ""
    assert d.devices() == []
    d.stop()
    assert udev_rules_of(d) == []


VECTOR = Path(__file__).parents[1] / "vectors" / "dm-table-devno" / "output.txt"


def test_tables_print_devices_as_the_kernel(bd: Daemon) -> None:
    """The linear devices of the vector's guest.sh, made on dmuser with /dev/vda a
    loop device and dm-0 the dmuser device "low": ``dmsetup table`` prints what
    the kernel printed (every device as MAJ:MIN), with the numbers mapped."""
    d = bd
    make_image(d.dir / "vda.img", 8 * MiB)
    vda = d.losetup(d.dir / "vda.img")
    rdev = os.stat(vda).st_rdev
    text = VECTOR.read_text().splitlines()
    creates = [m.groups() for line in text
               if (m := re.fullmatch(r"\+ dmsetup create (\S+) --table '(.*linear.*)'", line))]
    start = text.index("+ dmsetup table") + 1
    kernel = text[start:start + len(creates)]
    assert [n for n, _ in creates] == ["low", "a", "up1", "up2", "up3"] and len(kernel) == 5
    ours = {"254:0": f"{os.major(rdev)}:{os.minor(rdev)}", "/dev/vda": vda}
    for name, table in creates:
        ok(d, "create", bd_name(name), "--table",
           " ".join(ours.get(w, w).replace("/mapper/low", "/mapper/" + bd_name("low"))
                    for w in table.split()))
        if name == "low":
            ours |= {"253:0": d.info(bd_name(name))["block_devno"],
                     "/dev/dm-0": d.info(bd_name(name))["block_device"]}
    assert ok(d, "table") == "".join(
        bd_name(line.split(":")[0]) + ":" + " ".join(ours.get(w, w) for w in
                                                   line.split(":", 1)[1].split(" ")) + "\n"
        for line in kernel)
    for name, _ in reversed(creates):
        ok(d, "remove", bd_name(name))


def test_dmsetup_prints_the_block_device_numbers(bd: Daemon) -> None:
    d = bd
    low, up = bd_name("low"), bd_name("up")
    make_image(d.dir / "a.img", 8 * MiB)
    ok(d, "create", low, "-u", "U-LOW", "--table", f"0 8192 linear {d.dir / 'a.img'} 0")
    ok(d, "create", up, "--table", f"0 4096 linear /dev/mapper/{low} 0")
    ok(d, "create", bd_name("b"), "--notable")  # no table, so no block device yet
    settle()
    devno = {n: d.info(n)["block_devno"] for n in (low, up)}
    loop = {n: os.path.basename(d.info(n)["block_device"]) for n in (low, up)}
    maj, mnr = devno[low].split(":")
    assert ok(d, "ls") == (f"{bd_name('b')}\t({d.path(bd_name('b'))})\n"
                           f"{low}\t({devno[low]})\n{up}\t({devno[up]})\n")
    assert ok(d, "info", low) == (
        f"Name:              {low}\nState:             ACTIVE\nRead Ahead:        256\n"
        "Tables present:    LIVE\nOpen count:        0\nEvent number:      0\n"
        f"Major, minor:      {maj}, {mnr}\nNumber of targets: 1\nUUID: U-LOW\n\n")
    assert ok(d, "info", "-c", "--noheadings", "-o", "name,major,minor,devno,blkdevname",
              low, bd_name("b")) == (f"{low}:{maj}:{mnr}:{devno[low]}:{loop[low]}\n"
                                   f"{bd_name('b')}:-:-:-:{d.path(bd_name('b'))}\n")
    assert ok(d, "deps", up) == f"1 dependencies\t: ({maj}, {mnr})\n"
    assert ok(d, "info", "-c", "--noheadings", "-o", "name,devs_used,names_using_dev",
              low, up) == f"{low}::{up}\n{up}:{low}:\n"  # found by the MAJ:MIN in up's table
    assert ok(d, "info", "-c", "--noheadings", "-o", "name", "-j", maj, "-m", mnr) == f"{low}\n"
    assert ok(d, "info", "-c", "--noheadings", "-o", "name", "-u", "U-LOW") == f"{low}\n"
    assert ds(d, "info", "-j", maj, "-m", "99999") == (
        1, "", "Device does not exist.\nCommand failed.\n")
    assert ds(d, "info", "-j", maj) == (1, "", "Please specify both major number and minor "
                                           "number.\nCouldn't process command line.\n")


def test_remove_deferred_and_force_as_the_kernel(bd: Daemon) -> None:
    d = bd
    a, b = bd_name("a"), bd_name("b")
    make_image(d.dir / "a.img", 8 * MiB)
    for name in (a, b):
        ok(d, "create", name, "--table", f"0 8192 linear {d.dir / 'a.img'} 0")
    settle()
    fd = os.open(mapper(a), os.O_RDONLY)
    try:
        assert ok(d, "info", "-c", "--noheadings", "-o", "open", a, b) == "1\n0\n"
        ok(d, "remove", "--deferred", a)
        assert ok(d, "info", a).splitlines()[1] == "State:             ACTIVE (DEFERRED REMOVE)"
        assert ok(d, "info", "-c", "--noheadings", "-o", "attr", a) == "L--w\n"
        ok(d, "message", a, "0", "@cancel_deferred_remove")
        assert ok(d, "info", a).splitlines()[1] == "State:             ACTIVE"
        ok(d, "remove", "--deferred", a)
        assert d.devices() == [a, b]
    finally:
        os.close(fd)
    wait_until(lambda: d.devices() == [b], 10, what="the deferred remove after the close")
    assert not mapper(a).is_symlink()
    fd = os.open(mapper(b), os.O_RDONLY)
    try:
        rc, _, err = ds(d, "remove", "--force", b)
        assert rc == 1 and err.endswith(f"device-mapper: remove ioctl on {b}  failed: "
                                        "Device or resource busy\nCommand failed.\n"), err
        assert ok(d, "table", b) == "0 8192 error \n"
        with pytest.raises(OSError) as exc:
            os.pread(fd, 4096, 0)
        assert exc.value.errno == errno.EIO
    finally:
        os.close(fd)
    ok(d, "remove", b)
    assert d.devices() == []
