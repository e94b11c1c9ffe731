"""Every tunable of a dmuser daemon, in one frozen record.

A :class:`Config` is made once, by ``dmuser serve`` from its options (with the
environment variables below only as a fallback), and handed down: to the
device manager, which gives backing files their :class:`~dmuser.core.io_policy.IoPolicy`
and every table its targets' :class:`~dmuser.core.target.TargetContext`.
Nothing reads the environment at import time, and tests pass a ``Config``
instead of patching module globals.

Each field ``name`` is set by ``dmuser serve --name-with-dashes``, else by
``$DMUSER_NAME_IN_CAPITALS``, else takes its default:

| field | default | what |
|---|---|---|
| ``inline_max_bytes`` | 1 MiB | largest syscall run inline in the trio thread |
| ``io_threads`` | 16 | worker threads for blocking syscalls |
| ``inline_yield_every`` | 16 | inline syscalls between scheduler yields |
| ``inline_flush`` | on | an ``fdatasync`` runs inline while nothing else is runnable |
| ``write_behind_bytes`` | 16 MiB | writes to a backing file before its writeback starts early |
| ``mirror_clean_delay`` | 5.0 s | idle time before a mirror region is marked clean |
| ``resync_throttle`` | 100 % | mirror resync's share of time with I/O in flight |
| ``snapshot_copy_pool_pages`` | 4096 | memory for a snapshot's copy-outs in flight |
| ``snapshot_cow_threshold`` | 2048 | copy-outs in progress before writes wait |
| ``snapshot_hold_bytes`` | 16 MiB | origin writes held until their exceptions commit (0: none) |
| ``snapshot_hold_ms`` | 1000 ms | longest a held origin write waits before a group commit starts |
| ``block_devices`` | on as root | a loop device and /dev/mapper/NAME per device (root only) |
| ``nbd_timeout`` | 30.0 s | an unanswered NBD request kills its connection (0: never) |

``block_devices`` is the one field whose default depends on the caller:
:meth:`Config.build` takes ``root`` (``dmuser serve`` passes whether its euid
is 0), so that as root every device gets a block device unless
``--no-block-devices`` (or ``$DMUSER_BLOCK_DEVICES=0``) says otherwise, and
without root nothing is attempted unless asked for (and then refused).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "DMUSER_"


def parse_bool(text: str) -> bool:
    """A switch's value in an option or variable: on/off, yes/no, true/false, 1/0."""
    word = str(text).strip().lower()
    if word in ("1", "on", "yes", "true"):
        return True
    if word in ("0", "off", "no", "false", ""):
        return False
    raise ValueError(f"not a switch value: {text!r}")


def field_kind(f: dataclasses.Field[Any]) -> Any:
    """How an option or variable's text becomes the field's value."""
    if f.type in ("bool", bool):
        return parse_bool
    return int if f.type in ("int", int) else float


def _tunable(default: Any, help: str, minimum: float = 0) -> Any:
    return field(default=default, metadata={"help": help, "minimum": minimum})


@dataclass(frozen=True, slots=True)
class Config:
    """The daemon's tunables; see the module docstring for options and variables."""

    inline_max_bytes: int = _tunable(
        1 << 20, "largest pread/pwrite run inline in the trio thread; larger ones go to "
        "a worker thread (docs/io-policy.md)")
    io_threads: int = _tunable(
        16, "worker threads for blocking syscalls (one limiter per daemon)", minimum=1)
    inline_yield_every: int = _tunable(
        16, "an inline syscall yields to the scheduler once every this many calls", minimum=1)
    inline_flush: bool = _tunable(
        True, "run an fdatasync (flush, FUA) inline in the trio thread when no other task "
        "is runnable and no worker thread busy; off: always in a worker thread "
        "(docs/io-policy.md)")
    write_behind_bytes: int = _tunable(
        16 << 20, "bytes written to a backing file since its last flush before the kernel "
        "is asked to start writing its dirty pages to disk, in a worker thread nobody "
        "waits for, so that the next flush has less left to write; 0: never "
        "(docs/io-policy.md)")
    mirror_clean_delay: float = _tunable(
        5.0, "seconds a mirror region stays marked dirty after its last write; 0 is the "
        "kernel's behaviour (cleaned at the next pass)")
    resync_throttle: int = _tunable(
        100, "percent of time mirror resync may keep I/O in flight, shared by every mirror "
        "(dm-raid1's raid1_resync_throttle); 100 is unlimited", minimum=1)
    snapshot_copy_pool_pages: int = _tunable(
        4096, "4 KiB pages of memory for a snapshot's copy-outs in flight", minimum=1)
    snapshot_cow_threshold: int = _tunable(
        2048, "copy-outs in progress before a snapshot's writes wait "
        "(dm-snap's snapshot_cow_threshold)", minimum=1)
    snapshot_hold_bytes: int = _tunable(
        16 << 20, "bytes of origin writes per origin acknowledged before the snapshot "
        "exceptions they need are durable, held in memory until a group commit; 0 commits "
        "every first write before it completes, as the kernel does "
        "(docs/snapshot-protocol.md)")
    snapshot_hold_ms: int = _tunable(
        1000, "milliseconds the oldest held origin write waits before a group commit "
        "starts (docs/snapshot-protocol.md)", minimum=1)
    block_devices: bool = _tunable(
        False, "give each device with a live table a block device: a loop device on its "
        "file, linked as /dev/mapper/NAME (root only, and on by default as root; "
        "docs/daemon.md)")
    nbd_timeout: float = _tunable(
        30.0, "seconds an NBD table device (nbd:// word) waits for a reply before it "
        "closes the connection and fails its I/O with EIO, as for a dead server; "
        "0: wait forever (docs/nbd.md)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value < f.metadata["minimum"]:
                raise ValueError(f"{f.name} (--{f.name.replace('_', '-')}, "
                                 f"${self.env_name(f.name)}) must be at least "
                                 f"{f.metadata['minimum']}, not {value}")

    @classmethod
    def fields(cls) -> list[dataclasses.Field[Any]]:
        return list(dataclasses.fields(cls))

    @staticmethod
    def env_name(name: str) -> str:
        return ENV_PREFIX + name.upper()

    @classmethod
    def build(cls, options: Mapping[str, Any], environ: Mapping[str, str], *,
              root: bool = False) -> Config:
        """Each field from ``options`` (None: not given), else from its environment
        variable, else its default (``block_devices``: ``root``).  Raises ValueError
        naming the field or variable whose value is bad."""
        values: dict[str, Any] = {"block_devices": root}
        for f in cls.fields():
            kind = field_kind(f)
            given = options.get(f.name)
            if given is not None:
                values[f.name] = kind(given)
                continue
            var = cls.env_name(f.name)
            text = environ.get(var, "").strip()
            if text:
                try:
                    values[f.name] = kind(text)
                except ValueError:
                    what = {int: "an integer", float: "a number",
                            parse_bool: "on/off, yes/no, true/false or 1/0"}[kind]
                    raise ValueError(f"${var}: not {what}: {text!r}") from None
        return cls(**values)

    def describe(self) -> list[str]:
        """One ``name = value`` line per field, for the daemon's log."""
        return [f"{f.name} = {getattr(self, f.name)}" for f in self.fields()]
