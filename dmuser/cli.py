"""``dmuser``: the daemon and a dmsetup-like command line.

Every verb except ``serve``, ``demo`` and ``cow`` talks to the daemon through
:class:`dmuser.Client` (``--socket``, ``$DMUSER_SOCKET``, or the default from
``paths.py``): the typed methods for the verbs that change state, ``wait`` and
``message``; ``Client.call`` for the reporting verbs, whose text the daemon
formats as dmsetup does.  ``wait`` exits 1 on timeout and 130 on Ctrl-C.
Exit status: 0 on success, 1 when the command failed (the message is printed
to stderr, prefixed ``dmuser: VERB NAME:``), 2 for bad command-line usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from typing import Any

from dmuser import client, paths
from dmuser.client import Client
from dmuser.core.config import Config, field_kind, parse_bool
from dmuser.core.errors import DmError

TABLE_HELP = "table lines 'START LENGTH TARGET ARGS...', ';' or newline separated"


def _add_socket(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", default=None, metavar="PATH",
                   help="control socket of the daemon (default: $DMUSER_SOCKET or "
                        f"{paths.default_socket()})")


def _add_table_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("table_file", nargs="?", metavar="TABLE_FILE",
                   help="file holding the table; '-' or absent with --table absent: stdin")
    p.add_argument("--table", metavar="TABLE", help=TABLE_HELP)


def _uint(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not an event number: {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmuser",
        description="Userspace device-mapper: mapped devices as files on a FUSE mount.")
    parser.add_argument("--version", action="version", version="dmuser 0.1.0")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser("serve", help="run the daemon that holds every mapped device")
    p.add_argument("--mountpoint", default=None, metavar="DIR",
                   help=f"where device files appear (default {paths.default_mountpoint()})")
    _add_socket(p)
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (default: detach once the mount is ready)")
    p.add_argument("--log-file", metavar="FILE",
                   help="log file in background mode (default: <socket>.log)")
    p.add_argument("--debug", action="store_true", help="log every control verb and error")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    tunables = p.add_argument_group(
        "tunables", "each defaults to its environment variable, else the value shown")
    for f in Config.fields():
        kind = field_kind(f)
        if kind is parse_bool:  # a switch: '--name' alone turns it on, '--no-name' off
            tunables.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                                  nargs="?", const=True, metavar="on|off",
                                  help=f"{f.metadata['help']} (${Config.env_name(f.name)})")
            tunables.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name,
                                  action="store_const", const=False,
                                  help=f"the same as --{f.name.replace('_', '-')} off")
            continue
        tunables.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                              metavar=kind.__name__.upper(),
                              help=f"{f.metadata['help']} (${Config.env_name(f.name)}; "
                                   f"default {f.default})")

    p = sub.add_parser("create", help="create a device and load and activate its table")
    p.add_argument("name")
    _add_table_source(p)
    p.add_argument("--notable", action="store_true", help="create without a table")
    p.add_argument("--uuid", default="")
    p.add_argument("-r", "--readonly", action="store_true", help="a read-only table")
    _add_socket(p)

    p = sub.add_parser("reload", help="load an inactive table (activate it with resume)")
    p.add_argument("name")
    _add_table_source(p)
    p.add_argument("-r", "--readonly", action="store_true", help="a read-only table")
    _add_socket(p)

    p = sub.add_parser("remove", help="remove a device")
    p.add_argument("name")
    p.add_argument("--force", action="store_true",
                   help="remove even while open: its I/O then fails")
    p.add_argument("--deferred", action="store_true",
                   help="if busy, remove it when its last opener closes")
    _add_socket(p)

    for verb, text in (("suspend", "hold new I/O and drain I/O in flight"),
                       ("resume", "swap in the inactive table, if any, and release I/O"),
                       ("clear", "drop the inactive table")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("name")
        if verb == "suspend":
            p.add_argument("--noflush", action="store_true",
                           help="let targets requeue the bios they hold (a mirror's writes "
                                "after a leg failure) until resume, instead of failing them")
        if verb in ("suspend", "resume"):
            p.add_argument("--nolockfs", action="store_true",
                           help="do not freeze the file system mounted on the block device")
        _add_socket(p)

    for verb, text in (("ls", "list devices"),
                       ("table", "show tables (dmsetup table format)"),
                       ("status", "show target status (dmsetup status format)"),
                       ("info", "show device state"),
                       ("targets", "list target types and versions")):
        p = sub.add_parser(verb, help=text)
        if verb in ("table", "status", "info"):
            p.add_argument("name", nargs="?")
        if verb in ("table", "status"):
            p.add_argument("--inactive", action="store_true", help="show the inactive table")
        if verb == "status":
            p.add_argument("--watch", action="store_true",
                           help="live progress bar (rate, ETA) of resync and merge; Ctrl-C stops")
            p.add_argument("--interval", type=float, default=0.5, metavar="SECONDS",
                           help="poll interval for --watch (default 0.5)")
            p.add_argument("--until-complete", action="store_true",
                           help="with --watch: exit 0 once every resync/merge is complete")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        _add_socket(p)

    p = sub.add_parser("message", help="send a message to the target at SECTOR")
    p.add_argument("name")
    p.add_argument("sector")
    p.add_argument("message", nargs="*")
    _add_socket(p)

    p = sub.add_parser("wait", help="wait until the device's event number exceeds EVENT_NR")
    p.add_argument("name")
    p.add_argument("event_nr", nargs="?", type=_uint, default=0, metavar="EVENT_NR",
                   help="the event number already seen (default 0; see 'info')")
    p.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="give up (exit status 1) after this long (default: no limit)")
    _add_socket(p)

    p = sub.add_parser("export", help="serve the device over NBD (docs/nbd.md)")
    p.add_argument("name")
    p.add_argument("address", metavar="ADDR",
                   help="HOST:PORT (loopback unless TLS or --insecure-tcp) or a Unix "
                   "socket path")
    p.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    p.add_argument("--export-name", metavar="NAME", help="NBD export name (default: the device's)")
    p.add_argument("--insecure-tcp", "--insecure", dest="insecure", action="store_true",
                   help="allow a non-loopback TCP address without TLS")
    p.add_argument("--tls-cert", metavar="FILE", help="require TLS: the server's certificate "
                   "(PEM); with --tls-key")
    p.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert (PEM)")
    p.add_argument("--tls-ca", metavar="FILE",
                   help="also require a client certificate signed by this CA (PEM)")
    p.add_argument("--allow", metavar="NET", action="append",
                   help="admit only clients from this address or ADDR/PREFIX (repeatable)")
    _add_socket(p)

    p = sub.add_parser("unexport", help="stop serving the device over NBD")
    p.add_argument("name")
    p.add_argument("address", nargs="?", metavar="ADDR", help="only this address (default: all)")
    _add_socket(p)

    p = sub.add_parser("shutdown", help="stop the daemon (drain, flush, unmount)")
    _add_socket(p)

    p = sub.add_parser("demo", help="run the end-to-end demo on temporary images")
    p.add_argument("--no-loop", action="store_true",
                   help="no loop devices and kernel mounts (as without root): the file "
                        "systems are reached with debugfs on the device files")

    p = sub.add_parser("dmsetup", help="dmsetup's own syntax and output formats "
                       "('dmuser dmsetup help'; '--install-shim DIR')", add_help=False)
    p.add_argument("dmsetup_args", nargs=argparse.REMAINDER, metavar="ARGS")

    p = sub.add_parser("cow", help="inspect or check a persistent snapshot COW device offline",
                       add_help=False)
    p.add_argument("cow_args", nargs=argparse.REMAINDER,
                   metavar="inspect|check FILE [--json] [--list]")
    return parser


def _read_table(args: argparse.Namespace) -> str | None:
    if getattr(args, "notable", False):
        return None
    if args.table is not None:
        return str(args.table).replace(";", "\n")
    if args.table_file not in (None, "-"):
        try:
            with open(args.table_file) as f:
                return f.read()
        except OSError as exc:
            raise DmError(f"cannot read table file {args.table_file}: "
                          f"{exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise DmError(f"table file {args.table_file} is not text") from None
    if args.table_file is None and sys.stdin.isatty():
        raise DmError("no table given: use --table, a table file, or pipe it on stdin")
    try:
        return sys.stdin.read()
    except OSError as exc:
        raise DmError(f"cannot read the table from stdin: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise DmError("the table on stdin is not text") from None


def _serve(args: argparse.Namespace) -> int:
    from dmuser.daemon import Daemon, StartupError

    mountpoint = args.mountpoint or paths.default_mountpoint()
    sock = args.socket or paths.default_socket()
    try:
        client.check_socket_path(os.path.abspath(sock))
    except DmError as exc:
        print(f"dmuser: serve: {exc}", file=sys.stderr)
        return 2
    try:
        config = Config.build({f.name: getattr(args, f.name) for f in Config.fields()},
                              os.environ, root=os.geteuid() == 0)
    except ValueError as exc:
        print(f"dmuser: serve: {exc}", file=sys.stderr)
        return 2
    if not args.foreground:
        return _start_background(args, mountpoint, sock, config)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        Daemon(mountpoint, sock, config).run(args.ready_fd)
    except StartupError as exc:
        print(f"dmuser: serve: {exc}", file=sys.stderr)
        if args.ready_fd is not None:
            os.write(args.ready_fd, f"error: {exc}\n".encode())
        return 1
    return 0


def _start_background(args: argparse.Namespace, mountpoint: str, sock: str,
                      config: Config) -> int:
    """Start ``serve --foreground`` detached; return once it reports ready (or failed)."""
    log_file = args.log_file or os.path.splitext(sock)[0] + ".log"
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "dmuser", "serve", "--foreground", "--mountpoint", mountpoint,
           "--socket", sock, "--ready-fd", str(write_fd)] + (["--debug"] if args.debug else [])
    for f in Config.fields():  # the resolved configuration, whatever the child's environment
        cmd += ["--" + f.name.replace("_", "-"), str(getattr(config, f.name))]
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    with open(log_file, "ab") as log_fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=log_fh,
                                pass_fds=(write_fd,), start_new_session=True)
    os.close(write_fd)
    with os.fdopen(read_fd) as ready:
        status = ready.readline().strip()
    if status == "ready":
        print(f"dmuser: daemon {proc.pid} serving {mountpoint} (socket {sock}, log {log_file})")
        return 0
    proc.wait()
    msg = status.removeprefix("error: ") or f"daemon exited with status {proc.returncode}"
    print(f"dmuser: serve: {msg} (see {log_file})", file=sys.stderr)
    return 1


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields of a verb sent as it is (``Client.call``): those of the
    command line's options that the protocol knows."""
    return {key: getattr(args, key) for key in ("name", "force", "inactive", "uuid", "sector",
                                                "message", "noflush")
            if getattr(args, key, None) is not None}


def _watch(c: Client, args: argparse.Namespace) -> int:
    from dmuser.watch import watch

    def fetch() -> dict[str, Any]:
        data: dict[str, Any] = c.call("status", **_fields(args)).data or {}
        return data

    return watch(fetch, max(args.interval, 0.05), args.until_complete)


def _run(c: Client, args: argparse.Namespace) -> int:
    """One verb through the client; its output on stdout.  Errors propagate."""
    verb = args.verb
    if verb == "create":
        c.create(args.name, _read_table(args), uuid=args.uuid, read_only=args.readonly)
    elif verb == "reload":
        c.reload(args.name, _read_table(args) or "", read_only=args.readonly)
    elif verb == "remove":
        c.remove(args.name, force=args.force, deferred=args.deferred)
    elif verb == "suspend":
        c.suspend(args.name, noflush=args.noflush, nolockfs=args.nolockfs)
    elif verb == "resume":
        c.resume(args.name, nolockfs=args.nolockfs)
    elif verb == "clear":
        c.clear(args.name)
    elif verb == "shutdown":
        c.shutdown()
    elif verb == "message":
        answer = c.message(args.name, args.sector, args.message)
        sys.stdout.write(answer + "\n" if answer else "")
    elif verb == "wait":
        try:
            c.wait(args.name, args.event_nr, timeout=args.timeout)
        except KeyboardInterrupt:
            return 130
    elif verb == "export":
        reply = c.call("export", name=args.name, address=args.address, cwd=os.getcwd(),
                       read_only=args.read_only, insecure=args.insecure,
                       export_name=args.export_name, tls_cert=args.tls_cert,
                       tls_key=args.tls_key, tls_ca=args.tls_ca, allow=args.allow)
        sys.stdout.write(reply.output)
    elif verb == "unexport":
        c.call("unexport", name=args.name, address=args.address)
    elif getattr(args, "watch", False):
        return _watch(c, args)
    else:  # ls, table, status, info, targets: the daemon's dmsetup-format text
        reply = c.call(verb, **_fields(args))
        if getattr(args, "json", False):
            print(json.dumps(reply.data, indent=2))
        else:
            sys.stdout.write(reply.output)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cow"]:  # its own parser, so that 'dmuser cow --help' reaches it
        from dmuser import cow_tool

        return cow_tool.main(argv[1:])
    if argv[:1] == ["dmsetup"]:  # dmsetup's own syntax, parsed there (dmuser/dmsetup/)
        from dmuser import dmsetup

        return dmsetup.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "table", None) is not None and getattr(args, "table_file", None) is not None:
        parser.error("give either --table or a table file, not both")
    if getattr(args, "notable", False) and (args.table is not None or args.table_file is not None):
        parser.error("--notable takes no table")
    if args.verb == "serve":
        return _serve(args)
    if args.verb == "demo":
        from dmuser import demo

        return demo.main(no_loop=args.no_loop)
    where = " ".join(filter(None, [args.verb, getattr(args, "name", None)]))
    try:
        return _run(Client(args.socket), args)
    except DmError as exc:
        print(f"dmuser: {where}: {exc}", file=sys.stderr)
        return 1
