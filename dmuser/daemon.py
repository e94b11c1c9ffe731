"""``dmuser serve``: one process holding every mapped device.

Life cycle (``docs/daemon.md``):

1. Refuse to start if a daemon answers on the socket; remove a stale socket
   (nobody listening) and lazily unmount a stale FUSE mount (``ENOTCONN``) left
   by a killed daemon; refuse a mountpoint that is a live mount.
2. Mount the FUSE file system, start the control server, then report
   readiness (``--ready-fd``): the background start returns only now.
3. Serve until SIGTERM, SIGINT or the ``shutdown`` verb.  Shutdown suspends
   every device (new I/O is held, I/O in flight drains), flushes every table
   (``fdatasync`` of every backing file), removes the devices, stops the FUSE
   loop, unmounts and exits 0.  Data acknowledged by an ``fsync`` is durable
   before that, and writes that were acknowledged are durable after it.

Verbs that change the namespace or build tables (create, reload, clear,
remove) run one at a time under the manager's ``namespace_lock`` (which a
deferred remove takes too when it acts), so device resolution and holder counts
never interleave.  Suspend and resume take only the device's own
lock (``mapped_device.py``): a suspend waiting for I/O to drain must not stop
a resume of the device that I/O is waiting on.  I/O never takes these locks.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
from typing import Any

import pyfuse3
import trio

from dmuser import client
from dmuser.control import dispatch
from dmuser.core.config import Config
from dmuser.core.errors import DmError
from dmuser.core.loopdev import LoopDevices, cleanup_stale
from dmuser.core.manager import DeviceManager
from dmuser.core.mapper_links import MAPPER_DIR
from dmuser.core.target import TargetRegistry
from dmuser.fuse_ops import MAX_REQUESTS, DeviceFS
from dmuser.nbd_server import NbdServer
from dmuser.targets.delay import DelayTarget
from dmuser.targets.dust import DustTarget
from dmuser.targets.error import ErrorTarget
from dmuser.targets.flakey import FlakeyTarget
from dmuser.targets.linear import LinearTarget
from dmuser.targets.log_writes import LogWritesTarget
from dmuser.targets.mirror import MirrorTarget
from dmuser.targets.snapshot import SnapshotMergeTarget, SnapshotOriginTarget, SnapshotTarget
from dmuser.targets.zero import ZeroTarget

log = logging.getLogger(__name__)

_PR_SET_IO_FLUSHER = 57
MAX_REQUEST_BYTES = 16 << 20
NAMESPACE_VERBS = frozenset({"create", "reload", "clear", "remove"})


def _is_wait(raw: bytes) -> bool:
    """True if ``raw`` is a well-formed ``wait`` request (parsed again by ``_answer``)."""
    if b'"wait"' not in raw:
        return False
    try:
        req = json.loads(raw)
    except ValueError:
        return False
    return isinstance(req, dict) and req.get("verb") == "wait"


class StartupError(DmError):
    pass


def builtin_targets() -> TargetRegistry:
    """Every target type a dmuser daemon serves: the one list of them."""
    return TargetRegistry(LinearTarget, ZeroTarget, ErrorTarget, FlakeyTarget,
                          SnapshotOriginTarget, SnapshotTarget, SnapshotMergeTarget,
                          MirrorTarget, DelayTarget, DustTarget, LogWritesTarget)


def _set_io_flusher() -> None:
    """Mark the daemon as an I/O flusher so memory reclaim does not recurse into it.

    Loop devices on our files can otherwise deadlock under memory pressure.
    Needs CAP_SYS_RESOURCE; without it we carry on.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0:
        log.info("PR_SET_IO_FLUSHER not set: %s", os.strerror(ctypes.get_errno()))


def _lazy_unmount(path: str) -> None:
    cmds = [["fusermount3", "-u", "-z", path], ["umount", "-l", path]]
    if os.geteuid() == 0:
        cmds.reverse()
    for cmd in cmds:
        if shutil.which(cmd[0]) and subprocess.run(cmd, capture_output=True).returncode == 0:
            return
    raise StartupError(f"cannot unmount stale mount {path}; try 'fusermount3 -u -z {path}'")


def prepare(mountpoint: str, sock_path: str, block_devices: bool = False) -> None:
    """Step 1 of the life cycle: detect a running daemon, clean stale leftovers
    (with ``block_devices``, first the loop devices a killed daemon left on the
    mount, while their backing files still show the mountpoint's path)."""
    reply = client.ping(sock_path)
    if reply is not None:
        pid = reply.get("data", {}).get("pid")
        raise StartupError(f"a dmuser daemon (pid {pid}) is already running on {sock_path}")
    if block_devices:
        cleanup_stale(mountpoint)
    if os.path.exists(sock_path) or os.path.islink(sock_path):
        log.warning("removing stale control socket %s", sock_path)
        os.unlink(sock_path)
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            log.warning("unmounting stale FUSE mount %s left by a dead daemon", mountpoint)
            _lazy_unmount(mountpoint)
        elif exc.errno != errno.ENOENT:
            raise StartupError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if os.path.ismount(mountpoint):
        raise StartupError(f"{mountpoint} is already a mount point (another dmuser daemon "
                           f"with a different socket?); unmount it or choose --mountpoint")
    os.makedirs(mountpoint, mode=0o755, exist_ok=True)
    if os.listdir(mountpoint):
        raise StartupError(f"mountpoint {mountpoint} is not empty")
    os.makedirs(os.path.dirname(os.path.abspath(sock_path)), mode=0o755, exist_ok=True)


class Daemon:
    def __init__(self, mountpoint: str, sock_path: str, config: Config | None = None) -> None:
        self.mountpoint = os.path.abspath(mountpoint)
        self.sock_path = os.path.abspath(sock_path)
        self.config = config or Config()
        self.manager = DeviceManager(self.mountpoint, types=builtin_targets(), config=self.config)
        if self.config.block_devices:
            self.manager.loops = LoopDevices(self.mountpoint)
        self.fs = DeviceFS(self.manager)
        self.nbd = NbdServer(self.manager)
        self._stopping = False

    def run(self, ready_fd: int | None = None) -> None:
        """Mount, serve until told to stop, unmount.  Blocks."""
        if self.config.block_devices and os.geteuid() != 0:
            raise StartupError("--block-devices needs root (it attaches loop devices and "
                               f"writes {MAPPER_DIR}); euid is {os.geteuid()}")
        prepare(self.mountpoint, self.sock_path, self.config.block_devices)
        _set_io_flusher()
        options = {"fsname=dmuser", "subtype=dmuser", "default_permissions"}
        if os.geteuid() == 0:
            options.add("allow_other")
        pyfuse3.init(self.fs, self.mountpoint, options)
        try:
            trio.run(self._main, ready_fd)
        except BaseException:
            pyfuse3.close(unmount=True)
            raise
        else:
            pyfuse3.close(unmount=True)
        finally:
            if os.path.exists(self.sock_path):
                os.unlink(self.sock_path)
        log.info("daemon stopped, %s unmounted", self.mountpoint)

    async def _main(self, ready_fd: int | None) -> None:
        async with trio.open_nursery() as nursery:
            self.manager.service_nursery = nursery

            async def fuse_loop() -> None:
                await pyfuse3.main(max_tasks=MAX_REQUESTS)
                nursery.cancel_scope.cancel()

            nursery.start_soon(fuse_loop)
            await nursery.start(self.nbd.run)
            await nursery.start(self._control_server)
            nursery.start_soon(self._signal_watcher)
            log.info("serving %s, control socket %s (pid %d)",
                     self.mountpoint, self.sock_path, os.getpid())
            log.info("configuration: %s", ", ".join(self.config.describe()))
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n")
                os.close(ready_fd)

    async def _signal_watcher(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("got %s", signal.Signals(signum).name)
                await self.shutdown()
                return

    async def shutdown(self) -> None:
        """Drain, flush, remove every device, stop the FUSE loop.  Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        try:
            # NBD clients first: their requests in flight finish before the quiesce
            await self.nbd.stop()
            async with self.manager.namespace_lock:
                # loop devices first (quiesce_all): their last writeback needs the
                # devices running
                await self.manager.quiesce_all()
                await self.manager.remove_all()
        finally:
            pyfuse3.terminate()

    # -- control socket -------------------------------------------------------------------

    async def _control_server(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old_umask = os.umask(0o077)
        try:
            await sock.bind(self.sock_path)
        finally:
            os.umask(old_umask)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self._handle_connection, [listener])

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            buf = bytearray()
            while b"\n" not in buf and len(buf) < MAX_REQUEST_BYTES:
                data = await stream.receive_some(65536)
                if not data:
                    break
                buf += data
            if _is_wait(bytes(buf)):
                reply = await self._answer_unless_hangup(stream, bytes(buf))
                if reply is None:
                    return
            else:
                reply = await self._answer(bytes(buf))
            try:
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except trio.BrokenResourceError:
                log.info("control client went away before the reply")

    async def _answer_unless_hangup(self, stream: trio.SocketStream,
                                    raw: bytes) -> dict[str, Any] | None:
        """Answer a ``wait``, but give up (None) as soon as the client closes the
        connection: a client killed while waiting leaves no task behind.  A wait
        client must therefore keep its sending side open until the reply."""
        reply: dict[str, Any] | None = None
        async with trio.open_nursery() as nursery:
            async def answer() -> None:
                nonlocal reply
                reply = await self._answer(raw)
                nursery.cancel_scope.cancel()

            async def watch_hangup() -> None:
                try:
                    while await stream.receive_some(4096):
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                log.info("control client went away during wait")
                nursery.cancel_scope.cancel()

            nursery.start_soon(answer)
            nursery.start_soon(watch_hangup)
        return reply

    async def _answer(self, raw: bytes) -> dict[str, Any]:
        try:
            req = json.loads(raw)
            if not isinstance(req, dict):
                raise ValueError("request is not a JSON object")
        except ValueError as exc:
            return {"ok": False, "errno": errno.EINVAL, "error": f"bad request: {exc}"}
        verb = req.get("verb")
        try:
            if verb == "shutdown":
                trio.lowlevel.spawn_system_task(self.shutdown)
                return {"ok": True, "output": "", "data": None}
            if self._stopping:
                raise DmError("the daemon is shutting down", errno.ESHUTDOWN)
            if verb in NAMESPACE_VERBS:
                async with self.manager.namespace_lock:
                    result = await dispatch(self.manager, req)
            else:
                result = await dispatch(self.manager, req)
            return {"ok": True, "output": result.output, "data": result.data}
        except DmError as exc:
            log.info("%s %s failed: %s", verb, req.get("name", ""), exc)
            return {"ok": False, "errno": exc.errno, "error": exc.message}
        except Exception as exc:
            log.exception("internal error in verb %s", verb)
            return {"ok": False, "errno": errno.EIO, "error": f"internal error: {exc!r}"}
