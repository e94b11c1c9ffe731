"""Hostile input that used to get through, refused with a clear error, the daemon unharmed.

* A COW whose exception records are impossible (past the device, a metadata
  area, an origin or COW chunk twice, random bytes in an area) is refused at
  table load with the metadata area, record index and problem in the error,
  the same words ``dmuser cow check`` prints; the other devices keep working.
* A device of 2^54 sectors or more is refused; the mount keeps listing every
  device (readdir, getattr and statfs never fail on one bad entry).
* A client that may not use the socket, or names one longer than a Unix
  socket address holds, gets one line and exit 1 (2 for ``serve``), no traceback.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.fuse]

S = 512
CS = 16                                  # COW chunk size in sectors: 512 records an area
AREA1 = 1 + (CS * S // 16 + 1)           # chunk of metadata area 1


def dmuser(*args: str, cwd: Path, user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dmuser", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)


def cow_image(path: Path, records: list[tuple[int, int]], chunks: int = 2048) -> None:
    """A valid-headed persistent COW ("SnAp", valid, v1, chunk 16) with these records."""
    img = bytearray(chunks * CS * S)
    struct.pack_into("<IIII", img, 0, 0x70416E53, 1, 1, CS)
    for i, (old, new) in enumerate(records):
        area, index = divmod(i, CS * S // 16)
        struct.pack_into("<QQ", img, (1 + area * (CS * S // 16 + 1)) * CS * S + 16 * index,
                         old, new)
    path.write_bytes(bytes(img))


def good_records(n: int) -> list[tuple[int, int]]:
    """n exceptions as a fresh store allocates them (skipping the metadata areas)."""
    out, new = [], 2
    while len(out) < n:
        if new % (CS * S // 16 + 1) != 1:
            out.append((len(out) * 2, new))
        new += 1
    return out


@pytest.fixture
def env(daemon: Any) -> Any:
    d = daemon
    (d.dir / "origin.img").write_bytes(os.urandom(2048 * CS * S))
    (d.dir / "other.img").write_bytes(bytes(64 * S))
    assert dmuser("create", "other", "--table", "0 64 linear other.img 0",
                  "--socket", str(d.sock), cwd=d.dir).returncode == 0
    d.other_data = os.urandom(64 * S)
    (d.mnt / "other").write_bytes(d.other_data)
    return d


def unharmed(d: Any, names: list[str]) -> None:
    """The daemon answers, lists exactly ``names``, and the other device holds its data."""
    res = dmuser("ls", "--socket", str(d.sock), cwd=d.dir)
    assert res.returncode == 0, res.stderr
    assert sorted(line.split()[0] for line in res.stdout.splitlines()) == sorted(names)
    assert sorted(os.listdir(d.mnt)) == sorted(names)
    assert (d.mnt / "other").read_bytes() == d.other_data


SPAN = 512 + 10                           # records: area 0 full, 10 in area 1
CASES = {
    "past the end": (SPAN - 3, (9_999, 5_000), "COW chunk 5000 lies beyond the end"),
    "into area 1": (SPAN - 3, (9_999, AREA1), f"COW chunk {AREA1} is a metadata area"),
    "into area 0": (SPAN - 3, (9_999, 1), "COW chunk 1 is a metadata area"),
    "origin chunk twice": (SPAN - 3, (0, 1_900), "origin chunk 0 already has an exception "
                                                 "(metadata area 0 record 0)"),
    "COW chunk twice": (SPAN - 3, (9_999, 2), "COW chunk 2 is already used by metadata "
                                              "area 0 record 0"),
}


@pytest.mark.parametrize("case", CASES)
def test_impossible_cow_records_are_refused(env: Any, case: str) -> None:
    index, record, problem = CASES[case]
    records = good_records(SPAN)
    records[index] = record
    cow_image(env.dir / "cow.img", records)
    where = f"metadata area 1 record {index - 512}: "
    res = dmuser("create", "snap", "--table", f"0 {2048 * CS} snapshot origin.img cow.img P 16",
                 "--socket", str(env.sock), cwd=env.dir)
    assert res.returncode == 1, res.stdout
    assert len(res.stderr.splitlines()) == 1 and where + problem in res.stderr, res.stderr
    check = dmuser("cow", "check", "cow.img", cwd=env.dir)
    assert check.returncode == 1 and f"damage: {where}{problem}" in check.stdout, check.stdout
    unharmed(env, ["other"])


def test_random_bytes_in_a_metadata_area_are_refused(env: Any) -> None:
    records = good_records(SPAN)
    cow_image(env.dir / "cow.img", records)
    with open(env.dir / "cow.img", "r+b") as f:
        f.seek(AREA1 * CS * S)
        f.write(os.urandom(CS * S))
    res = dmuser("create", "snap", "--table", f"0 {2048 * CS} snapshot origin.img cow.img P 16",
                 "--socket", str(env.sock), cwd=env.dir)
    assert res.returncode == 1 and "metadata area 1 record 0: " in res.stderr, res.stderr
    unharmed(env, ["other"])


def test_the_valid_cow_loads(env: Any) -> None:
    """The images above are refused for their one bad record, not for their layout."""
    cow_image(env.dir / "cow.img", good_records(SPAN))
    res = dmuser("create", "snap", "--table", f"0 {2048 * CS} snapshot origin.img cow.img P 16",
                 "--socket", str(env.sock), cwd=env.dir)
    assert res.returncode == 0, res.stderr
    status = dmuser("status", "snap", "--socket", str(env.sock), cwd=env.dir).stdout.split()
    assert status[3].split("/")[0] == str((good_records(SPAN)[-1][1] + 1) * CS), status
    assert dmuser("remove", "snap", "--socket", str(env.sock), cwd=env.dir).returncode == 0
    unharmed(env, ["other"])


def test_a_device_too_large_for_a_file_is_refused(env: Any) -> None:
    res = dmuser("create", "big", "--table", "0 18014398509481984 zero",
                 "--socket", str(env.sock), cwd=env.dir)
    assert res.returncode == 1 and "too large" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    unharmed(env, ["other"])
    # the largest size a file can hold is accepted, and the mount still lists everything
    res = dmuser("create", "big", "--table", "0 18014398509481983 zero",
                 "--socket", str(env.sock), cwd=env.dir)
    assert res.returncode == 0, res.stderr
    unharmed(env, ["big", "other"])
    assert (env.mnt / "big").stat().st_size == 18014398509481983 * S
    assert os.statvfs(env.mnt).f_blocks >= 18014398509481983
    assert dmuser("remove", "big", "--socket", str(env.sock), cwd=env.dir).returncode == 0


@pytest.mark.root
def test_a_user_who_may_not_connect_gets_one_line(env: Any) -> None:
    os.chmod(env.dir, 0o755)
    res = dmuser("ls", "--socket", str(env.sock), cwd=Path("/"), user="nobody")
    assert res.returncode == 1
    assert res.stderr == (f"dmuser: ls: cannot connect to {env.sock}: permission denied "
                          "(the daemon runs as root?)\n")
    unharmed(env, ["other"])


def test_a_socket_path_too_long_gets_one_line(tmp_path: Path) -> None:
    long = str(tmp_path / ("s" * 120))
    res = dmuser("status", "--socket", long, cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.startswith("dmuser: status: socket path too long")
    assert len(res.stderr.splitlines()) == 1
    res = dmuser("serve", "--socket", long, "--mountpoint", str(tmp_path / "m"), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("dmuser: serve: socket path too long")
    assert not (tmp_path / "m").exists()
