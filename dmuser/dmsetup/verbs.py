"""The dmsetup commands, run through :class:`dmuser.Client`.

One method per command on :class:`Runner`; each writes dmsetup's output to
``out`` and raises :class:`Failed` with dmsetup's error lines, after which
``Command failed.`` follows and the exit status is 1.  A command over several
devices goes on after a failing one, as dmsetup does, and fails at the end.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable

from dmuser import __version__
from dmuser.core import mapper_links
from dmuser.dmsetup import report
from dmuser.dmsetup.operands import Failed, Operands, atoi, ioctl_error
from dmuser.dmsetup.report import Row
from dmuser.errors import DeviceBusy, DeviceExists, DmuserError, NoSuchDevice
from dmuser.status import DeviceInfo

#: the device-mapper ioctl interface version whose behaviour dmuser follows
#: (Debian 12's kernel 6.1, which ``dmsetup version`` reports as 4.47.0)
DRIVER_VERSION = "4.47.0"
#: ``remove --retry``: attempts and the pause between them (dmsetup: 25 x 0.2 s)
RETRIES, RETRY_PAUSE = 25, 0.2
NOT_SUPPORTED = {"rename", "wipe_table", "measure", "stats", "mangle", "setgeometry",
                 "splitname", "udevcreatecookie", "udevreleasecookie", "udevflags"}
NO_OPS = {"udevcomplete", "udevcomplete_all", "udevcookies"}


class Runner(Operands):
    """One method per dmsetup command (``cmd_<verb>``)."""

    def run(self, command: str) -> None:
        if self.opts.has("concise"):
            raise Failed("dmuser: --concise is not supported")
        if command in NOT_SUPPORTED:
            raise Failed(f"dmuser: dmsetup {command} is not supported")
        if command in NO_OPS:  # no /dev nodes and no udev: nothing to do
            return
        getattr(self, "cmd_" + command.replace("-", "_"))()
        if self.errors:
            raise Failed(*self.errors)

    def cmd_create(self) -> None:
        args = self.opts.operands
        if not args:
            raise Failed("Please provide a name for the new device.")
        name = args[0]
        table = None if self.opts.has("notable") else self.read_table(
            args[1] if len(args) > 1 else None)
        try:
            self.c.create(name, table if table and table.strip() else None,
                          uuid=self.opts.get("uuid") or "", read_only=self.opts.has("readonly"))
        except DeviceExists as exc:
            raise Failed(*ioctl_error("create", name, exc, errno.EBUSY)) from None
        except DmuserError as exc:
            raise Failed(*ioctl_error("reload", name, exc)) from None

    def cmd_load(self) -> None:
        if self.opts.has("notable"):
            raise Failed("--notable only available when creating new device.")
        args = list(self.opts.operands)
        if self.opts.get("uuid") is not None:
            name = self.devices_by_uuid()
        elif args:
            name = self.device(args.pop(0))
        else:
            raise Failed("Please specify device.")
        file = args[0] if args else None
        try:
            self.c.reload(name, self.read_table(file), read_only=self.opts.has("readonly"))
        except DmuserError as exc:
            raise Failed(*ioctl_error("reload", name, exc)) from None

    cmd_reload = cmd_load

    def _simple(self, ioctl: str, fn: Callable[[str], None]) -> None:
        def one(name: str) -> None:
            try:
                fn(name)
            except DmuserError as exc:
                raise Failed(*ioctl_error(ioctl, name, exc)) from None
        self.each(self.devices(), one)

    def cmd_suspend(self) -> None:
        noflush, nolockfs = self.opts.has("noflush"), self.opts.has("nolockfs")
        self._simple("suspend", lambda n: self.c.suspend(n, noflush=noflush, nolockfs=nolockfs))

    def cmd_resume(self) -> None:
        nolockfs = self.opts.has("nolockfs")
        self._simple("resume", lambda n: self.c.resume(n, nolockfs=nolockfs))

    def cmd_clear(self) -> None:
        self._simple("clear", self.c.clear)

    def _error_device(self, name: str) -> None:
        """``--force``, as dmsetup does it: load an ``error`` table of the device's
        size and resume it, so that its I/O fails; the remove that follows still
        fails with EBUSY while the device is open."""
        size = self.c.info(name).nr_sectors
        if size:
            self.c.reload(name, f"0 {size} error\n")
            self.c.resume(name)

    def _remove(self, name: str) -> None:
        if self.opts.has("force"):
            self._error_device(name)
        deferred, tries = self.opts.has("deferred"), RETRIES if self.opts.has("retry") else 1
        for attempt in range(tries):
            try:
                self.c.remove(name, deferred=deferred)
                return
            except DeviceBusy:
                if attempt + 1 == tries:
                    raise
                time.sleep(RETRY_PAUSE)

    def cmd_remove(self) -> None:
        self._simple("remove", self._remove)

    def cmd_remove_all(self) -> None:
        """Every device that can go, users before the devices they use.  Open ones
        stay, and that is no failure (the kernel's remove_all); with ``--force``
        they get an ``error`` table, with ``--deferred`` a deferred remove."""
        busy: set[str] = set()
        while names := sorted(set(self.c.ls()) - set(busy)):
            removed = 0
            for name in names:
                try:
                    self.c.remove(name)
                    removed += 1
                except NoSuchDevice:
                    removed += 1
                except DeviceBusy:
                    busy.add(name)
            if removed:
                busy.clear()  # a device held by one just removed may go now
            else:
                break
        for name in sorted(busy):
            with contextlib.suppress(NoSuchDevice, DeviceBusy):
                if self.opts.has("force"):
                    self._error_device(name)
                if self.opts.has("deferred"):
                    self.c.remove(name, deferred=True)

    def cmd_message(self) -> None:
        name, sector, *words = self.opts.operands
        name = self.device(name)
        if not words:
            raise Failed("Please specify message.")
        try:
            answer = self.c.message(name, sector, words)
        except DmuserError as exc:
            raise Failed(*ioctl_error("message", name, exc)) from None
        if answer:
            self.write(answer + "\n")

    def cmd_wait(self) -> None:
        name = self.devices()[0]
        nr = self.opts.operands[1] if len(self.opts.operands) > 1 else "0"
        try:
            self.c.wait(name, int(atoi(nr)))
        except DmuserError as exc:
            raise Failed(*ioctl_error("waitevent", name, exc)) from None

    def _lines(self, verb: str, names: list[str]) -> dict[str, list[str]]:
        """``table``/``status`` lines of ``names`` (every device if empty), by name."""
        inactive = self.opts.has("inactive")
        if not names:
            data = self.c.call(verb, inactive=inactive).data or {}
            return {str(k): [str(x) for x in v] for k, v in sorted(data.items())}
        found: dict[str, list[str]] = {}

        def one(name: str) -> None:
            try:
                found[name] = [str(x) for x in
                               self.c.call(verb, name=name, inactive=inactive).data[name]]
            except NoSuchDevice as exc:
                if verb == "table":
                    raise Failed(*ioctl_error("table", name, exc)) from None
                raise Failed("Device does not exist.") from None
        self.each(names, one)
        return found

    def _table_like(self, verb: str) -> None:
        names = self.devices(required=False)
        by_name = self._lines(verb, names)
        if not by_name and not names:
            self.write(report.NO_DEVICES)
            return
        target = self.opts.get("target")
        prefix = len(by_name) > 1 or not names
        for name, lines in by_name.items():
            shown = [report.dm_line(x) for x in lines
                     if target is None or report.split_line(x)[2] == target]
            if not lines and target is None and prefix:
                self.write(f"{name}: \n")
            for line in shown:
                self.write(f"{name}: {line}\n" if prefix else line + "\n")

    def cmd_table(self) -> None:
        self._table_like("table")

    def cmd_status(self) -> None:
        self._table_like("status")

    def _infos(self, names: list[str]) -> list[DeviceInfo]:
        if not names:
            return self.c.info_all()
        infos: list[DeviceInfo] = []

        def one(name: str) -> None:
            try:
                infos.append(self.c.info(name))
            except NoSuchDevice:
                raise Failed("Device does not exist.") from None
        self.each(names, one)
        return infos

    def _rows(self, infos: list[DeviceInfo], relations: bool) -> list[Row]:
        if not relations:
            return [Row(i) for i in infos]
        tables = self._lines("table", [])
        mnt = self.mountpoint().rstrip("/") + "/"
        # a mapped device is named by its file, or by its block device's MAJ:MIN
        names = {i.block_devno: i.name for i in self.c.info_all() if i.block_devno}
        names |= {mnt + n: n for n in tables}
        used = {n: [names[w] for w in report.device_words(lines) if w in names]
                for n, lines in tables.items()}
        return [Row(i, tuple(used.get(i.name, [])),
                    tuple(n for n, u in used.items() if i.name in u),
                    tuple(report.device_words(tables.get(i.name, []))))
                for i in infos]

    def cmd_info(self) -> None:
        names = self.devices(required=False)
        if self.opts.has("columns"):
            try:
                fields = report.pick_fields(self.opts.get("options"))
            except report.FieldError as exc:
                raise Failed(*str(exc).splitlines(), command_failed=False) from None
        infos = self._infos(names)
        if not infos and not names:
            self.write(report.NO_DEVICES)
            return
        if not self.opts.has("columns"):
            self.write("".join(report.info_long(i) for i in infos))
            return
        rows = self._rows(infos, any(f in report.DEPS_FIELDS for f in fields))
        if rows:
            self.write(report.columns(rows, fields, headings=not self.opts.has("noheadings"),
                                      separator=self.opts.get("separator")))

    def cmd_ls(self) -> None:
        if self.opts.has("tree") or self.opts.has("exec"):
            raise Failed("dmuser: ls --tree and --exec are not supported")
        where = {i.name: i.block_devno or i.path for i in self.c.info_all()}
        target = self.opts.get("target")
        if not where:
            self.write(report.NO_DEVICES)
            return
        if target is not None:
            tables = self._lines("table", [])
            where = {n: p for n, p in where.items()
                     if any(report.split_line(x)[2] == target for x in tables.get(n, []))}
        self.write("".join(report.ls_line(n, p) for n, p in sorted(where.items())))

    def cmd_deps(self) -> None:
        names = self.devices(required=False)
        tables = self._lines("table", names)
        if not tables and not names:
            self.write(report.NO_DEVICES)
            return
        prefix = len(tables) > 1 or not names
        for name, lines in tables.items():  # a stacked device's table names its MAJ:MIN
            self.write(report.deps_line(report.device_words(lines),
                                        f"{name}: " if prefix else ""))

    def cmd_mknodes(self) -> None:
        """Make the /dev/mapper links of the named (else every) device right, as dmsetup
        its nodes; nothing without root, where no device has a block device."""
        if os.geteuid() == 0:
            live = {i.name: i.block_device for i in self.c.info_all() if i.block_device}
            try:
                mapper_links.mknodes(self.mountpoint(), live, self.opts.operands or None)
            except OSError as exc:
                raise Failed(f"{exc.filename}: {exc.strerror}") from None

    def cmd_targets(self) -> None:
        self.write(report.targets_text(self.c.targets()))

    def cmd_target_version(self) -> None:
        types = self.c.targets()
        for name in self.opts.operands:
            if name not in types:
                raise Failed(f"dmuser: target type {name} is not known")
            self.write(report.targets_text({name: types[name]}))

    def cmd_version(self) -> None:
        self.write(f"Library version:   {__version__} (dmuser)\n")
        self.c.ping()
        self.write(f"Driver version:    {DRIVER_VERSION}\n")
