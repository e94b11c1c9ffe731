"""dmsetup's output formats, as pure functions of what the daemon reports.

Checked byte for byte against dmsetup 1.02.185 on Debian 12's kernel
(``../shared/tools/kvm-dm``): ``info`` (long), ``info -c`` (libdm's report:
aligned columns, every field padded to its width, text left and numbers
right, headings left; ``--noheadings`` gives unaligned ``:``-separated
fields, ``--separator S`` unaligned fields with headings), ``ls``, ``deps``,
``table``/``status`` lines (``START LENGTH TYPE PARAMS``, a space after the
type even when PARAMS is empty) and ``targets``.

A device with a block device (``serve --block-devices``, on by default as
root) shows its loop device's major:minor wherever dmsetup prints the numbers
(``ls``, ``info``, ``deps`` of a device stacked on it) and ``loopN`` as
``blkdevname``.  A device without one (no live table yet, or a daemon without
block devices) shows its file on the mount instead (``ls``, ``blkdevname``)
or ``-`` (``major``, ``minor``, ``devno``), and ``info``'s long form leaves out
its ``Read Ahead`` and ``Major, minor`` lines.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dmuser.status import DeviceInfo

NO_DEVICES = "No devices found\n"
#: ``info``'s ``Read Ahead`` (sectors): the kernel's default for a dm device, 128 KiB
READ_AHEAD_SECTORS = 256
_MAJ_MIN = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class Row:
    """One device as ``info -c`` reports it: its info and its relations."""

    info: DeviceInfo
    used: tuple[str, ...] = ()  # mapped devices its tables use
    users: tuple[str, ...] = ()  # mapped devices whose tables use it
    deps: tuple[str, ...] = ()  # every device word of its live table


@dataclass(frozen=True)
class Field:
    id: str
    heading: str
    width: int
    numeric: bool
    value: Callable[[Row], str]
    help: str


def attr(i: DeviceInfo) -> str:
    """``Stat``: (L)ive, (I)nactive, (s)uspended, (r)ead-only or read-(w)rite."""
    return ("L" if i.live else "-") + ("I" if i.inactive else "-") \
        + ("s" if i.suspended else "-") + ("r" if i.read_only else "w")


def devno_part(i: DeviceInfo, k: int) -> str:
    """Major (0) or minor (1) of the block device, ``-`` without one."""
    return i.block_devno.split(":")[k] if i.block_devno else "-"


def blkdevname(i: DeviceInfo) -> str:
    """``loopN`` (the kernel's ``dm-N``), or the device's file without one."""
    return i.block_device.rsplit("/", 1)[-1] if i.block_device else i.path


def tables_loaded(i: DeviceInfo) -> str:
    if i.live:
        return "Both" if i.inactive else "Live"
    return "Inactive" if i.inactive else "None"


def _f(fid: str, heading: str, width: int, numeric: bool, value: Callable[[Row], object],
       text: str) -> Field:
    return Field(fid, heading, width, numeric, lambda r: str(value(r)), text)


NAME_FIELDS = [
    _f("name", "Name", 16, False, lambda r: r.info.name, "Name of mapped device."),
    _f("mangled_name", "MangledName", 16, False, lambda r: r.info.name,
       "Mangled name of mapped device."),
    _f("unmangled_name", "UnmangledName", 16, False, lambda r: r.info.name,
       "Unmangled name of mapped device."),
    _f("uuid", "UUID", 32, False, lambda r: r.info.uuid,
       "Unique (optional) identifier for mapped device."),
    _f("mangled_uuid", "MangledUUID", 32, False, lambda r: r.info.uuid,
       "Mangled unique (optional) identifier for mapped device."),
    _f("unmangled_uuid", "UnmangledUUID", 32, False, lambda r: r.info.uuid,
       "Unmangled unique (optional) identifier for mapped device."),
]
INFO_FIELDS = [
    _f("blkdevname", "BlkDevName", 16, False, lambda r: blkdevname(r.info),
       "Name of block device (dmuser: loopN, or the device's file without one)."),
    _f("attr", "Stat", 4, False, lambda r: attr(r.info),
       "(L)ive, (I)nactive, (s)uspended, (r)ead-only, read-(w)rite."),
    _f("tables_loaded", "Tables", 6, False, lambda r: tables_loaded(r.info),
       "Which of the live and inactive table slots are filled."),
    _f("suspended", "Suspended", 9, False,
       lambda r: "Suspended" if r.info.suspended else "Active",
       "Whether the device is suspended."),
    _f("readonly", "Read-only", 9, False,
       lambda r: "Read-only" if r.info.read_only else "Writeable",
       "Whether the device is read-only or writeable."),
    _f("devno", "DevNo", 5, False, lambda r: r.info.block_devno or "-",
       "Device major and minor numbers"),
    _f("major", "Maj", 3, True, lambda r: devno_part(r.info, 0), "Block device major number."),
    _f("minor", "Min", 3, True, lambda r: devno_part(r.info, 1), "Block device minor number."),
    _f("open", "Open", 4, True, lambda r: r.info.open_count,
       "Number of references to open device, if requested."),
    _f("segments", "Targ", 4, True, lambda r: r.info.nr_targets,
       "Number of segments in live table, if present."),
    _f("events", "Event", 6, True, lambda r: r.info.event_nr, "Number of most recent event."),
]
DEPS_FIELDS = [
    _f("device_count", "#Devs", 5, True, lambda r: len(r.deps),
       "Number of devices used by this one."),
    _f("devs_used", "DevNamesUsed", 16, False, lambda r: ",".join(r.used),
       "List of names of mapped devices used by this one."),
    _f("device_ref_count", "#Refs", 5, True, lambda r: len(r.users),
       "Number of mapped devices referencing this one."),
    _f("names_using_dev", "RefNames", 8, False, lambda r: ",".join(r.users),
       "List of names of mapped devices using this one."),
]
SECTIONS = [("Mapped Device Name Fields", "name_all", NAME_FIELDS),
            ("Mapped Device Information Fields", "info_all", INFO_FIELDS),
            ("Mapped Device Relationship Information Fields", "deps_all", DEPS_FIELDS)]
FIELDS = {f.id: f for _, _, fields in SECTIONS for f in fields}
DEFAULT_FIELDS = "name,major,minor,attr,open,segments,events,uuid"


class FieldError(ValueError):
    """An unknown ``-o`` field; ``str()`` is dmsetup's whole complaint (field list first)."""


def field_help() -> str:
    """The field list dmsetup prints before ``Unrecognised field``."""
    out = []
    for title, all_id, fields in SECTIONS:
        out += [title, "-" * len(title), f"  {all_id:<21} - All fields in this section."]
        out += [f"  {f.id:<21} - {f.help}" for f in fields]
        out.append(" ")
    return "".join(line + "\n" for line in out)


def pick_fields(spec: str | None) -> list[Field]:
    """The fields of ``-o SPEC`` (``+LIST`` adds to the default; ``*_all`` expand)."""
    if spec is None:
        spec = DEFAULT_FIELDS
    elif spec.startswith("+"):
        spec = DEFAULT_FIELDS + "," + spec[1:]
    picked: list[Field] = []
    for word in (w.strip() for w in spec.split(",")):
        if not word:
            continue
        group = next((fs for _, all_id, fs in SECTIONS if all_id == word), None)
        if group is not None:
            picked.extend(group)
        elif word in FIELDS:
            picked.append(FIELDS[word])
        else:
            raise FieldError(field_help() + f"Unrecognised field: {word}\n")
    return picked


def columns(rows: Sequence[Row], fields: Sequence[Field], *, headings: bool = True,
            separator: str | None = None) -> str:
    """``info -c``: libdm's report of ``rows`` (see the module docstring)."""
    aligned = separator is None and headings
    sep = ":" if separator is None and not headings else (separator or " ")
    table = [[f.value(r) for f in fields] for r in rows]
    lines = []
    if aligned:
        widths = [max([f.width, *(len(row[k]) for row in table)]) for k, f in enumerate(fields)]
        lines.append(sep.join(f"{f.heading:<{w}.{w}}" for f, w in zip(fields, widths,
                                                                       strict=True)))
        for row in table:
            lines.append(sep.join(f"{v:>{w}}" if f.numeric else f"{v:<{w}}"
                                  for v, f, w in zip(row, fields, widths, strict=True)))
    else:
        if headings:
            lines.append(sep.join(f.heading for f in fields))
        lines.extend(sep.join(row) for row in table)
    return "".join(line + "\n" for line in lines)


def info_long(i: DeviceInfo) -> str:
    """``dmsetup info NAME``: the block, then an empty line."""
    tables = " & ".join(t for t, on in (("LIVE", i.live), ("INACTIVE", i.inactive)) if on)
    state = ("SUSPENDED" if i.suspended else "ACTIVE") + (" (READ-ONLY)" if i.read_only else "") \
        + (" (DEFERRED REMOVE)" if i.deferred_remove else "")
    lines = [f"Name:              {i.name}",
             f"State:             {state}"]
    if i.block_devno:
        lines.append(f"Read Ahead:        {READ_AHEAD_SECTORS}")
    lines += [f"Tables present:    {tables or 'None'}",
              f"Open count:        {i.open_count}",
              f"Event number:      {i.event_nr}"]
    if i.block_devno:
        lines.append(f"Major, minor:      {devno_part(i, 0)}, {devno_part(i, 1)}")
    lines.append(f"Number of targets: {i.nr_targets}")
    if i.uuid:
        lines.append(f"UUID: {i.uuid}")
    return "".join(line + "\n" for line in lines) + "\n"


def ls_line(name: str, where: str) -> str:
    """``dmsetup ls``: ``NAME<TAB>(MAJ:MIN)``; ``where`` is the block device's
    ``MAJ:MIN``, or the device's file when it has none."""
    return f"{name}\t({where})\n"


def split_line(line: str) -> tuple[str, str, str, str]:
    """``START LENGTH TYPE PARAMS`` of a table or status line (PARAMS may be empty)."""
    words = line.strip().split(None, 3)
    if len(words) < 3:
        raise ValueError(f"not a table line: {line!r}")
    return words[0], words[1], words[2], words[3] if len(words) > 3 else ""


def dm_line(line: str) -> str:
    """A table/status line as dmsetup prints it: always a space after the type."""
    start, length, ttype, params = split_line(line)
    return f"{start} {length} {ttype} {params}"


def device_words(lines: Sequence[str]) -> list[str]:
    """The words of table lines that name devices (absolute paths and ``MAJ:MIN``), in
    the kernel's order: the last one first seen comes first, as ``dm_get_device``
    adds each new device at the head of the table's list (tests/vectors/dm-table-devno)."""
    found: list[str] = []
    for line in lines:
        for word in split_line(line)[3].split():
            if (word.startswith("/") or _MAJ_MIN.match(word)) and word not in found:
                found.append(word)
    return found[::-1]


def deps_line(words: Sequence[str], prefix: str = "") -> str:
    """``dmsetup deps``: ``N dependencies<TAB>:`` and `` (MAJ, MIN)`` or `` (PATH)`` each."""
    shown = []
    for word in words:
        m = _MAJ_MIN.match(word)
        shown.append(f" ({m.group(1)}, {m.group(2)})" if m else f" ({word})")
    return f"{prefix}{len(words)} dependencies\t:{''.join(shown)}\n"


def targets_text(types: dict[str, tuple[int, ...]]) -> str:
    return "".join(f"{name:<16} v{'.'.join(map(str, v))}\n" for name, v in types.items())
