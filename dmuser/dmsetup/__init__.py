"""``dmuser dmsetup ARGS...``: dmsetup's own command line and output formats.

Scripts written for dmsetup (fstests' ``common/dm*``, lvm2's test library)
run it unmodified: the same options anywhere on the line, the same output
formats byte for byte where scripts parse them (``report.py``), the same
error texts and exit status 1.  Everything goes through :class:`dmuser.Client`
(``$DMUSER_SOCKET`` or the default socket).  ``dmuser dmsetup --install-shim
DIR [--socket PATH]`` writes ``DIR/dmsetup``, a script that runs this, so that
suites calling ``dmsetup`` by name (``$DMSETUP_PROG``, ``$PATH``) use dmuser.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import TextIO

from dmuser.client import Client
from dmuser.dmsetup import options, report, verbs
from dmuser.dmsetup.operands import Failed
from dmuser.dmsetup.usage import USAGE
from dmuser.errors import DmuserError

__all__ = ["install_shim", "main"]


def install_shim(directory: str, socket: str | None = None) -> str:
    """Write the executable ``DIRECTORY/dmsetup`` running this Python's
    ``dmuser dmsetup "$@"``; return its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "dmsetup")
    env = ""
    if socket is not None:
        env = f'DMUSER_SOCKET="${{DMUSER_SOCKET:-{shlex.quote(os.path.abspath(socket))}}}" '
    text = ("#!/bin/sh\n"
            "# dmsetup -> dmuser dmsetup (written by 'dmuser dmsetup --install-shim')\n"
            f"{env}exec {shlex.quote(sys.executable)} -m dmuser dmsetup \"$@\"\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def _shim_main(argv: list[str], out: TextIO, err: TextIO) -> int:
    args = argv[1:]
    socket = None
    if len(args) == 3 and args[1] == "--socket":
        socket = args[2]
    elif len(args) != 1:
        err.write("usage: dmuser dmsetup --install-shim DIR [--socket PATH]\n")
        return 2
    try:
        out.write(install_shim(args[0], socket) + "\n")
    except OSError as exc:
        err.write(f"dmuser: dmsetup --install-shim: {exc}\n")
        return 1
    return 0


def main(argv: list[str], *, client: Client | None = None, out: TextIO | None = None,
         err: TextIO | None = None, stdin: TextIO | None = None) -> int:
    """Run dmsetup ``argv`` (without the program name); the exit status."""
    out, err = out or sys.stdout, err or sys.stderr
    if argv[:1] == ["--install-shim"]:
        return _shim_main(argv, out, err)
    try:
        opts = options.parse(argv)
    except options.UsageError as exc:
        err.write(f"{exc}\nCouldn't process command line.\n")
        return 1
    command = opts.command
    if opts.has("help") or command == "help":
        err.write(USAGE)
        if opts.has("columns"):
            err.write(report.field_help())
        return 0
    if opts.has("version"):
        command = "version"
    elif command is None:
        err.write(USAGE)
        return 1
    if command not in options.COMMANDS:
        err.write("Unknown command.\n" + USAGE)
        return 1
    low, high = options.COMMANDS[command]
    if len(opts.operands) < low or (high >= 0 and len(opts.operands) > high):
        err.write("Incorrect number of arguments.\n" + USAGE)
        return 1
    runner = verbs.Runner(client or Client(), opts, out, stdin or sys.stdin)
    try:
        runner.run(command)
    except Failed as exc:
        lines, trailer = exc.lines, exc.command_failed
    except DmuserError as exc:  # no daemon, a broken connection...
        lines, trailer = [f"dmuser: {exc}"], True
    else:
        return 0
    out.flush()
    err.write("".join(line + "\n" for line in lines) + ("Command failed.\n" if trailer else ""))
    return 1
