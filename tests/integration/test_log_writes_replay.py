"""log-writes through a real daemon, read back by fstests' own ``replay-log``.

A workload of O_DIRECT writes (``dd oflag=direct``), fsyncs, a discard-free
mix of sizes and ``mark`` messages runs on a log-writes device; after its
removal the log file is read by ``dmuser.formats.logwrites`` and by
``replay-log`` built from the fstests tarball (``../shared/third_party`` beside the repository,
or ``$DMUSER_FSTESTS_TARBALL``) by ``tools/fstests_build.py``: taken from the
cached fstests build, or compiled alone with gcc in about a second.  Both must agree on
the number of entries, on where each mark is, and on the replayed bytes at each
mark, which must also be the data device's bytes at the time of the mark.
The kernel's own log (vector ``log-writes``) is checked the same way.  Skipped
when the tarball or gcc is missing.  (replay-log's usage text says
``--number-entries``; the option it parses is ``--num-entries``.)
"""

from __future__ import annotations

import lzma
import subprocess
import sys
from pathlib import Path

import pytest
from support.data import make_image, pattern
from support.vectors import VECTORS

from dmuser.formats.logwrites import LOG_FLUSH_FLAG, decode_log, replay

S = 512
MiB = 1 << 20
TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import fstests_build  # noqa: E402  (tools/: the one place that builds fstests)


@pytest.fixture(scope="module")
def replay_log() -> Path:
    try:
        return fstests_build.replay_log()
    except fstests_build.BuildError as exc:
        pytest.skip(str(exc))


def _dd(src: Path, dev: Path, sector: int, *extra: str) -> None:
    subprocess.run(["dd", f"if={src}", f"of={dev}", f"bs={src.stat().st_size}", "count=1",
                    f"seek={sector * S}", "oflag=direct,seek_bytes", "conv=notrunc",
                    "status=none", *extra], check=True, timeout=60)


def test_replay_log_replays_a_dmuser_log_like_dmuser(daemon, replay_log: Path) -> None:
    d = daemon
    data_img = d.dir / "data.img"
    log_img = d.dir / "log.img"
    make_image(data_img, 4 * MiB)
    make_image(log_img, 8 * MiB)
    dev = d.create("lw", "0 8192 log-writes data.img log.img")
    at_mark: dict[str, bytes] = {}
    step = 0
    for mark in ("m1", "m2", "m3"):
        for sector, sectors in ((8, 8), (100, 64), (3000, 1), (8, 16), (5000, 256)):
            step += 1
            chunk = d.dir / f"c{step}"
            chunk.write_bytes(pattern(f"{mark}-{step}", sectors * S))
            last = sectors == 256
            _dd(chunk, dev, sector + step, *(("conv=notrunc,fsync",) if last else ()))
        d.cli("message", "lw", "0", "mark", mark)
        at_mark[mark] = data_img.read_bytes()
    _dd(d.dir / "c1", dev, 7000)                     # unflushed: logged at removal
    d.cli("remove", "lw")

    raw = log_img.read_bytes()
    sup, entries = decode_log(raw)
    assert sup.nr_entries == len(entries) > 3 * 6
    assert entries[-1].mark == b"dm-log-writes-end"
    assert sum(1 for e in entries if e.flags & LOG_FLUSH_FLAG) >= 3

    def tool(*args: str) -> str:
        return subprocess.run([str(replay_log), "--log", str(log_img), *args], check=True,
                              capture_output=True, text=True, timeout=60).stdout

    assert tool("--num-entries").strip() == str(sup.nr_entries)
    for mark, want in at_mark.items():
        (entry,) = [e for e in entries if e.mark == mark.encode()]
        assert tool("--find", "--end-mark", mark).strip() == \
            f"{entry.index}@{entry.offset // S + 1}"
        ours = bytearray(4 * MiB)
        replay(entries, ours, end_mark=mark.encode())
        theirs = d.dir / f"replay-{mark}.img"
        make_image(theirs, 4 * MiB)
        tool("--replay", str(theirs), "--end-mark", mark)
        assert theirs.read_bytes() == ours == want, mark
    ours = bytearray(4 * MiB)
    replay(entries, ours)
    theirs = d.dir / "replay-all.img"
    make_image(theirs, 4 * MiB)
    tool("--replay", str(theirs))
    assert theirs.read_bytes() == ours == data_img.read_bytes()


def test_replay_log_and_dmuser_agree_on_the_kernel_log(tmp_path: Path, replay_log: Path) -> None:
    log_img = tmp_path / "log.img"
    log_img.write_bytes(lzma.decompress((VECTORS / "log-writes" / "b.img.xz").read_bytes()))
    sup, entries = decode_log(log_img.read_bytes())
    for limit in range(1, sup.nr_entries + 1):
        ours = bytearray(4 * MiB)
        replay(entries, ours, limit=limit)
        theirs = tmp_path / "r.img"
        make_image(theirs, 4 * MiB)
        subprocess.run([str(replay_log), "--log", str(log_img), "--replay", str(theirs),
                        "--limit", str(limit)], check=True, capture_output=True, timeout=60)
        assert theirs.read_bytes() == ours, limit
