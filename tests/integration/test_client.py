"""The Python API (``dmuser.Client``, ``dmuser.AsyncClient``) against a real daemon.

Every verb of both clients, their typed results, the errors mapped from the
replies' errno, and ``wait``: woken by a snapshot becoming invalid and by a
mirror leg failing, ended by its timeout, by the device's removal and by the
daemon's shutdown; a client that hangs up leaves nothing waiting.  Tables use
absolute paths: the client sends the test process's working directory.
"""

from __future__ import annotations

import errno
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from support.daemon import Daemon, dmuser_cmd
from support.data import make_image, pattern, read_at, verify_at, write_at

import dmuser
from dmuser.status import (
    EmptyStatus,
    LinearTable,
    MirrorStatus,
    SnapshotStatus,
    SnapshotTable,
)

MiB = 1 << 20
KiB = 1 << 10
SECTOR = 512

pytestmark = [pytest.mark.fuse]


@pytest.fixture
def d(daemon: Daemon) -> Iterator[Daemon]:
    yield daemon
    daemon.unstack()


def client(d: Daemon) -> dmuser.Client:
    return dmuser.Client(d.sock, timeout=60)


class Waiter(threading.Thread):
    """``fn()`` in a thread: its result or its exception."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc


def test_every_sync_verb(d: Daemon) -> None:
    c = client(d)
    assert c.ping().pid == d.pid and c.ping().mountpoint == str(d.mnt)
    assert c.ls() == {} and c.info_all() == [] and c.status_all() == {}
    assert {"linear", "snapshot", "mirror"} <= set(c.targets())
    assert all(isinstance(v, tuple) and len(v) == 3 for v in c.targets().values())
    img = d.dir / "a.img"
    make_image(img, 1 * MiB)
    path = c.create("lin", f"0 {MiB // SECTOR} linear {img} 0", uuid="u-1")
    assert path == str(d.path("lin")) and c.ls() == {"lin": path}
    data = pattern("api", 8192)
    write_at(path, 4096, data)
    verify_at(img, 4096, data, "write through the device file")

    info = c.info("lin")
    assert isinstance(info, dmuser.DeviceInfo) and info == c.info_all()[0]
    assert (info.name, info.uuid, info.nr_sectors, info.live, info.inactive,
            info.suspended, info.event_nr) == ("lin", "u-1", MiB // SECTOR, True, False, False, 0)
    [line] = c.table("lin")
    assert isinstance(line, LinearTable) and line.offset == 0 and line.length == MiB // SECTOR
    [st] = c.status("lin")
    assert isinstance(st, EmptyStatus) and st.target_type == "linear"

    c.suspend("lin", noflush=True)
    assert c.info("lin").suspended
    c.resume("lin")
    c.reload("lin", [f"0 {MiB // SECTOR} zero"])
    assert c.info("lin").inactive and c.table("lin", inactive=True)[0].target_type == "zero"
    assert c.status("lin", inactive=True)[0].target_type == "zero"
    c.clear("lin")
    assert not c.info("lin").inactive and c.table("lin", inactive=True) == []
    assert c.call("table", name="lin").output.startswith("0 2048 linear ")

    with pytest.raises(dmuser.InvalidTable, match="does not support messages") as ei:
        c.message("lin", 0, "hello there")
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(dmuser.InvalidTable, match="Empty message received"):
        c.message("lin", 0, [])
    with pytest.raises(dmuser.DeviceExists):
        c.create("lin", f"0 8 linear {img} 0")
    with pytest.raises(dmuser.InvalidTable, match="linear"):
        c.create("bad", "0 8 linear")
    with pytest.raises(dmuser.NoSuchDevice, match="Device nope does not exist.") as en:
        c.info("nope")
    assert en.value.errno == errno.ENXIO and isinstance(en.value, dmuser.DmuserError)

    with open(path, "rb"):
        with pytest.raises(dmuser.DeviceBusy, match="busy"):
            c.remove("lin")
        c.remove("lin", force=True)
    assert c.ls() == {}

    c.create("empty", None)
    assert c.info("empty").live is False and c.table("empty") == []
    c.remove("empty")


def test_shutdown_then_daemon_not_running(d: Daemon) -> None:
    c = client(d)
    c.shutdown()
    d.wait()
    with pytest.raises(dmuser.DaemonNotRunning, match="no dmuser daemon is listening"):
        c.ping()


def test_client_side_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(dmuser.DaemonNotRunning) as e:
        dmuser.Client(tmp_path / "none.sock").ls()
    assert str(e.value).count("\n") == 0 and e.value.__cause__ is None
    with pytest.raises(dmuser.ConnectionFailed, match="socket path too long"):
        dmuser.Client("/" + "x" * 200).ls()


# -- wait --------------------------------------------------------------------------------


def test_wait_wakes_when_a_snapshot_becomes_invalid(d: Daemon) -> None:
    c = client(d)
    size = 2 * MiB
    make_image(d.dir / "origin.img", size, seed="w")
    make_image(d.dir / "small.img", 16 * 4 * KiB)
    origin = c.create("origin", f"0 {size // SECTOR} snapshot-origin {d.dir}/origin.img")
    c.suspend("origin")
    c.create("snap", f"0 {size // SECTOR} snapshot {d.dir}/origin.img {d.dir}/small.img P 8")
    c.resume("origin")
    [st] = c.status("snap")
    assert isinstance(st, SnapshotStatus) and st.valid
    assert (st.used_sectors, st.total_sectors, st.metadata_sectors) == (16, 128, 16)
    [t] = c.table("snap")
    assert isinstance(t, SnapshotTable) and t.persistent and t.chunk_size == 8

    nr = c.info("snap").event_nr
    waiter = Waiter(lambda: c.wait("snap", nr, timeout=60))
    time.sleep(0.3)
    assert waiter.is_alive(), "wait returned before any event"
    write_at(origin, 0, pattern("fill", 128 * KiB))  # 32 copies: the COW holds 14
    waiter.join(60)
    assert waiter.error is None and waiter.result == nr + 1, (waiter.result, waiter.error)
    [st] = c.status("snap")
    assert isinstance(st, SnapshotStatus) and st.invalid and st.used_sectors is None
    assert c.info("snap").event_nr == nr + 1
    assert c.wait("snap", nr) == nr + 1  # already past: returns at once
    res = d.cli("wait", "snap", str(nr), "--timeout", "30")
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")


def test_wait_timeout_removal_and_the_cli(d: Daemon) -> None:
    c = client(d)
    c.create("z", "0 8 zero")
    t0 = time.monotonic()
    with pytest.raises(dmuser.WaitTimeout, match="Timed out") as e:
        c.wait("z", timeout=0.3)
    assert e.value.errno == errno.ETIMEDOUT and 0.25 < time.monotonic() - t0 < 10
    with pytest.raises(dmuser.InvalidTable):
        c.wait("z", -1)
    res = d.cli("wait", "z", "0", "--timeout", "0.2", check=False)
    assert res.returncode == 1 and res.stderr.startswith("dmuser: wait z: Timed out"), res
    assert d.cli("wait", "z", "x", check=False).returncode == 2

    # a waiting CLI killed: the daemon drops the wait; removal ends the others
    proc = subprocess.Popen([*dmuser_cmd("wait", "z", "--socket", str(d.sock))],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    waiter = Waiter(lambda: c.wait("z"))
    time.sleep(0.5)
    assert proc.poll() is None and waiter.is_alive()
    proc.kill()
    proc.wait(10)
    c.remove("z")
    waiter.join(30)
    assert isinstance(waiter.error, dmuser.NoSuchDevice), waiter.error
    assert "Device z was removed." in str(waiter.error)
    assert "went away during wait" in d.log_text()


def test_wait_ends_on_daemon_shutdown(d: Daemon) -> None:
    c = client(d)
    c.create("z", "0 8 zero")
    waiter = Waiter(lambda: c.wait("z", 0))
    time.sleep(0.3)
    c.shutdown()
    waiter.join(30)
    assert not waiter.is_alive() and isinstance(waiter.error, dmuser.DmuserError), waiter.error
    d.wait()
    assert d.returncode == 0


def _env() -> dict[str, str]:
    from support.daemon import _env as env

    return env()


# -- the trio client ---------------------------------------------------------------------


def test_async_client_and_a_mirror_leg_failure(d: Daemon) -> None:
    size = 2 * MiB
    n = size // SECTOR
    make_image(d.dir / "l0.img", size, seed="m")
    make_image(d.dir / "l1.img", size, seed="m")
    make_image(d.dir / "log.img", 1 * MiB)

    async def main() -> None:
        c = dmuser.AsyncClient(d.sock, timeout=60)
        assert (await c.ping()).pid == d.pid
        assert "mirror" in await c.targets()
        await c.create("L1", f"0 {n} linear {d.dir}/l1.img 0")
        dev = await c.create("m", f"0 {n} mirror disk 3 {d.dir}/log.img 128 nosync 2 "
                                  f"{d.dir}/l0.img 0 L1 0 2 handle_errors keep_log")
        [st] = await c.status("m")
        assert isinstance(st, MirrorStatus) and st.in_sync and not st.degraded
        assert [leg.health for leg in st.legs] == ["A", "A"] and st.log_type == "disk"
        assert (await c.table("m"))[0].target_type == "mirror"
        nr = (await c.info("m")).event_nr
        with pytest.raises(dmuser.WaitTimeout):
            await c.wait("m", nr, timeout=0.2)

        await c.reload("L1", f"0 {n} error")
        await c.resume("L1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, write_at, dev, 65536,
                               pattern("x", 4096))
            assert await c.wait("m", nr, timeout=30) > nr
        [st] = await c.status("m")
        assert isinstance(st, MirrorStatus) and st.degraded and st.legs[1].health == "D"
        assert not st.in_sync

        assert "m" in await c.ls() and len(await c.info_all()) == 2
        assert set(await c.status_all()) == {"L1", "m"}
        await c.suspend("m", noflush=False)
        await c.resume("m")
        await c.reload("m", f"0 {n} zero")
        await c.clear("m")
        with pytest.raises(dmuser.InvalidTable):
            await c.message("m", 0, "")
        assert (await c.call("ls")).data[0]["name"] == "L1"
        await c.remove("m")
        with pytest.raises(dmuser.DeviceExists):
            await c.create("L1", "0 8 zero")
        await c.remove("L1")
        with pytest.raises(dmuser.NoSuchDevice):
            await c.wait("L1")
        # cancelling a wait closes its connection; the daemon lets go of it
        await c.create("z", "0 8 zero")
        with trio.move_on_after(0.3):
            await c.wait("z")
        await c.shutdown()

    trio.run(main)
    d.wait()
    assert read_at(d.dir / "l0.img", 65536, 4096) == pattern("x", 4096)


def test_the_readme_example_runs(d: Daemon, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The README's Python API example, with /srv/ replaced by the daemon's directory."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    subprocess.run(["truncate", "-s", "100M", str(d.dir / "a.img")], check=True)
    make_image(d.dir / "cow.img", 4 * MiB)
    monkeypatch.setenv("DMUSER_SOCKET", str(d.sock))
    exec(compile(code.replace("/srv/", f"{d.dir}/"), "README.md", "exec"), {})
    assert capsys.readouterr().out == "24 8192 False\n"
    assert read_at(d.dir / "a.img", 0, 6) == b"after!"
    assert read_at(d.path("snap"), 0, 6) == b"before"
