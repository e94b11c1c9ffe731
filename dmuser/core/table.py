"""Mapping tables: parsing, validation, lookup and splitting.

A table is a sorted list of targets covering sectors ``0 .. nr_sectors``
without gaps.  ``parse_table`` turns dmsetup text into :class:`TargetSpec`
records; ``Table.build`` runs the kernel's ``dm_table_add_target`` checks
(zero length, unknown type, gaps, singletons), each constructor, each
``open()``, and the device-size check, and undoes everything if any step
fails.  ``Table.submit`` splits a bio at target boundaries and at each target's
``max_io_len`` (counted from the target's start, dm-spec §1.3) and runs the
pieces concurrently; a bio fails if any piece fails.

Error texts follow the kernel's log lines:
``<device>: <target type>: <ti->error>``.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from dmuser.core.args import parse_uint
from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.blockdev import BlockDevice, FileDevice
from dmuser.core.config import Config
from dmuser.core.errors import DmError, DmIOError, NotSupportedError, TableError
from dmuser.core.target import Feature, StatusType, Target, TargetContext, TargetRegistry

U32_MAX = (1 << 32) - 1


@dataclass(frozen=True)
class TargetSpec:
    """One parsed table line."""

    start: int
    length: int
    type_name: str
    args: tuple[str, ...]
    line_no: int = 0

    def __str__(self) -> str:
        return " ".join([str(self.start), str(self.length), self.type_name, *self.args])


def parse_table(text: str) -> list[TargetSpec]:
    """Parse dmsetup table text: one ``START LENGTH TYPE [ARGS...]`` per line.

    Blank lines and lines starting with ``#`` are skipped.  Raises TableError
    naming the line for malformed input; target arguments are checked later,
    by the constructors.
    """
    specs: list[TargetSpec] = []
    for line_no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if len(words) < 3:
            raise TableError(f"line {line_no}: invalid format, expected "
                             f"'START LENGTH TARGET [ARGS...]': {line!r}")
        start, length = parse_uint(words[0]), parse_uint(words[1])
        if start is None:
            raise TableError(f"line {line_no}: invalid start sector {words[0]!r}")
        if length is None:
            raise TableError(f"line {line_no}: invalid length {words[1]!r}")
        specs.append(TargetSpec(start, length, words[2], tuple(words[3:]), line_no))
    if not specs:
        raise TableError("empty table: no target lines")
    return specs


@dataclass(frozen=True)
class TargetServices:
    """What the owner of a table offers its targets (see :class:`TargetContext`)."""

    nursery: trio.Nursery | None = None
    table_event: Callable[[], None] | None = None
    noflush_suspending: Callable[[], bool] | None = None
    config: Config = field(default_factory=Config)
    shared: dict[str, Any] = field(default_factory=dict)


class Table:
    """A built, validated table.  Immutable once built; closed with ``close()``."""

    def __init__(self, md_name: str, types: TargetRegistry,
                 release_fn: Callable[[BlockDevice], None],
                 services: TargetServices | None = None) -> None:
        self.md_name = md_name
        self._types = types
        self._services = services or TargetServices()
        self.targets: list[Target] = []
        self._ends: list[int] = []
        self._release_fn = release_fn
        self._flush_targets: list[Target] = []
        #: the only target, when one target without max_io_len spans the table:
        #: data bios go to it whole, without split()
        self._single: Target | None = None
        #: the only target, when it may remap plain reads and writes straight
        #: onto a backing file without map() (``Target.direct_remap``)
        self.direct: Target | None = None

    @property
    def nr_sectors(self) -> int:
        return self._ends[-1] if self._ends else 0

    @classmethod
    async def build(
        cls,
        md_name: str,
        specs: Sequence[TargetSpec],
        get_device: Callable[[str], BlockDevice],
        release_device: Callable[[BlockDevice], None],
        services: TargetServices | None = None,
        *,
        types: TargetRegistry,
    ) -> Table:
        """Construct every target (its type looked up in ``types``); on any
        failure, destroy what was built and raise."""
        table = cls(md_name, types, release_device, services)
        try:
            for spec in specs:
                table._add_target(spec, get_device)
            for target in table.targets:
                await target.open()
            table._check_devices()
        except BaseException:
            await table.close()
            raise
        table._flush_targets = [t for t in table.targets if t.num_flush_bios]
        if len(table.targets) == 1 and not table.targets[0].ti.max_io_len:
            table._single = table.targets[0]
            probe = table._single.direct_remap(False, 0, 0)  # reads: which device?
            if probe is not None and isinstance(probe[0], FileDevice):
                table.direct = table._single
        return table

    def _add_target(self, spec: TargetSpec, get_device: Callable[[str], BlockDevice]) -> None:
        where = f"{self.md_name}: {spec.type_name}"
        if spec.length == 0:
            raise TableError(f"{self.md_name}: zero-length target")
        cls = self._types.get(spec.type_name)
        if cls is None:
            raise TableError(f"{self.md_name}: {spec.type_name}: unknown target type")
        if spec.start != self.nr_sectors:
            raise TableError(f"{self.md_name}: Gap in table (target at sector {spec.start}, "
                             f"previous target ends at {self.nr_sectors})")
        if self.targets and Feature.SINGLETON & (cls.features | self.targets[0].features):
            alone = cls.name if cls.features & Feature.SINGLETON else self.targets[0].name
            raise TableError(f"{self.md_name}: target type {alone} must appear alone in table")
        ti = TargetContext(spec.start, spec.length, self.md_name, get_device,
                           nursery=self._services.nursery,
                           table_event=self._services.table_event,
                           noflush_suspending=self._services.noflush_suspending,
                           config=self._services.config, shared=self._services.shared)
        try:
            target = cls(ti, spec.args)
        except DmError as exc:
            for dev in ti.devices:
                self._release_fn(dev)
            raise TableError(f"{where}: {exc.message}", exc.errno) from None
        except BaseException:
            for dev in ti.devices:
                self._release_fn(dev)
            raise
        self.targets.append(target)  # from here on, close() destroys it and releases its devices
        self._ends.append(spec.start + spec.length)
        if ti.max_io_len > U32_MAX:
            raise TableError(f"{where}: Maximum size of target IO is too large")

    def _check_devices(self) -> None:
        for target in self.targets:
            for dev, start, nr in target.iterate_devices():
                size = dev.nr_sectors
                if start >= size or start + nr > size:
                    raise TableError(
                        f"{self.md_name}: {dev.status_name} too small for target: "
                        f"start={start}, len={nr}, dev_size={size}")

    async def close(self) -> None:
        """Destroy every target and release its devices.  Idempotent.

        Every target is closed and every device released even if a destructor
        fails; the first failure is raised afterwards.
        """
        targets, self.targets, self._ends = self.targets, [], []
        first_error: BaseException | None = None
        for target in reversed(targets):
            try:
                await target.close()
            except Exception as exc:
                first_error = first_error or exc
            finally:
                for dev in target.ti.devices:
                    self._release_fn(dev)
        if first_error is not None:
            raise first_error

    def devices(self) -> list[BlockDevice]:
        return [dev for t in self.targets for dev in t.ti.devices]

    def lines(self, kind: StatusType) -> list[str]:
        """``dmsetup table`` / ``dmsetup status`` lines."""
        return [f"{t.ti.begin} {t.ti.len} {t.name} {t.status(kind)}" for t in self.targets]

    def target_at(self, sector: int) -> Target:
        i = bisect.bisect_right(self._ends, sector)
        if i >= len(self.targets):
            raise DmIOError(f"{self.md_name}: sector {sector} beyond end of device")
        return self.targets[i]

    # -- I/O --------------------------------------------------------------------------

    def split(self, bio: Bio) -> Iterator[tuple[Target, Bio]]:
        """Cut ``bio`` into per-target pieces honouring each ``max_io_len``."""
        sector, end = bio.sector, bio.end_sector
        i = bisect.bisect_right(self._ends, sector)
        while sector < end:
            target = self.targets[i]
            ti = target.ti
            piece_end = min(end, self._ends[i])
            if ti.max_io_len:
                rel = sector - ti.begin
                piece_end = min(piece_end, ti.begin + (rel // ti.max_io_len + 1) * ti.max_io_len)
            yield target, bio.clone(sector, piece_end - sector)
            sector = piece_end
            if piece_end == self._ends[i]:
                i += 1

    async def submit(self, bio: Bio) -> None:
        """Run one bio through the table; returns when complete, raises on failure.

        The bio itself is never changed: targets get clones (which share its
        data buffer), as the kernel's dm core clones every bio it maps.
        """
        flags = bio.flags
        if flags and flags & ReqFlag.PREFLUSH:  # IntFlag '&' costs ~1 us: test truth first
            await self._flush()
            if bio.nr_sectors == 0:
                return
            flags &= ~ReqFlag.PREFLUSH
        op, sector, nr_sectors = bio.op, bio.sector, bio.nr_sectors
        if sector + nr_sectors > self._ends[-1]:
            raise DmIOError(f"{self.md_name}: access beyond end of device "
                            f"({sector}+{nr_sectors} > {self.nr_sectors})")
        if op is Op.FLUSH:
            await self._flush()
            return
        single = self._single
        if single is not None and (op is Op.READ or op is Op.WRITE):
            # The common one-target table: what split() would give, in fewer steps.
            await _run_piece(single, Bio(op, sector, nr_sectors, bio.data, flags))
            return
        if flags is not bio.flags:
            bio = Bio(op, sector, nr_sectors, bio.data, flags)
        pieces = list(self.split(bio))
        if bio.op in (Op.DISCARD, Op.WRITE_ZEROES, Op.SECURE_ERASE):
            attr = "num_discard_bios" if bio.op is Op.DISCARD else "num_write_zeroes_bios"
            for target, _ in pieces:
                if not getattr(target, attr):
                    raise NotSupportedError(f"{self.md_name}: {target.name} does not support "
                                            f"{bio.op.name}")
        if len(pieces) == 1:
            await _run_piece(*pieces[0])
        else:
            await _run_all(pieces)

    async def _flush(self) -> None:
        """An empty flush to every target, ``num_flush_bios`` copies each."""
        pieces = []
        for target in self._flush_targets:
            for index in range(target.num_flush_bios):
                piece = Bio.flush()
                piece.target_ctx = index
                pieces.append((target, piece))
        if len(pieces) == 1:
            await _run_piece(*pieces[0])
        elif pieces:
            await _run_all(pieces)


async def _run_piece(target: Target, bio: Bio) -> None:
    error: DmIOError | None = None
    try:
        dev = await target.map(bio)
        if dev is not None:
            await dev.submit(bio)
    except DmIOError as exc:
        error = exc
    if target.has_end_io:
        error = await target.end_io(bio, error)
    if error is not None:
        raise error


async def _run_all(pieces: Sequence[tuple[Target, Bio]]) -> None:
    """Run pieces concurrently; wait for all, then raise the first failure."""
    errors: list[DmIOError] = []

    async def one(target: Target, bio: Bio) -> None:
        try:
            await _run_piece(target, bio)
        except DmIOError as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        for target, bio in pieces:
            nursery.start_soon(one, target, bio)
    if errors:
        raise errors[0]
