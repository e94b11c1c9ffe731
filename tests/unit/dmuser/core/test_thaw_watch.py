"""The thaw watcher's side of its pipe protocol (``dmuser/core/thaw_watch.py``): at
end of file it thaws what was announced and not forgotten, nothing else.  The
daemon's side, with a real freeze and a killed daemon, is
``tests/integration/test_block_devices_thaw_watch.py``."""

from __future__ import annotations

import io
import json

import pytest

from dmuser.core import thaw_watch
from dmuser.core.hostdev import Mount


def _freeze(ident: int, path: str, device: str = "/dev/loop7") -> str:
    return f"freeze {ident} " + json.dumps([path, 2049, "ext4", device, device]) + "\n"


def test_at_end_of_file_it_thaws_what_was_announced_and_not_forgotten(
        monkeypatch: pytest.MonkeyPatch) -> None:
    thawed: list[tuple[Mount, str]] = []
    monkeypatch.setattr(thaw_watch, "thaw_fs", lambda m, dev: thawed.append((m, dev)))
    lines = (_freeze(0, "/mnt/a") + _freeze(1, "/mnt/b", "/dev/loop8") + "forget 0\n"
             + _freeze(2, "/mnt/c") + "forget 2\n")
    assert thaw_watch._watch(io.StringIO(lines)) == 0
    assert thawed == [(Mount("/mnt/b", 2049, "ext4", "/dev/loop8"), "/dev/loop8")]


def test_nothing_announced_nothing_thawed(monkeypatch: pytest.MonkeyPatch) -> None:
    thawed: list[Mount] = []
    monkeypatch.setattr(thaw_watch, "thaw_fs", lambda m, dev: thawed.append(m))
    assert thaw_watch._watch(io.StringIO(_freeze(0, "/mnt/a") + "forget 0\n")) == 0
    assert thawed == []


def test_a_failed_thaw_is_reported_and_the_others_still_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    thawed: list[str] = []

    def thaw(m: Mount, dev: str) -> None:
        if m.path == "/mnt/a":
            raise OSError(5, "Input/output error")
        thawed.append(m.path)

    monkeypatch.setattr(thaw_watch, "thaw_fs", thaw)
    assert thaw_watch._watch(io.StringIO(_freeze(0, "/mnt/a") + _freeze(1, "/mnt/b"))) == 1
    assert thawed == ["/mnt/b"]


def test_the_watcher_outlives_signals_meant_for_its_daemon() -> None:
    """SIGTERM/SIGINT/SIGHUP (a cgroup stop, ^C, pkill -f dmuser) leave the watcher
    running; only the end of its pipe ends it (and then with nothing to thaw: 0)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "dmuser.core.thaw_watch"],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("forget 0\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        deadline = time.monotonic() + 20  # until it has set its dispositions
        while not _ignores(proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
            time.sleep(0.02)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            proc.send_signal(sig)
        time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ignores(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return bool(mask & (1 << (sig - 1)))
