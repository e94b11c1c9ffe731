"""I/O through the device file: placement, suspend, reload under load, flush, size.

Blocking I/O on the device file runs in helper threads or processes, waited
for with timeouts; "still blocked" is checked as "not finished after a grace
period" while the daemon reports the device suspended, and "released" as
"finished within a deadline after resume".  If a test fails half-way, the
daemon's teardown removes the devices, which wakes every held request with
ENXIO, so no thread is left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from support.data import assert_bytes, make_image, pattern, read_at, verify_at, write_at
from support.system import Io

MiB = 1 << 20
SECTOR = 512


def test_two_segment_linear_places_bytes_in_the_right_backing_files(daemon) -> None:
    d = daemon
    a = make_image(d.dir / "a.img", 1 * MiB, seed="a")
    b = make_image(d.dir / "b.img", 1 * MiB, seed="b")
    # 1000 sectors from a.img at sector 48, then 1048 sectors from b.img at sector 0
    dev = d.create("two", "0 1000 linear a.img 48;1000 1048 linear b.img 0")
    assert os.stat(dev).st_size == 2048 * SECTOR
    # reads see the composite
    expect = bytearray(a[48 * SECTOR:1048 * SECTOR] + b[:1048 * SECTOR])
    verify_at(dev, 0, bytes(expect), "initial read")

    data = pattern("two", 2048 * SECTOR)
    write_at(dev, 0, data)
    expect[:] = data
    a_img = read_at(d.dir / "a.img", 0, 1 * MiB)
    b_img = read_at(d.dir / "b.img", 0, 1 * MiB)
    assert_bytes(a_img[48 * SECTOR:1048 * SECTOR], data[:1000 * SECTOR], "a.img mapped part")
    assert_bytes(a_img[:48 * SECTOR], a[:48 * SECTOR], "a.img before the mapping")
    assert_bytes(a_img[1048 * SECTOR:], a[1048 * SECTOR:], "a.img after the mapping")
    assert_bytes(b_img[:1048 * SECTOR], data[1000 * SECTOR:], "b.img mapped part")
    assert_bytes(b_img[1048 * SECTOR:], b[1048 * SECTOR:], "b.img after the mapping")

    # unaligned writes, one straddling the segment boundary (read-modify-write)
    for off, n in ((1000 * SECTOR - 700, 1500), (3, 10), (2048 * SECTOR - 5, 5),
                   (999 * SECTOR + 511, 2)):
        chunk = pattern(f"u{off}", n)
        write_at(dev, off, chunk)
        expect[off:off + n] = chunk
    verify_at(dev, 0, bytes(expect), "after unaligned writes")
    assert_bytes(read_at(d.dir / "a.img", 48 * SECTOR, 1000 * SECTOR),
                 bytes(expect[:1000 * SECTOR]), "a.img after unaligned writes")
    assert_bytes(read_at(d.dir / "b.img", 0, 1048 * SECTOR),
                 bytes(expect[1000 * SECTOR:]), "b.img after unaligned writes")

    # past the end: reads hit EOF, writes fail with ENOSPC
    assert read_at(dev, 2048 * SECTOR, 4096) == b""
    fd = os.open(dev, os.O_WRONLY)
    try:
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x" * 512, 2048 * SECTOR)
        assert exc.value.errno == 28  # ENOSPC
        assert os.pwrite(fd, b"y" * 1024, 2048 * SECTOR - 512) == 512  # clipped
    finally:
        os.close(fd)


def test_suspend_holds_io_until_resume(daemon) -> None:
    d = daemon
    make_image(d.dir / "a.img", 1 * MiB)
    dev = d.create("dev", "0 2048 linear a.img 0")
    old = pattern("old", 8192)
    write_at(dev, 0, old)
    new = pattern("new", 8192)

    d.cli("suspend", "dev")
    assert d.info("dev")["suspended"]
    reader = Io(lambda: read_at(dev, 0, 8192), start=False)
    writer = Io(lambda: write_at(dev, 65536, new), start=False)
    reader.start()
    writer.start()
    # Held: neither finishes while suspended; the control socket still answers.
    assert not reader.done.wait(1.0), (reader.result, reader.error)
    assert not writer.done.wait(0.2), writer.error
    assert d.info("dev")["suspended"]
    assert d.devices() == ["dev"]
    assert read_at(d.dir / "a.img", 65536, 8192) == bytes(8192)  # the write has not happened

    d.cli("resume", "dev")
    assert reader.done.wait(20) and writer.done.wait(20), "I/O still held after resume"
    assert reader.error is None and writer.error is None, (reader.error, writer.error)
    assert reader.result == old
    assert read_at(d.dir / "a.img", 65536, 8192) == new
    assert not d.info("dev")["suspended"]
    reader.join(5)
    writer.join(5)


def test_fork_and_exec_while_suspended_with_the_device_open(daemon) -> None:
    """Regression: every close() of a FUSE file sends FLUSH, also the close-on-exec in
    a forked child.  A flush that waited for resume hung any process holding the
    device open that ran a program (such as ``dmuser resume``) during a suspend."""
    d = daemon
    make_image(d.dir / "a.img", 1 * MiB)
    dev = d.create("dev", "0 2048 linear a.img 0")
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, pattern("dirty", 4096), 0)  # unflushed data on this handle
        d.request("suspend", name="dev")
        child = Io(lambda: subprocess.run(["true"], timeout=30).returncode, start=False)
        dup = Io(lambda: os.close(os.dup(fd)), start=False)
        child.start()
        dup.start()
        ok = child.done.wait(15) and dup.done.wait(15)
        d.request("resume", name="dev")  # in process: releases a hung child, if any
        assert ok, "fork+exec or close(dup) blocked while the device was suspended"
        assert child.result == 0 and dup.error is None
        os.fsync(fd)
    finally:
        os.close(fd)


def test_reload_without_resume_keeps_live_table(daemon) -> None:
    d = daemon
    make_image(d.dir / "a.img", 1 * MiB, seed="a")
    make_image(d.dir / "b.img", 1 * MiB, seed="b")
    dev = d.create("dev", "0 2048 linear a.img 0")
    d.reload("dev", "0 2048 linear b.img 0")
    info = d.info("dev")
    assert info["live"] and info["inactive"] and not info["suspended"]
    assert read_at(dev, 0, 4096) == read_at(d.dir / "a.img", 0, 4096)  # still a.img
    d.cli("resume", "dev")
    assert read_at(dev, 0, 4096) == read_at(d.dir / "b.img", 0, 4096)  # now b.img
    assert not d.info("dev")["inactive"]
    d.reload("dev", "0 2048 linear a.img 0")
    d.cli("clear", "dev")
    assert not d.info("dev")["inactive"]
    assert read_at(dev, 0, 4096) == read_at(d.dir / "b.img", 0, 4096)


FIO_SECTORS = 64 * MiB // SECTOR
FIO_TABLES = [
    f"0 {FIO_SECTORS} linear a.img 0",
    f"0 12345 linear a.img 0\n12345 {FIO_SECTORS - 12345} linear a.img 12345",
    (f"0 777 linear a.img 0\n777 {65536 - 777} linear a.img 777\n"
     f"65536 {FIO_SECTORS - 65536} linear a.img 65536"),
]


@pytest.mark.fio
@pytest.mark.slow
def test_reload_and_resume_under_fio_verify(daemon) -> None:
    d = daemon
    make_image(d.dir / "a.img", 64 * MiB)
    dev = d.create("fio", FIO_TABLES[0])
    cmd = ["fio", "--name=reload", f"--filename={dev}", "--rw=randwrite",
           "--bsrange=512-64k", "--blockalign=512", "--direct=1", "--ioengine=libaio",
           "--iodepth=8", "--size=48M", "--verify=crc32c", "--do_verify=1",
           "--verify_backlog=256", "--verify_fatal=1", "--time_based", "--runtime=10",
           "--randrepeat=0", "--output-format=normal"]
    fio = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           cwd=d.dir)
    reloads = 0
    try:
        time.sleep(0.5)  # let fio get going (not an assertion)
        deadline = time.monotonic() + 60
        while fio.poll() is None and time.monotonic() < deadline:
            table = FIO_TABLES[(reloads + 1) % len(FIO_TABLES)]
            # in process, not through the CLI: a CLI start costs ~0.3 s on a loaded machine
            d.request("reload", name="fio", table=table, cwd=str(d.dir))
            d.request("resume", name="fio")
            reloads += 1
        out, _ = fio.communicate(timeout=60)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.communicate()
    assert fio.returncode == 0, out
    assert "verify failed" not in out and "err= 0" in out, out
    assert reloads >= 10, f"only {reloads} reloads while fio ran"  # exercised, not a speed claim
    print(f"{reloads} reload+resume cycles under fio")
    assert len(d.table_lines("fio")) == len(FIO_TABLES[reloads % len(FIO_TABLES)].splitlines())
    assert not d.info("fio")["suspended"]


def test_fsync_reaches_the_backing_file(daemon) -> None:
    """What is observable without a block device: fsync succeeds, data is in the file."""
    d = daemon
    make_image(d.dir / "a.img", 1 * MiB)
    make_image(d.dir / "b.img", 1 * MiB)
    dev = d.create("dev", "0 1024 linear a.img 0;1024 1024 linear b.img 0")
    data = pattern("fsync", 1 * MiB)
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert read_at(d.dir / "a.img", 0, 512 * 1024) == data[:512 * 1024]
    assert read_at(d.dir / "b.img", 0, 512 * 1024) == data[512 * 1024:]


def _loop_stat(dev: str) -> dict[str, int]:
    fields = Path(f"/sys/block/{os.path.basename(dev)}/stat").read_text().split()
    names = ["reads", "read_merges", "read_sectors", "read_ticks", "writes", "write_merges",
             "write_sectors", "write_ticks", "in_flight", "io_ticks", "queue_ticks",
             "discards", "discard_merges", "discard_sectors", "discard_ticks", "flushes",
             "flush_ticks"]
    return dict(zip(names, map(int, fields), strict=False))


@pytest.mark.root
@pytest.mark.loop
def test_fsync_and_close_send_fdatasync_to_a_block_device(daemon) -> None:
    """With a loop device as the backing device, a flush is observable.

    dmuser writes to /dev/loopN with pwrite: the data sits in the loop device's
    page cache until something writes it back.  ``fdatasync`` of the block
    device writes it back and sends a FLUSH request, which the kernel counts in
    /sys/block/loopN/stat and which reaches the image file behind the loop
    device.  So: after a plain write, no flush was counted; after fsync (and
    after close) of the dmuser file, a flush was counted and the image file
    holds the data.
    """
    d = daemon
    make_image(d.dir / "back.img", 4 * MiB)
    loop = d.losetup(d.dir / "back.img")
    if "flushes" not in _loop_stat(loop):
        pytest.fail("kernel too old: no flush counter in /sys/block/*/stat")
    dev = d.create("dev", f"0 {4 * MiB // SECTOR} linear {loop} 0")
    assert d.table_lines("dev")[0].split()[3].count(":") == 1  # shown as MAJ:MIN

    data = pattern("loop-fsync", 256 * 1024)
    fd = os.open(dev, os.O_WRONLY)
    try:
        before = _loop_stat(loop)
        os.pwrite(fd, data, 1 * MiB)
        after_write = _loop_stat(loop)
        assert after_write["flushes"] == before["flushes"], "a plain write should not flush"
        os.fsync(fd)
        after_fsync = _loop_stat(loop)
        assert after_fsync["flushes"] > after_write["flushes"], (before, after_fsync)
        assert after_fsync["write_sectors"] - before["write_sectors"] >= len(data) // SECTOR
        assert read_at(d.dir / "back.img", 1 * MiB, len(data)) == data

        more = pattern("loop-close", 4096)
        os.pwrite(fd, more, 3 * MiB)
        mid = _loop_stat(loop)
    finally:
        os.close(fd)  # FUSE flush on close: fdatasync too
    after_close = _loop_stat(loop)
    assert after_close["flushes"] > mid["flushes"]
    assert read_at(d.dir / "back.img", 3 * MiB, len(more)) == more


def test_table_size_change_on_reload_and_resume(daemon) -> None:
    d = daemon
    make_image(d.dir / "a.img", 4 * MiB)
    dev = d.create("dev", "0 1024 linear a.img 0")
    assert os.stat(dev).st_size == 1024 * SECTOR
    data = pattern("grow", 2 * MiB)
    prev = 1024
    for sectors in (4096, 2048, 8, 8192):
        d.reload("dev", f"0 {sectors} linear a.img 0")
        assert os.stat(dev).st_size == prev * SECTOR  # the live table rules until resume
        d.cli("resume", "dev")
        assert os.stat(dev).st_size == sectors * SECTOR
        assert os.stat(dev).st_blocks == sectors
        assert d.info("dev")["nr_sectors"] == sectors
        # reads stop at the new end; writes past it fail
        assert len(read_at(dev, 0, 8 * MiB)) == sectors * SECTOR
        fd = os.open(dev, os.O_WRONLY)
        try:
            with pytest.raises(OSError):
                os.pwrite(fd, b"z" * 512, sectors * SECTOR)
        finally:
            os.close(fd)
        st = os.statvfs(d.mnt)
        assert st.f_blocks * st.f_frsize == sectors * SECTOR
        prev = sectors
    write_at(dev, 0, data)
    assert read_at(d.dir / "a.img", 0, len(data)) == data
    # a multi-target table: size is the sum
    d.reload("dev", "0 100 zero;100 300 linear a.img 0;400 24 error")
    d.cli("resume", "dev")
    assert os.stat(dev).st_size == 424 * SECTOR
    assert shutil.disk_usage(d.mnt).total == 424 * SECTOR
