"""dust: a linear mapping whose "bad blocks" fail reads (dm-dust.c, kernel 6.x).

Table: ``<dev> <offset> <blksz>``; ``blksz`` in bytes, a power of 2, at least
512 and at most the target length (and 1 GiB).  Bios never cross a multiple of
``blksz`` counted from the target's start (``max_io_len``).

Bad blocks are numbered in ``blksz`` units *of the underlying device*, offset
included, as the kernel does: a bio is looked up by the block of its first
remapped sector, ``(offset + sector - ti.begin) >> log2(blksz / 512)``.

Guarantees:

* Starts in *bypass*: the list is kept but nothing fails.  ``enable`` makes
  reads whose block is listed fail with EIO (nothing is read), and makes
  write-direction bios (writes, discards) to a listed block either fail with
  EIO while the block's write-fail count is above 0 (decrementing it) or
  succeed and remove the block from the list.  ``disable`` returns to bypass.
* Messages (``dmsetup message DEV 0 ...``, command names case-insensitive) and
  their replies, exactly ``dust_message``'s:

  - ``addbadblock N [wr_fail_cnt]``, ``removebadblock N``, ``enable``,
    ``disable``, ``quiet`` (toggles logging of adds/removes): no reply;
  - ``queryblock N``: ``dust_query_block: block N found in badblocklist`` (or
    ``not found``);
  - ``countbadblocks``: ``countbadblocks: N badblock(s) found``;
  - ``clearbadblocks``: ``dust_clear_badblocks: badblocks cleared`` or
    ``dust_clear_badblocks: no badblocks found``;
  - ``listbadblocks``: the blocks in ascending order, one a line, or ``No
    blocks in badblocklist``.

  Failures are EINVAL (:class:`TargetArgError`) with the kernel's DMERR text
  where it logs one: a missing block number, a block beyond the device's last
  block + 1 (the kernel's bound is inclusive), a write-fail count above 255, a
  duplicate add, removing an absent block, an unknown message, a wrong count.
  An unparsable number fails with "Invalid argument" (the kernel logs nothing).
* Status INFO: ``<dev> <fail_read_on_bad_block|bypass> <verbose|quiet>``;
  TABLE: ``<dev> <offset> <blksz>``.

Differs from the kernel: an empty flush is passed through untouched.  (The
kernel maps it from sector 0 and may clear, or fail on, the block that sector
lands on.)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dmuser.core.args import U32_MAX, parse_sector, parse_uint
from dmuser.core.bio import Bio
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmIOError, TargetArgError
from dmuser.core.target import DeviceRange, StatusType, Target, TargetContext
from dmuser.core.units import SECTOR_SHIFT

log = logging.getLogger(__name__)

#: the largest block size in sectors (1 GiB), DUST_MAX_BLKSZ_SECTORS
MAX_BLKSZ_SECTORS = 2097152
#: the largest write-fail count (an unsigned char)
MAX_WR_FAIL_CNT = 255


def _kstrtouint(word: str) -> int | None:
    """``kstrtouint(word, 10)``: decimal, an optional leading ``+``, a u32."""
    return parse_uint(word[1:] if word.startswith("+") else word, U32_MAX)


class DustTarget(Target):
    name = "dust"
    version = (1, 0, 0)
    num_flush_bios = 1
    num_discard_bios = 1

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        super().__init__(ti, args)
        if len(args) != 3:
            raise TargetArgError("Invalid argument count")
        blksz = _kstrtouint(args[2])
        if not blksz:
            raise TargetArgError("Invalid block size parameter")
        if blksz < 512:
            raise TargetArgError("Block size must be at least 512")
        if blksz & (blksz - 1):
            raise TargetArgError("Block size must be a power of 2")
        if blksz >> SECTOR_SHIFT > min(ti.len, MAX_BLKSZ_SECTORS):
            raise TargetArgError("Block size is too large")
        self.start = parse_sector(args[1], "Invalid device offset sector")
        self.dev = ti.get_device(args[0], "Device lookup failed")
        self.blksz = blksz
        self.sect_per_block = blksz >> SECTOR_SHIFT
        self.shift = self.sect_per_block.bit_length() - 1
        #: bad block -> remaining write-fail count
        self.badblocks: dict[int, int] = {}
        self.fail_read_on_bb = False
        self.quiet = False
        ti.max_io_len = self.sect_per_block

    # -- I/O ------------------------------------------------------------------------------

    async def map(self, bio: Bio) -> BlockDevice:
        if not bio.nr_sectors:
            return self.dev
        bio.sector = self.start + bio.sector - self.ti.begin
        if not self.fail_read_on_bb:
            return self.dev
        block = bio.sector >> self.shift
        if block not in self.badblocks:
            return self.dev
        if not bio.is_write:
            raise DmIOError(f"{self.ti.md_name}: dust: read of bad block {block}")
        if self.badblocks[block] > 0:
            self.badblocks[block] -= 1
            raise DmIOError(f"{self.ti.md_name}: dust: write to bad block {block} failed")
        del self.badblocks[block]
        if not self.quiet:
            # the kernel divides the block number by sect_per_block once more here
            log.info("%s: block %d removed from badblocklist by write",
                     self.ti.md_name, block // self.sect_per_block)
        return self.dev

    # -- messages -------------------------------------------------------------------------

    def _block_arg(self, word: str) -> int:
        """The block number of a 2- or 3-word message, range-checked as the kernel does."""
        block = parse_uint(word)
        if block is None:
            raise TargetArgError("Invalid argument")
        if block > self.dev.nr_sectors // self.sect_per_block:
            raise self._error("selected block value out of range")
        return block

    def _error(self, text: str) -> TargetArgError:
        log.error("%s: dust: %s", self.ti.md_name, text)
        return TargetArgError(text)

    async def message(self, args: Sequence[str]) -> str | None:
        words = list(args)
        cmd = words[0].lower()
        if len(words) == 1:
            return self._message1(cmd, words[0])
        if len(words) == 2:
            block = self._block_arg(words[1])
            if cmd == "addbadblock":
                self._add(block, 0)
                return None
            if cmd == "removebadblock":
                self._remove(block)
                return None
            if cmd == "queryblock":
                found = "found" if block in self.badblocks else "not found"
                return f"dust_query_block: block {block} {found} in badblocklist"
        elif len(words) == 3:
            count = parse_uint(words[2], U32_MAX)
            if parse_uint(words[1]) is None or count is None:
                raise TargetArgError("Invalid argument")
            if count > MAX_WR_FAIL_CNT:
                raise self._error("selected write fail count out of range")
            block = self._block_arg(words[1])
            if cmd == "addbadblock":
                self._add(block, count)
                return None
        else:
            raise self._error(f"invalid number of arguments '{len(words)}'")
        raise self._error(f"unrecognized message '{words[0]}' received")

    def _message1(self, cmd: str, word: str) -> str | None:
        if cmd in ("addbadblock", "removebadblock", "queryblock"):
            raise self._error(f"{word} requires an additional argument")
        if cmd in ("enable", "disable"):
            self.fail_read_on_bb = cmd == "enable"
            log.info("%s: %sabling read failures on bad sectors", self.ti.md_name, cmd[:-4])
            return None
        if cmd == "countbadblocks":
            return f"countbadblocks: {len(self.badblocks)} badblock(s) found"
        if cmd == "clearbadblocks":
            found, self.badblocks = bool(self.badblocks), {}
            return "dust_clear_badblocks: " + \
                ("badblocks cleared" if found else "no badblocks found")
        if cmd == "quiet":
            self.quiet = not self.quiet
            return None
        if cmd == "listbadblocks":
            if not self.badblocks:
                return "No blocks in badblocklist"
            # the kernel ends every line with "\n"; the control layer adds the last one
            return "\n".join(str(b) for b in sorted(self.badblocks))
        raise self._error(f"unrecognized message '{word}' received")

    def _add(self, block: int, wr_fail_cnt: int) -> None:
        if block in self.badblocks:
            if not self.quiet:
                log.error("%s: dust_add_block: block %d already in badblocklist",
                          self.ti.md_name, block)
            raise TargetArgError(f"dust_add_block: block {block} already in badblocklist")
        self.badblocks[block] = wr_fail_cnt
        if not self.quiet:
            log.info("%s: dust_add_block: badblock added at block %d with write fail count %d",
                     self.ti.md_name, block, wr_fail_cnt)

    def _remove(self, block: int) -> None:
        if block not in self.badblocks:
            if not self.quiet:
                log.error("%s: dust_remove_block: block %d not found in badblocklist",
                          self.ti.md_name, block)
            raise TargetArgError(f"dust_remove_block: block {block} not found in badblocklist")
        del self.badblocks[block]
        if not self.quiet:
            log.info("%s: dust_remove_block: badblock removed at block %d",
                     self.ti.md_name, block)

    # -- reporting ------------------------------------------------------------------------

    def status(self, kind: StatusType) -> str:
        if kind is StatusType.INFO:
            mode = "fail_read_on_bad_block" if self.fail_read_on_bb else "bypass"
            return f"{self.dev.status_name} {mode} {'quiet' if self.quiet else 'verbose'}"
        return f"{self.dev.status_name} {self.start} {self.blksz}"

    def iterate_devices(self) -> list[DeviceRange]:
        return [DeviceRange(self.dev, self.start, self.ti.len)]
