"""delay: a linear mapping that holds bios for a while (dm-delay.c, kernel 6.x).

Table: ``<dev> <offset> <delay>`` (3 words), ``... <write_dev> <write_offset>
<write_delay>`` (6) or ``... <flush_dev> <flush_offset> <flush_delay>`` (9).
Delays are in milliseconds.  Three *classes* -- read, write, flush -- each have
a device, an offset and a delay; with 3 words all three use the same ones, with
6 the flush class uses the write words.

Which class a bio belongs to is decided as ``delay_map`` does: a bio in the
write direction (odd op: writes, discards) with PREFLUSH is a *flush* (the core
sends PREFLUSH as a separate empty flush, so in practice: the empty flushes of
fsync), any other write-direction bio is a *write* (discards included), and
everything else a *read*.  The bio is remapped to the class's device at
``offset + (sector - ti.begin)`` (an empty flush keeps its sector).

Guarantees:

* **Delay.**  A bio of a class with delay 0 is remapped at once and never
  counted.  Otherwise it is held until ``trio.current_time()`` has reached its
  mapping time + delay (trio time: tests may use ``autojump_clock``).
* **Order.**  Held bios are kept in one list in arrival order (whatever their
  class, as the kernel's ``delayed_bios``); whenever the list is scanned, the
  expired ones are released *in that order*, and released bios are handed to
  their device in release order: the next one starts only once the one before
  it has been passed to ``BlockDevice.submit`` (``_Turnstile``).  Completion
  order is the devices' business, as in the kernel.
* **Suspend.**  ``presuspend`` stops delaying (bios mapped from then on go
  straight through, the kernel's ``may_delay = false``) and releases every held
  bio at once, so a suspend -- with or without ``--noflush`` -- never waits for
  a delay to run out.  ``resume`` turns delaying back on.
* **Status.**  INFO: ``<read_held> <write_held> <flush_held>``, the number of
  bios currently held per class.  TABLE: ``<dev> <offset> <delay>`` of the
  read class, then the write class if 6 or more words were given, then the
  flush class if 9 were; devices printed as every target prints them
  (``MAJ:MIN`` for a block device).
* **Errors.**  Constructor texts and order of checks are ``delay_ctr`` /
  ``delay_class_ctr``: argument count, then per class offset ("Invalid device
  sector"), delay ("Invalid delay"; a larger number keeps its low 32 bits, as
  the kernel's ``sscanf("%u")`` does: ``4294967296`` loads as 0) and device
  ("Device lookup failed").

Supports discards (1 discard bio, as the kernel); write-zeroes are not
supported (the kernel sets no ``num_write_zeroes_bios``).  No messages.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from dmuser.core.args import U32_MAX, parse_sector, parse_uint
from dmuser.core.bio import Bio, ReqFlag
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import TargetArgError
from dmuser.core.target import DeviceRange, StatusType, Target, TargetContext

log = logging.getLogger(__name__)


@dataclass
class DelayClass:
    """One of read / write / flush: where its bios go and how long they wait."""

    dev: BlockDevice
    start: int
    delay_ms: int
    #: bios of this class held right now (the kernel's ``ops``)
    ops: int = 0

    def table(self) -> str:
        return f"{self.dev.status_name} {self.start} {self.delay_ms}"


def _class_ctr(ti: TargetContext, words: Sequence[str]) -> DelayClass:
    """``delay_class_ctr``: offset, then delay, then the device (the kernel's order)."""
    start = parse_sector(words[1], "Invalid device sector")
    # the kernel's sscanf("%u") keeps the low 32 bits of a larger number: 4294967296 is 0
    delay = parse_uint(words[2], 1 << 64)
    if delay is None:
        raise TargetArgError("Invalid delay")
    delay &= U32_MAX
    dev = ti.get_device(words[0], "Device lookup failed")
    return DelayClass(dev, start, delay)


@dataclass(eq=False)
class _Held:
    """A bio waiting in the delayed list."""

    cls: DelayClass
    expires: float
    turn: trio.Event = field(default_factory=trio.Event)


class _Turnstile:
    """Hands released bios to their devices one at a time, in release order.

    ``release`` appends; the head's ``turn`` event is set.  The head's task calls
    ``passed`` just before it returns its device from map() -- the core then
    calls ``BlockDevice.submit`` without a checkpoint in between -- which sets
    the next one's event.  That task cannot run before the head yields, which
    it does only inside ``submit``.
    """

    def __init__(self) -> None:
        self._queue: deque[_Held] = deque()

    def release(self, held: _Held) -> None:
        self._queue.append(held)
        if len(self._queue) == 1:
            held.turn.set()

    def passed(self, held: _Held) -> None:
        """``held`` (the head, or a cancelled waiter anywhere) leaves the queue."""
        was_head = bool(self._queue) and self._queue[0] is held
        try:
            self._queue.remove(held)
        except ValueError:
            return
        if was_head and self._queue:
            self._queue[0].turn.set()


class DelayTarget(Target):
    name = "delay"
    version = (1, 5, 0)
    num_flush_bios = 1
    num_discard_bios = 1

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        super().__init__(ti, args)
        if len(args) not in (3, 6, 9):
            raise TargetArgError("Requires exactly 3, 6 or 9 arguments")
        self.argc = len(args)
        self.read = _class_ctr(ti, args[0:3])
        if self.argc == 3:
            self.write = _class_ctr(ti, args[0:3])
            self.flush = _class_ctr(ti, args[0:3])
        else:
            self.write = _class_ctr(ti, args[3:6])
            self.flush = _class_ctr(ti, args[6:9] if self.argc == 9 else args[3:6])
        self.may_delay = True
        self._held: list[_Held] = []
        self._turnstile = _Turnstile()

    # -- I/O ------------------------------------------------------------------------------

    def _class_of(self, bio: Bio) -> DelayClass:
        if bio.is_write:
            return self.flush if bio.flags & ReqFlag.PREFLUSH else self.write
        return self.read

    async def map(self, bio: Bio) -> BlockDevice:
        c = self._class_of(bio)
        if bio.nr_sectors:
            bio.sector = c.start + bio.sector - self.ti.begin
        if not c.delay_ms or not self.may_delay:
            return c.dev
        held = _Held(c, trio.current_time() + c.delay_ms / 1000)
        c.ops += 1
        self._held.append(held)
        try:
            with trio.move_on_at(held.expires):
                await held.turn.wait()
            if not held.turn.is_set():
                self._release(flush_all=False)
                await held.turn.wait()
        except BaseException:
            self._forget(held)
            raise
        self._turnstile.passed(held)
        return c.dev

    def _release(self, flush_all: bool) -> None:
        """``flush_delayed_bios``: release the expired (or all) held bios, in list order."""
        now = trio.current_time()
        keep: list[_Held] = []
        for held in self._held:
            if flush_all or now >= held.expires:
                held.cls.ops -= 1
                self._turnstile.release(held)
            else:
                keep.append(held)
        self._held = keep

    def _forget(self, held: _Held) -> None:
        """A waiter was cancelled: drop it wherever it is, keep the counts right."""
        if held in self._held:
            self._held.remove(held)
            held.cls.ops -= 1
        self._turnstile.passed(held)

    async def presuspend(self) -> None:
        self.may_delay = False
        self._release(flush_all=True)

    async def resume(self) -> None:
        self.may_delay = True

    async def close(self) -> None:
        self._release(flush_all=True)

    # -- reporting ------------------------------------------------------------------------

    def status(self, kind: StatusType) -> str:
        if kind is StatusType.INFO:
            return f"{self.read.ops} {self.write.ops} {self.flush.ops}"
        out = self.read.table()
        if self.argc >= 6:
            out += " " + self.write.table()
        if self.argc >= 9:
            out += " " + self.flush.table()
        return out

    def iterate_devices(self) -> list[DeviceRange]:
        return [DeviceRange(c.dev, c.start, self.ti.len)
                for c in (self.read, self.write, self.flush)]
