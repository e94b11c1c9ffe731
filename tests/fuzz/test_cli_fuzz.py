"""Random command lines against the CLI and a running daemon.

Each input is an argument vector built from the CLI's own verbs and options
and hostile words (random tables, names, sectors, messages, paths).  It runs
through ``dmuser.cli.main`` in this process, against a real daemon on its
FUSE mount, beside a canary device:

* the CLI returns 0, 1 or 2 (argparse's exits included), never raises, and
  what it prints on stderr is one line per failure, never a traceback;
* after every input the daemon still answers, its log has no traceback (the
  ``daemon`` fixture checks at teardown), and the canary file reads back what
  was written to it.

Verbs that stop or start daemons (serve, shutdown, demo) and ``--watch``
(which polls until interrupted) are left out; nothing ever names the canary.
"""

from __future__ import annotations

import contextlib
import io
import random
from pathlib import Path
from typing import Any
from unittest import mock

from support.fuzz import FuzzCounts, fuzz_rng, iterations

from dmuser import cli, client

S = 512
VERBS = ["create", "reload", "remove", "suspend", "resume", "clear", "ls", "table", "status",
         "info", "targets", "message", "cow", "frobnicate", "", "-h"]
OPTIONS = ["--table", "--notable", "--uuid", "--force", "--noflush", "--inactive", "--json",
           "--interval", "--until-complete", "--socket", "--list", "--help", "-x", "--"]
NAMES = ["t", "u", "t/x", ".", "..", "x" * 200, "\u00e9", "-t", ""]
TABLES = ["0 64 zero", "0 64 linear a.img 0", "0 64 error", "0 0 zero", "0 64 linear a.img x",
          "0 64 snapshot a.img cow.img P 8", "0 64 snapshot-origin a.img", "1 64 zero",
          "0 64 mirror core 2 16 nosync 2 a.img 0 b.img 0", "0 18014398509481984 zero",
          "garbage", "0 64 zero;64 64 error", "0 64 flakey a.img 0 1 1"]
WORDS = ["0", "1", "-1", "99999999999999999999", "read_balance", "on", "off", "inspect",
         "check", "a.img", "cow.img", "missing.img", "/dev/null", "@", "%n", ";", "0x0"]


def random_argv(rng: random.Random, sock: str) -> list[str]:
    argv = [rng.choice(VERBS)]
    if rng.random() < 0.7:
        argv.append(rng.choice(NAMES[:3]))
    for _ in range(rng.randrange(0, 4)):
        r = rng.random()
        if r < 0.25:
            argv.append(rng.choice(NAMES))
        elif r < 0.45:
            argv += ["--table", rng.choice(TABLES)]
        elif r < 0.65:
            argv.append(rng.choice(OPTIONS))
        else:
            argv.append(rng.choice(WORDS))
    if rng.random() < 0.9 and argv[0] != "cow":
        argv += ["--socket", sock]
    return argv


def run(argv: list[str], cwd: Path) -> tuple[int, str]:
    """``dmuser ARGV`` in process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), \
            contextlib.chdir(cwd), mock.patch("sys.stdin", io.StringIO("")):
        try:
            status = cli.main(argv)
        except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
            status = int(exc.code or 0) if not isinstance(exc.code, str) else 2
    return status, err.getvalue()


def cleanup(sock: str) -> None:
    """Resume and remove every device but the canary."""
    reply = client.request(sock, {"verb": "ls"})
    for dev in reply.get("data") or []:
        if dev["name"] != "canary":
            client.request(sock, {"verb": "resume", "name": dev["name"]})
            client.request(sock, {"verb": "remove", "name": dev["name"], "force": True})


def test_random_command_lines(daemon: Any, fuzz_counts: FuzzCounts) -> None:
    sock = str(daemon.sock)
    for name, sectors in (("a.img", 128), ("b.img", 128), ("cow.img", 256),
                          ("canary.img", 64)):
        (daemon.dir / name).write_bytes(bytes(sectors * S))
    status, err = run(["create", "canary", "--table", "0 64 linear canary.img 0",
                       "--socket", sock], daemon.dir)
    assert status == 0, err
    rng = fuzz_rng("cli")
    canary = rng.randbytes(64 * S)
    (daemon.mnt / "canary").write_bytes(canary)
    for i in range(iterations(300)):
        argv = random_argv(rng, sock)
        label = f"input {i} {argv!r}"
        status, err = run(argv, daemon.dir)
        assert status in (0, 1, 2), label
        assert "Traceback" not in err, f"{label}: {err}"
        if status == 1:
            lines = [line for line in err.splitlines() if line.startswith("dmuser")]
            assert lines and len(lines) == len(err.splitlines()), f"{label}: {err!r}"
        fuzz_counts.add("command line", {0: "succeeded", 1: "failed", 2: "usage error"}[status])
        assert client.ping(sock) is not None, f"{label}: the daemon stopped answering"
        cleanup(sock)
        assert (daemon.mnt / "canary").read_bytes() == canary, label
