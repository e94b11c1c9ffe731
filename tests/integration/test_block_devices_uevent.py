"""The change uevent of a resume (``dmuser serve --block-devices``, root).

The kernel's ``dm_resume`` sends a ``change`` uevent for the dm device, which
makes udev read it again after a table swap; dmuser sends one for the mapped
device's loop device (``LoopDevices.resumed``).  The test listens on a
``NETLINK_KOBJECT_UEVENT`` socket (the kernel's own events, no udev needed).
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterator

import pytest
from support.blockdev import bd_name, block_device_daemon, ok
from support.daemon import Daemon, DaemonFactory
from support.data import make_image

MiB = 1 << 20

pytestmark = [pytest.mark.root, pytest.mark.loop, pytest.mark.fuse, pytest.mark.timeout(60)]

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1


@pytest.fixture
def bd(make_daemon: DaemonFactory) -> Iterator[Daemon]:
    with block_device_daemon(make_daemon) as d:
        yield d


@pytest.fixture
def uevents() -> Iterator[socket.socket]:
    """A socket that receives every kernel uevent from now on."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
        sock.bind((0, KERNEL_GROUP))
        yield sock
    finally:
        sock.close()


def _change_events(sock: socket.socket, loop: str, wait: float) -> list[list[bytes]]:
    """The ``change`` uevents (their fields) of block device ``loop`` queued on
    ``sock``, waiting up to ``wait`` seconds for the first one (a limit, not a
    measurement); the kernel queues an event before the write that made it returns,
    so by then every event of a finished verb is in the queue."""
    found: list[list[bytes]] = []
    deadline = time.monotonic() + wait
    while True:
        left = deadline - time.monotonic() if not found else 0.0
        if not select.select([sock], [], [], max(left, 0.0))[0]:
            return found
        fields = sock.recv(1 << 16).split(b"\0")
        if fields[0].startswith(b"change@") and f"DEVNAME={loop}".encode() in fields:
            found.append(fields)


def _changes(sock: socket.socket, loop: str, wait: float) -> int:
    return len(_change_events(sock, loop, wait))


def test_a_resume_of_a_suspended_device_sends_a_change_uevent(
        bd: Daemon, uevents: socket.socket) -> None:
    d = bd
    name = bd_name("a")
    make_image(d.dir / "a.img", 8 * MiB)
    d.create(name, "0 8192 linear a.img 0")
    loop = os.path.basename(d.info(name)["block_device"])
    _changes(uevents, loop, 0)  # the attach's own events

    # the counts of the kernel's dm (kvm-dm): a resume of a running device sends no
    # event, a suspend none, the resume of a suspended device one
    d.request("resume", name=name)
    d.request("suspend", name=name)
    assert _changes(uevents, loop, 0) == 0
    d.request("resume", name=name)
    assert _changes(uevents, loop, 10) == 1

    # a new table of the same size (no losetup -c, whose resize sends an event of
    # its own) resumed on the running device, through dmsetup's verbs: one event
    ok(d, "reload", name, "--table", f"0 8192 linear {d.dir / 'a.img'} 4096")
    ok(d, "resume", name)
    assert _changes(uevents, loop, 10) == 1
    assert d.table_lines(name) == [f"0 8192 linear {d.dir / 'a.img'} 4096"]


def test_a_resize_sends_one_change_uevent_with_resize(
        bd: Daemon, uevents: socket.socket) -> None:
    """dm sends one event on a resume that changes the size, with ``RESIZE=1``
    (``dm_resume`` after ``set_capacity_and_notify``); dmuser's is the loop
    driver's own, sent once udev may see the device again."""
    d = bd
    name = bd_name("r")
    make_image(d.dir / "r.img", 16 * MiB)
    d.create(name, f"0 8192 linear {d.dir / 'r.img'} 0")
    loop = os.path.basename(d.info(name)["block_device"])
    _changes(uevents, loop, 0)  # the attach's own events

    ok(d, "reload", name, "--table", f"0 16384 linear {d.dir / 'r.img'} 0")
    ok(d, "resume", name)
    events = _change_events(uevents, loop, 10)
    assert len(events) == 1, events
    assert b"RESIZE=1" in events[0], events[0]
    with open(f"/sys/block/{loop}/size") as f:
        assert int(f.read()) == 16384

    # shrinking, through suspend and resume as separate verbs: the same
    ok(d, "suspend", name)
    ok(d, "reload", name, "--table", f"0 4096 linear {d.dir / 'r.img'} 0")
    assert _changes(uevents, loop, 0) == 0
    ok(d, "resume", name)
    events = _change_events(uevents, loop, 10)
    assert len(events) == 1 and b"RESIZE=1" in events[0], events
    with open(f"/sys/block/{loop}/size") as f:
        assert int(f.read()) == 4096
