"""mirror: dm-raid1, N legs kept identical, with a dirty region log (dm-spec §5).

Table::

    <log_type> <#log_args> <log_args...> <#legs> <dev0> <off0> ... [<#features> <feature>...]

* ``core <region_size> [sync|nosync]`` or ``disk <log_dev> <region_size> [sync|nosync]``;
* 2 to 9 legs; leg 0 is the initial default ("primary") leg;
* features ``handle_errors`` and ``keep_log`` (which requires handle_errors).

The constructor checks arguments in the kernel's order with its ``ti->error``
texts; any failure of the dirty log gives "Error creating mirror dirty log",
and the log's own reason is only logged (a warning), as the kernel's DMWARN.
Bios reaching the target never cross a region (``ti.max_io_len`` = region size).

Status INFO: ``<#legs> <leg>... <in-sync>/<regions> 1 <health chars> <log info>``
(``2 254:0 254:64 8/8 1 AA 1 core``); TABLE: the log's fragment, then the legs
and the features (``core 1 1024 2 254:0 16384 254:64 0``).

Messages: the kernel's mirror takes none.  dmuser adds one extension,
``read_balance on|off`` (``dmuser message NAME 0 read_balance on``): reads of
regions in sync take turns over the legs without errors instead of going to
the default leg.  It is off at every table load (the kernel's behaviour), is
not part of the table or status strings, and any other message fails with the
kernel's "Target type does not support messages".

The target's runtime (daemon, resync, failures) is :class:`~.mirror_set.MirrorSet`.
It runs in the table's service nursery, ``ti.nursery`` (the daemon's
``DeviceManager.service_nursery``); a table built without one cannot hold a
mirror ("mirror needs a service nursery").  ``open()`` starts it, ``close()``
stops it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from dmuser.core.args import U32_MAX, parse_uint
from dmuser.core.bio import Bio
from dmuser.core.blockdev import BlockDevice
from dmuser.core.errors import DmError, TargetArgError
from dmuser.core.target import DeviceRange, StatusType, Target, TargetContext
from dmuser.targets.mirror.legs import Leg
from dmuser.targets.mirror.log import DirtyLogError, create_dirty_log
from dmuser.targets.mirror.mirror_set import MirrorSet

log = logging.getLogger(__name__)

#: DM_KCOPYD_MAX_REGIONS + 1.
MAX_NR_MIRRORS = 9


def service_nursery(ti: TargetContext) -> trio.Nursery:
    """``ti.nursery``, where the mirror's daemon runs; DmError if the table has none."""
    if ti.nursery is None:
        raise DmError("mirror needs a service nursery (TargetContext.nursery) to run its daemon")
    return ti.nursery


def _parse_features(words: list[str]) -> tuple[bool, bool, int]:
    """``parse_features``: (handle_errors, keep_log, words used)."""
    if not words:
        return False, False, 0
    count = parse_uint(words[0], U32_MAX)
    if count is None:
        raise TargetArgError("Invalid number of features")
    if count > len(words) - 1:
        raise TargetArgError("Not enough arguments to support feature count")
    handle_errors = keep_log = False
    for word in words[1 : 1 + count]:
        if word == "handle_errors":
            handle_errors = True
        elif word == "keep_log":
            keep_log = True
        else:
            raise TargetArgError("Unrecognised feature requested")
    if keep_log and not handle_errors:
        raise TargetArgError("keep_log feature requires the handle_errors feature")
    return handle_errors, keep_log, 1 + count


class MirrorTarget(Target):
    name = "mirror"
    version = (1, 15, 0)
    num_flush_bios = 1
    num_discard_bios = 1

    def __init__(self, ti: TargetContext, args: Sequence[str]) -> None:
        super().__init__(ti, args)
        words = list(args)
        self.event_count = 0
        if len(words) < 2:
            raise TargetArgError("Insufficient mirror log arguments")
        nr_log_args = parse_uint(words[1], U32_MAX)
        if nr_log_args is None:
            raise TargetArgError("Invalid mirror log argument count")
        used = 2 + nr_log_args
        if len(words) < used:
            raise TargetArgError("Insufficient mirror log arguments")
        try:
            self.dirty_log = create_dirty_log(words[0], ti, words[2:used],
                                        flush_callback=self._flush_legs,
                                        table_event=self.table_event)
        except (DirtyLogError, DmError) as exc:
            log.warning("%s", exc)
            raise TargetArgError("Error creating mirror dirty log") from None
        words = words[used:]
        nr_legs = parse_uint(words[0], U32_MAX) if words else None
        if nr_legs is None or not 2 <= nr_legs <= MAX_NR_MIRRORS:
            raise TargetArgError("Invalid number of mirrors")
        words = words[1:]
        if len(words) < 2 * nr_legs:
            raise TargetArgError("Too few mirror arguments")
        legs = []
        for index in range(nr_legs):
            dev_word, offset_word = words[2 * index : 2 * index + 2]
            offset = parse_uint(offset_word)
            if offset is None:
                raise TargetArgError("Invalid offset")
            dev = ti.get_device(dev_word, "Device lookup failure")
            legs.append(Leg(index, dev, offset))
        words = words[2 * nr_legs :]
        if self.dirty_log.get_region_size() > U32_MAX:
            raise TargetArgError("Maximum size of target IO is too large")
        ti.max_io_len = self.dirty_log.get_region_size()
        handle_errors, keep_log, used = _parse_features(words)
        if len(words) > used:
            raise TargetArgError("Too many mirror arguments")
        self.ms = MirrorSet(ti, self.dirty_log, legs, handle_errors, keep_log, self.table_event)

    # -- life cycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Start the mirror's service; its daemon makes its first pass at once."""
        await service_nursery(self.ti).start(self.ms.run)

    async def close(self) -> None:
        await self.ms.stop()

    async def presuspend(self) -> None:
        await self.ms.presuspend()

    async def postsuspend(self) -> None:
        await self.ms.postsuspend()

    async def resume(self) -> None:
        await self.ms.resume()

    def table_event(self) -> None:
        """dm_table_event: counted here, and passed to the core if it offers a hook."""
        self.event_count += 1
        if self.ti.table_event is not None:
            self.ti.table_event()

    async def _flush_legs(self) -> None:
        await self.ms.legs.flush_all()

    # -- I/O ------------------------------------------------------------------------------------

    async def map(self, bio: Bio) -> BlockDevice | None:
        await self.ms.map(bio)
        return None

    # -- messages (dmuser extension) ----------------------------------------------------------

    async def message(self, args: Sequence[str]) -> str | None:
        """``read_balance on|off``; anything else fails as the kernel's mirror does."""
        words = list(args)
        if words and words[0] == "read_balance":
            if len(words) != 2 or words[1] not in ("on", "off"):
                raise TargetArgError("read_balance takes one argument: on or off")
            self.ms.legs.read_balance = words[1] == "on"
            return None
        return await super().message(args)

    # -- reporting ------------------------------------------------------------------------------

    def status(self, kind: StatusType) -> str:
        ms = self.ms
        if kind is StatusType.INFO:
            devs = "".join(f"{leg.dev.status_name} " for leg in ms.legs)
            return (f"{len(ms.legs)} {devs}{self.dirty_log.get_sync_count()}/{ms.nr_regions} 1 "
                    f"{ms.legs.status_chars()} {self.dirty_log.status(kind)}")
        out = self.dirty_log.status(kind) + str(len(ms.legs))
        out += "".join(f" {leg.dev.status_name} {leg.offset}" for leg in ms.legs)
        features = ["handle_errors"] * ms.legs.handle_errors + ["keep_log"] * ms.legs.keep_log
        if features:
            out += f" {len(features)} " + " ".join(features)
        return out

    def iterate_devices(self) -> list[DeviceRange]:
        return [DeviceRange(leg.dev, leg.offset, self.ti.len) for leg in self.ms.legs]
