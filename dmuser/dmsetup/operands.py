"""How a dmsetup run names devices: operands, ``-u``/``-j``/``-m``, table text.

Shared by every command of :mod:`dmuser.dmsetup.verbs`; :class:`Failed` carries
dmsetup's error lines for a failed command.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TextIO

from dmuser.client import Client
from dmuser.dmsetup.options import Options
from dmuser.errors import DmuserError


class Failed(Exception):
    """The command failed; ``lines`` are its error lines (stderr)."""

    def __init__(self, *lines: str, command_failed: bool = True) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)
        #: dmsetup adds "Command failed." (not after an unknown -o field)
        self.command_failed = command_failed


def ioctl_error(ioctl: str, name: str, exc: DmuserError, code: int | None = None) -> list[str]:
    """dmuser's message, then libdevmapper's line for a failed ioctl."""
    return [f"dmuser: {exc}",
            f"device-mapper: {ioctl} ioctl on {name}  failed: {os.strerror(code or exc.errno)}"]


def atoi(text: str | None) -> str:
    """A numeric argument as dmsetup's atoi reads it (leading digits; none is 0)."""
    text = (text or "").strip()
    digits = text[:len(text) - len(text.lstrip("0123456789"))]
    return str(int(digits or "0"))


class Operands:
    """The state of one dmsetup run and how its operands name devices; the
    commands are :class:`dmuser.dmsetup.verbs.Runner`'s."""

    def __init__(self, client: Client, opts: Options, out: TextIO, stdin: TextIO) -> None:
        self.c, self.opts, self.out, self.stdin = client, opts, out, stdin
        self.errors: list[str] = []
        self._mountpoint: str | None = None

    def mountpoint(self) -> str:
        if self._mountpoint is None:
            self._mountpoint = self.c.ping().mountpoint
        return self._mountpoint

    def mapper_dir(self) -> str:
        return (os.environ.get("DM_DEV_DIR") or "/dev").rstrip("/") + "/mapper/"

    def device(self, arg: str) -> str:
        """A device argument as a name: ``$DM_DEV_DIR/mapper/NAME`` and the device's
        file on the mount name NAME, as in dmsetup."""
        if "/" not in arg:
            return arg
        if arg.startswith(self.mapper_dir()):
            return arg[len(self.mapper_dir()):]
        if os.path.dirname(os.path.abspath(arg)) == self.mountpoint():
            return os.path.basename(arg)
        return arg

    def devices(self, *, required: bool = True) -> list[str]:
        """The device operands, or ``-u UUID``'s or ``-j MAJ -m MIN``'s device; []
        means every device."""
        if self.opts.operands:
            return [self.device(a) for a in self.opts.operands]
        if self.opts.get("uuid") is not None or self.opts.get("major") is not None \
                or self.opts.get("minor") is not None:
            return [self.devices_by_uuid()]
        if required:
            raise Failed("No device specified.")
        return []

    def devices_by_uuid(self) -> str:
        """The device ``-u UUID`` (or ``-j MAJ -m MIN``: its block device) names."""
        uuid, major, minor = (self.opts.get(k) for k in ("uuid", "major", "minor"))
        if uuid is None and (major is None or minor is None):
            raise Failed("Please specify both major number and minor number.",
                         "Couldn't process command line.", command_failed=False)
        devno = f"{atoi(major)}:{atoi(minor)}"
        found = [i.name for i in self.c.info_all()
                 if (i.uuid == uuid if uuid is not None else i.block_devno == devno)]
        if not found:
            raise Failed("Device does not exist.")
        return found[0]

    def each(self, names: list[str], fn: Callable[[str], None]) -> None:
        """``fn`` on every name; failures are collected, the rest still run."""
        for name in names:
            try:
                fn(name)
            except Failed as exc:
                self.errors.extend(exc.lines)

    def table_text(self, text: str) -> str:
        """``/dev/mapper/NAME`` words naming dmuser devices become their files."""
        prefix = self.mapper_dir()
        if prefix not in text:
            return text
        files = self.c.ls()
        lines = []
        for line in text.splitlines():
            words = line.split()
            lines.append(" ".join(files.get(w[len(prefix):], w) if w.startswith(prefix) else w
                                  for w in words))
        return "".join(line + "\n" for line in lines)

    def read_table(self, file: str | None) -> str:
        table = self.opts.get("table")
        if table is not None:
            return self.table_text(table)
        if file is not None:
            try:
                with open(file) as f:
                    return self.table_text(f.read())
            except (OSError, UnicodeDecodeError):
                raise Failed(f"Couldn't open '{file}' for reading.") from None
        return self.table_text(self.stdin.read())

    def write(self, text: str) -> None:
        self.out.write(text)
