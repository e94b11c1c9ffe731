"""Mirror legs: health, the default leg, and leg failure (dm-spec §5.8, §5.11).

Guarantees:

* Each leg counts its errors and remembers their kinds; its status character
  is, highest priority first, ``A`` (no errors), ``F`` flush, ``D`` write,
  ``S`` sync (resync read/write), ``R`` read, ``U`` unknown.
* :meth:`LegSet.choose` never returns a leg with errors: the default leg if
  healthy, else the previous legs in index order, wrapping (no read balancing).
* :meth:`LegSet.choose_read` is what reads of an in-sync region use: the same
  as :meth:`choose` unless :attr:`LegSet.read_balance` is on (a dmuser
  extension, off by default), then round-robin over the legs without errors.
  Callers use it only for regions in sync; reads of other regions keep using
  the default leg.
* :meth:`LegSet.fail` with ``handle_errors`` moves the default to the lowest
  healthy leg (unless the set is out of sync and ``keep_log`` is off: then a
  resync source would be lost, and the default stays) and raises a table
  event; without ``handle_errors`` it only counts.
* :meth:`LegSet.reset_flags` (when the set reaches in-sync) forgets every error.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from dmuser.core.bio import Bio, Op, ReqFlag
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError
from dmuser.services.dm_io import DmIoClient, IoRequest, Region, dm_io

log = logging.getLogger(__name__)


class ErrorType(enum.IntFlag):
    WRITE = 1
    FLUSH = 2
    SYNC = 4
    READ = 8


@dataclass(eq=False)
class Leg:
    """One mirror leg (``struct mirror``)."""

    index: int
    dev: BlockDevice
    offset: int
    error_count: int = 0
    error_type: ErrorType = ErrorType(0)

    def status_char(self) -> str:
        if not self.error_count:
            return "A"
        for flag, char in ((ErrorType.FLUSH, "F"), (ErrorType.WRITE, "D"),
                           (ErrorType.SYNC, "S"), (ErrorType.READ, "R")):
            if self.error_type & flag:
                return char
        return "U"


class LegSet:
    """The legs of one mirror set, with the set-wide flags leg failure depends on.

    Attributes:
        default: the default ("primary") leg: reads and resync copies come from it.
        in_sync: every region is in sync (set by resync, cleared by a failed write).
        leg_failure: some leg failed since the set was last in sync.
    """

    def __init__(self, legs: Sequence[Leg], target_begin: int, handle_errors: bool,
                 keep_log: bool, table_event: Callable[[], None]) -> None:
        self.legs = list(legs)
        self.target_begin = target_begin
        self.handle_errors = handle_errors
        self.keep_log = keep_log
        self.default = self.legs[0]
        self.in_sync = False
        self.leg_failure = False
        self.read_balance = False  # dmuser extension: ``message 0 read_balance on``
        self._next_read = 0
        self._table_event = table_event
        self._io = DmIoClient()

    def __iter__(self) -> Iterator[Leg]:
        return iter(self.legs)

    def __len__(self) -> int:
        return len(self.legs)

    def sector(self, leg: Leg, bio: Bio) -> int:
        """Where ``bio`` lands on ``leg`` (0 for an empty bio, as map_sector)."""
        return leg.offset + bio.sector - self.target_begin if bio.nr_sectors else 0

    def choose(self) -> Leg | None:
        """``choose_mirror``: the default leg if healthy, else the previous ones, wrapping."""
        start = self.default.index
        for step in range(len(self.legs)):
            leg = self.legs[(start - step) % len(self.legs)]
            if not leg.error_count:
                return leg
        return None

    def choose_read(self) -> Leg | None:
        """The leg a read of an *in-sync* region goes to.

        Without read balancing, :meth:`choose` (the kernel's behaviour).  With
        it, the legs without errors take turns (round-robin by bio); a leg with
        errors is never chosen, so a leg that failed a write (and whose region
        is about to be marked out of sync) is not read.
        """
        if not self.read_balance:
            return self.choose()
        n = len(self.legs)
        for step in range(n):
            leg = self.legs[(self._next_read + step) % n]
            if not leg.error_count:
                self._next_read = (leg.index + 1) % n
                return leg
        return None

    def valid(self) -> Leg | None:
        """``get_valid_mirror``: the lowest-indexed healthy leg."""
        return next((leg for leg in self.legs if not leg.error_count), None)

    def fail(self, leg: Leg, error_type: ErrorType) -> None:
        """``fail_mirror``: count the error; with handle_errors move the default, raise an event."""
        self.leg_failure = True
        leg.error_count += 1
        if leg.error_type & error_type:
            return
        leg.error_type |= error_type
        if not self.handle_errors:
            return
        if leg is self.default:
            if not self.in_sync and not self.keep_log:
                log.error("Primary mirror (%s) failed while out-of-sync: Reads may fail.",
                          leg.dev.status_name)
            else:
                new = self.valid()
                if new is not None:
                    self.default = new
                else:
                    log.warning("All sides of mirror have failed.")
        self._table_event()

    def reset_flags(self) -> None:
        self.leg_failure = False
        for leg in self.legs:
            leg.error_count = 0
            leg.error_type = ErrorType(0)

    async def flush_all(self) -> None:
        """The dirty log's flush callback: an empty PREFLUSH to every leg.

        Raises DmIOError if any leg failed; each failed leg gets a FLUSH error.
        """
        req = IoRequest(Op.WRITE, ReqFlag.PREFLUSH | ReqFlag.SYNC, None)
        bits = await dm_io(self._io, req, [Region(leg.dev, 0, 0) for leg in self.legs])
        if bits:
            for leg in self.legs:
                if bits >> leg.index & 1:
                    self.fail(leg, ErrorType.FLUSH)
            raise DmIOError(f"mirror: leg flush failed ({bits:#x})")

    def status_chars(self) -> str:
        return "".join(leg.status_char() for leg in self.legs)
