"""flakey: a linear mapping that misbehaves periodically (dm-spec §2.4, dm-flakey.c).

Table: ``<dev> <offset> <up_interval> <down_interval> [<#features> <feature words>...]``.

Guarantees:

* **Clock.**  The clock starts when the table is constructed (``trio.current_time()``
  at ``__init__``), not at resume.  ``elapsed`` is the whole number of seconds
  since then; the device is *down* while ``elapsed % (up + down) >= up``.
* **Up:** exactly linear (``offset + sector - ti.begin``).
* **Down**, decided per bio when it is mapped:

  - READ: EIO with ``error_reads``; otherwise read normally, and at completion
    (``end_io``, only if the read succeeded) corrupt it: first the fixed
    ``corrupt_bio_byte`` (direction ``r`` and ``(bi_opf & flags) == flags``),
    then ``random_read_corrupt``.
  - write direction (writes, empty flushes, discards): ``drop_writes`` completes
    without writing; else ``error_writes`` fails with EIO; else a data write
    may be corrupted (fixed ``w`` corruption, then random) in a *copy*: the
    caller's buffer is never modified.  A corrupted write is cut into pieces of
    at most UIO_MAXIOV pages (1024 pages), each decided and corrupted on its own,
    as the kernel's ``dm_accept_partial_bio`` makes the core resend the rest.
* With no features (or none that does anything) every I/O fails while down:
  ``error_reads`` and ``error_writes`` are implied.

Status: INFO is empty.  TABLE is formatted as the oracle kernel (6.1) prints it,
which the golden vectors record: ``<dev> <offset> <up> <down> <count> `` and then
each feature word group followed by a space (``0 8192 flakey 254:0 0 5 5 0 ``).
The implied ``error_reads error_writes`` of a table without features are *not*
listed (6.1 does not store them as flags; 6.17 prints them and drops the trailing
spaces).  The 6.x-only words (``error_reads``, ``random_*_corrupt``) are printed
in the 6.17 order when given.  The output always loads back to the same
behaviour.

Randomness comes from ``self.rng`` (a :class:`random.Random`); tests may replace it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import trio

from dmuser.core.args import U32_MAX, ArgReader, parse_sector
from dmuser.core.bio import Bio
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError, TargetArgError
from dmuser.core.target import DeviceRange, StatusType, Target, TargetContext
from dmuser.core.units import PAGE_SIZE, SECTOR_SHIFT

log = logging.getLogger(__name__)

#: Probability base of random_read_corrupt / random_write_corrupt.
PROBABILITY_BASE = 1_000_000_000
#: A corrupted write is processed in pieces of at most UIO_MAXIOV pages.
UIO_MAXIOV = 1024
MAX_CORRUPT_SECTORS = UIO_MAXIOV * PAGE_SIZE >> SECTOR_SHIFT

_WRITE_INCOMPATIBLE = ("is incompatible with random_write_corrupt or corrupt_bio_byte "
                       "with the WRITE flag set")
_READ_INCOMPATIBLE = ("is incompatible with random_read_corrupt or corrupt_bio_byte "
                      "with the READ flag set")


class FlakeyFeatures:
    """The parsed feature words; ``implied`` marks the error-all-I/O default."""

    def __init__(self) -> None:
        self.error_reads = False
        self.drop_writes = False
        self.error_writes = False
        self.implied = False
        self.corrupt_bio_byte = 0          # N (1-based); 0 = not set
        self.corrupt_bio_write = False     # direction: True for 'w'
        self.corrupt_bio_value = 0
        self.corrupt_bio_flags = 0
        self.random_read_corrupt = 0
        self.random_write_corrupt = 0

    @classmethod
    def parse(cls, args: ArgReader) -> FlakeyFeatures:
        """``parse_features`` of dm-flakey.c, with its error texts and order of checks."""
        f = cls()
        argc = 0
        if args.remaining:
            argc = args.read_group(0, 11, "Invalid number of feature args")
        while argc:
            name = args.shift("Insufficient feature arguments").lower()
            argc -= 1
            if name == "error_reads":
                if f.error_reads:
                    raise TargetArgError("Feature error_reads duplicated")
                f.error_reads = True
            elif name == "drop_writes":
                if f.drop_writes:
                    raise TargetArgError("Feature drop_writes duplicated")
                f.drop_writes = True
                if f.error_writes:
                    raise TargetArgError("Feature drop_writes conflicts with feature error_writes")
            elif name == "error_writes":
                if f.error_writes:
                    raise TargetArgError("Feature error_writes duplicated")
                f.error_writes = True
                if f.drop_writes:
                    raise TargetArgError("Feature error_writes conflicts with feature drop_writes")
            elif name == "corrupt_bio_byte":
                if f.corrupt_bio_byte:
                    raise TargetArgError("Feature corrupt_bio_byte duplicated")
                if argc < 4:
                    raise TargetArgError("Feature corrupt_bio_byte requires 4 parameters")
                f.corrupt_bio_byte = args.read_uint(1, U32_MAX, "Invalid corrupt bio byte")
                direction = args.shift("Invalid corrupt bio direction (r or w)").lower()
                if direction not in ("r", "w"):
                    raise TargetArgError("Invalid corrupt bio direction (r or w)")
                f.corrupt_bio_write = direction == "w"
                f.corrupt_bio_value = args.read_uint(
                    0, 255, "Invalid corrupt value to write into bio byte (0-255)")
                f.corrupt_bio_flags = args.read_uint(0, U32_MAX, "Invalid corrupt bio flags mask")
                argc -= 4
            elif name in ("random_read_corrupt", "random_write_corrupt"):
                if getattr(f, name):
                    raise TargetArgError(f"Feature {name} duplicated")
                if not argc:
                    raise TargetArgError(f"Feature {name} requires a parameter")
                setattr(f, name, args.read_uint(0, PROBABILITY_BASE,
                                                "Invalid random corrupt argument"))
                argc -= 1
            else:
                raise TargetArgError("Unrecognised flakey feature requested")
        f._cross_check()
        if not (f.corrupt_bio_byte or f.error_reads or f.drop_writes or f.error_writes
                or f.random_read_corrupt or f.random_write_corrupt):
            f.error_reads = f.error_writes = f.implied = True
        return f

    def _cross_check(self) -> None:
        corrupts_writes = (self.corrupt_bio_byte and self.corrupt_bio_write) \
            or self.random_write_corrupt
        corrupts_reads = (self.corrupt_bio_byte and not self.corrupt_bio_write) \
            or self.random_read_corrupt
        if self.drop_writes and corrupts_writes:
            raise TargetArgError(f"drop_writes {_WRITE_INCOMPATIBLE}")
        if self.error_writes and corrupts_writes:
            raise TargetArgError(f"error_writes {_WRITE_INCOMPATIBLE}")
        if self.error_reads and corrupts_reads:
            raise TargetArgError(f"error_reads {_READ_INCOMPATIBLE}")

    def words(self) -> list[str]:
        """The feature words as TABLE status lists them (see the module docstring)."""
        out: list[str] = []
        if self.implied:
            return out
        if self.error_reads:
            out.append("error_reads")
        if self.drop_writes:
            out.append("drop_writes")
        elif self.error_writes:
            out.append("error_writes")
        if self.corrupt_bio_byte:
            out += ["corrupt_bio_byte", str(self.corrupt_bio_byte),
                    "w" if self.corrupt_bio_write else "r",
                    str(self.corrupt_bio_value), str(self.corrupt_bio_flags)]
        if self.random_read_corrupt:
            out += ["random_read_corrupt", str(self.random_read_corrupt)]
        if self.random_write_corrupt:
            out += ["random_write_corrupt", str(self.random_write_corrupt)]
        return out


class FlakeyTarget(Target):
    name = "flakey"
    version = (1, 5, 0)
    num_flush_bios = 1
    num_discard_bios = 1

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        super().__init__(ti, args)
        if len(args) < 4:
            raise TargetArgError("Invalid argument count")
        self.start_time = trio.current_time()
        reader = ArgReader(args)
        dev_word = reader.shift()
        self.offset = parse_sector(reader.shift(), "Invalid device sector")
        self.up_interval = reader.read_uint(0, U32_MAX, "Invalid up interval")
        self.down_interval = reader.read_uint(0, U32_MAX, "Invalid down interval")
        total = (self.up_interval + self.down_interval) & U32_MAX
        if total == 0:
            raise TargetArgError("Total (up + down) interval is zero")
        if total < self.up_interval:
            raise TargetArgError("Interval overflow")
        self.feature_args = FlakeyFeatures.parse(reader)
        self.dev = ti.get_device(dev_word)
        self.rng = random.Random()

    # -- the clock ------------------------------------------------------------------------

    def is_down(self) -> bool:
        """True while the device is in its down interval (whole seconds since load)."""
        elapsed = int(trio.current_time() - self.start_time)
        return elapsed % (self.up_interval + self.down_interval) >= self.up_interval

    # -- I/O ------------------------------------------------------------------------------

    def _remap(self, bio: Bio) -> BlockDevice:
        if bio.nr_sectors:
            bio.sector = self.offset + bio.sector - self.ti.begin
        return self.dev

    async def map(self, bio: Bio) -> BlockDevice | None:
        bio.target_ctx = None
        if not self.is_down():
            return self._remap(bio)
        f = self.feature_args
        if bio.data is not None and bio.nr_sectors:
            bio.target_ctx = "may_corrupt"
        if not bio.is_write:
            if f.error_reads:
                raise DmIOError("flakey: down: read failed")
            return self._remap(bio)
        if f.drop_writes:
            return None
        if f.error_writes:
            raise DmIOError("flakey: down: write failed")
        if bio.target_ctx is None:
            return self._remap(bio)
        fixed = bool(f.corrupt_bio_byte and f.corrupt_bio_write and self._flags_match(bio))
        if not fixed and not f.random_write_corrupt:
            return self._remap(bio)
        await self._write_corrupted(bio, fixed)
        return None

    async def _write_corrupted(self, bio: Bio, fixed: bool) -> None:
        """Write ``bio`` in pieces of at most UIO_MAXIOV pages, each through a corrupted copy."""
        sector = bio.sector
        while sector < bio.end_sector:
            n = min(MAX_CORRUPT_SECTORS, bio.end_sector - sector)
            piece = bio.clone(sector, n)
            sector += n
            random_hit = self._random_hit(self.feature_args.random_write_corrupt)
            if not fixed and not random_hit:
                await self._remap(piece).submit(piece)
                continue
            assert piece.data is not None
            copy = bytearray(piece.data)
            if fixed:
                self._corrupt_fixed(copy)
            if random_hit:
                self._corrupt_random(copy)
            clone = Bio(piece.op, piece.sector, n, memoryview(copy), piece.flags)
            await self._remap(clone).submit(clone)

    async def end_io(self, bio: Bio, error: DmIOError | None) -> DmIOError | None:
        if error is not None or bio.target_ctx != "may_corrupt" or bio.is_write:
            return error
        assert bio.data is not None
        f = self.feature_args
        if f.corrupt_bio_byte and not f.corrupt_bio_write and self._flags_match(bio):
            self._corrupt_fixed(bio.data)
        if self._random_hit(f.random_read_corrupt):
            self._corrupt_random(bio.data)
        return None

    # -- corruption -----------------------------------------------------------------------

    def _flags_match(self, bio: Bio) -> bool:
        mask = self.feature_args.corrupt_bio_flags
        return bio.opf & mask == mask

    def _random_hit(self, probability: int) -> bool:
        return bool(probability) and self.rng.getrandbits(64) % PROBABILITY_BASE < probability

    def _corrupt_fixed(self, data: bytearray | memoryview) -> None:
        index = self.feature_args.corrupt_bio_byte - 1
        if index < len(data):
            data[index] = self.feature_args.corrupt_bio_value
            log.debug("flakey: corrupting byte %d with %d", index, data[index])

    def _corrupt_random(self, data: bytearray | memoryview) -> None:
        if len(data):
            data[self.rng.getrandbits(32) % len(data)] = self.rng.getrandbits(8)

    # -- reporting ------------------------------------------------------------------------

    def status(self, kind: StatusType) -> str:
        if kind is StatusType.INFO:
            return ""
        f = self.feature_args
        count = (f.error_reads + f.drop_writes + f.error_writes) * (not f.implied) \
            + 5 * bool(f.corrupt_bio_byte) + 2 * bool(f.random_read_corrupt) \
            + 2 * bool(f.random_write_corrupt)
        words = [self.dev.status_name, str(self.offset), str(self.up_interval),
                 str(self.down_interval), str(count), *f.words()]
        return "".join(w + " " for w in words)

    def iterate_devices(self) -> list[DeviceRange]:
        return [DeviceRange(self.dev, self.offset, self.ti.len)]
