"""The daemon's shutdown of its devices: the order, and the drain and flush.

Guarantees (``docs/daemon.md``, "Stop"): devices the user left suspended are
resumed first, so their held I/O completes (and a file system their suspend
froze is thawed); then every device is suspended (its I/O drained) and its
live table flushed, each device before the devices it stacks on, so that its
drain and its flush can still reach them.  The kernel's tools suspend stacks
in the same order.  Errors are logged, not raised: shutdown goes on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from dmuser.core.bio import Bio
from dmuser.core.errors import DmError
from dmuser.core.mapped_device import MappedDevice

if TYPE_CHECKING:
    from dmuser.core.manager import DeviceManager

log = logging.getLogger(__name__)


def _stacked_on(md: MappedDevice) -> set[MappedDevice]:
    """The mapped devices ``md``'s live and inactive tables use directly."""
    return {dev for table in (md.live, md.inactive) if table is not None
            for dev in table.devices() if isinstance(dev, MappedDevice)}


def stack_order(devices: list[MappedDevice]) -> list[MappedDevice]:
    """``devices`` (sorted by name), each before the devices its tables stack on."""
    order: list[MappedDevice] = []
    seen: set[str] = set()

    def visit(md: MappedDevice) -> None:
        if md.name in seen:
            return
        seen.add(md.name)
        for user in devices:
            if user is not md and md in _stacked_on(user):
                visit(user)
        order.append(md)

    for md in devices:
        visit(md)
    return order


async def detach_all(mgr: DeviceManager) -> None:
    """Detach every block device (and thaw what a suspend froze on a running one)
    while the devices still serve the loop devices' last writeback."""
    if mgr.loops is not None:
        for md in list(mgr.devices.values()):
            if not md.suspended:  # else quiesce_all thaws it after its resume
                await mgr.loops.thaw(md)
            await mgr.loops.detach(md)


async def quiesce_all(mgr: DeviceManager) -> None:
    """Resume the suspended devices, then suspend and flush every device, top-down."""
    for md in mgr:
        if md.suspended:
            # A device the user left suspended would hold the drain and the
            # final flush of every device stacked on it forever.  Its pending
            # reload dies with the daemon anyway: drop it and let I/O flow.
            try:
                await md.clear()
                await md.resume()
                if mgr.loops is not None:
                    await mgr.loops.thaw(md)
            except DmError as exc:
                log.error("%s: cannot resume for shutdown: %s", md.name, exc)
    for md in mgr.stack_order():
        await md.suspend()
        if md.live is None:
            continue
        try:
            await md.live.submit(Bio.flush())
        except DmError as exc:
            log.error("%s: final flush failed: %s", md.name, exc)
