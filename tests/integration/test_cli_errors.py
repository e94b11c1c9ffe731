"""Bad input through the CLI: a clear message, exit 1 (2 for usage), nothing broken.

One daemon serves the whole module, with a "witness" device created first.
After every test an autouse check proves the daemon still works: the device
list is exactly what the test expects (a failed create leaves nothing behind),
the witness has its table, is not suspended and takes a fresh pattern.
"""

from __future__ import annotations

import errno
import json
import os
import pty
import socket
import subprocess
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from support.daemon import DaemonFactory, dmuser_cmd, run_dmuser
from support.data import check_pattern_io, make_image, pattern, read_at, write_at

pytestmark = [pytest.mark.fuse]

WITNESS_TABLE = "0 2048 linear img 0"
IMG_SECTORS = 8192          # 4 MiB
SMALL_SECTORS = 128         # 64 KiB


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    factory = DaemonFactory(tmp_path_factory.mktemp("cli"))
    try:
        d = factory()
        make_image(d.dir / "img", IMG_SECTORS * 512)
        make_image(d.dir / "small.img", SMALL_SECTORS * 512)
        (d.dir / "adir").mkdir()
        os.mkfifo(d.dir / "fifo")
        d.create("witness", WITNESS_TABLE)
        yield SimpleNamespace(d=d, expected={"witness"})
    finally:
        problems = factory.stop_all()
    assert not problems, problems


@pytest.fixture(autouse=True)
def still_works(env: SimpleNamespace) -> Iterator[SimpleNamespace]:
    """After each test: the daemon answers and the witness device does I/O."""
    yield env
    d = env.d
    assert d.alive(), d.log_tail()
    infos = {i["name"]: i for i in d.request("info")}
    assert set(infos) == env.expected
    info = infos["witness"]
    assert info["live"] and not info["inactive"] and not info["suspended"], info
    assert d.table_lines("witness") == [f"0 2048 linear {d.dir / 'img'} 0"]
    check_pattern_io(d.path("witness"), "witness", offset=512 * 100, nbytes=16384)


def lines(*texts: str) -> list[str]:
    """Table lines without trailing blanks (a target with no parameters ends in one)."""
    return [line.rstrip() for text in texts for line in text.splitlines()]


def fails(env: SimpleNamespace, *args: str, input: str | None = None, rc: int = 1,
          must: tuple[str, ...] = ()) -> str:
    """Run a CLI verb that must fail with ``rc``; return stderr, checked for ``must``."""
    res = env.d.cli(*args, input=input, check=False)
    assert res.returncode == rc, f"{args}: rc {res.returncode}\n{res.stdout}{res.stderr}"
    assert res.stdout == "", res.stdout
    err = res.stderr.strip()
    assert err, f"{args}: no message"
    if rc == 1:
        assert err.startswith(f"dmuser: {args[0]}"), err
        assert "Traceback" not in err
        assert len(err.splitlines()) == 1, err
    for word in must:
        assert word in err, f"{args}: {word!r} not in {err!r}"
    return err


# -- tables that cannot be loaded -------------------------------------------------------

BAD_TABLES = [
    ("unknown-target", "0 100 nosuch", ("nosuch", "unknown target type")),
    ("bad-length", "0 1x zero", ("invalid length", "'1x'")),
    ("bad-start", "abc 100 zero", ("invalid start sector", "'abc'")),
    ("negative-start", "-1 100 zero", ("invalid start sector", "'-1'")),
    ("length-overflow", "0 99999999999999999999999 zero", ("invalid length",)),
    ("bad-offset", "0 100 linear img 1x", ("linear", "Invalid device sector")),
    ("missing-arg", "0 100 linear img", ("linear", "Invalid argument count")),
    ("extra-arg", "0 100 linear img 0 7", ("linear", "Invalid argument count")),
    ("too-few-words", "0 100", ("line 1", "invalid format")),
    ("zero-length", "0 0 zero", ("zero-length",)),
    ("empty", "", ("empty table",)),
    ("comments-only", "# nothing\n\n", ("empty table",)),
    ("gap", "0 100 zero;200 100 zero", ("Gap in table", "200", "100")),
    ("overlap", "0 100 zero;50 100 zero", ("Gap in table", "50", "100")),
    ("not-at-zero", "10 100 zero", ("Gap in table", "10")),
    ("too-small", f"0 {SMALL_SECTORS + 1} linear small.img 0", ("small.img", "too small")),
    ("offset-past-end", f"0 10 linear small.img {SMALL_SECTORS - 5}", ("small.img", "too small")),
    ("missing-backing", "0 10 linear nothere.img 0", ("nothere.img", "no such file")),
    ("backing-is-dir", "0 10 linear adir 0", ("adir", "Is a directory")),
    ("backing-is-fifo", "0 10 linear fifo 0", ("fifo", "not a regular file or block device")),
    ("bad-maj-min", "0 10 linear 4095:1048575 0", ("4095:1048575",)),
    ("no-such-mapped", "0 10 linear mnt/ghost 0", ("ghost", "does not exist")),
    ("second-line-bad", "0 100 zero\n100 100 linear nothere.img 0", ("nothere.img",)),
]


@pytest.mark.parametrize("text,must", [(t, m) for _, t, m in BAD_TABLES],
                         ids=[i for i, _, _ in BAD_TABLES])
def test_bad_table_on_create(env, text, must) -> None:
    fails(env, "create", "bad", "--table", text, must=must)


@pytest.mark.parametrize("text,must", [(t, m) for _, t, m in BAD_TABLES[::3]],
                         ids=[i for i, _, _ in BAD_TABLES[::3]])
def test_bad_table_on_reload_leaves_live_table(env, text, must) -> None:
    fails(env, "reload", "witness", "--table", text, must=must)
    # the resume that would follow has nothing to swap in
    env.d.request("resume", name="witness")


def test_bad_table_file_path(env) -> None:
    fails(env, "create", "bad", "/nonexistent/dir/t.table",
          must=("cannot read table file", "/nonexistent/dir/t.table", "No such file"))
    fails(env, "reload", "witness", str(env.d.dir / "adir"),
          must=("cannot read table file", "adir"))


def test_table_and_table_file_both_given(env, tmp_path) -> None:
    f = tmp_path / "t.table"
    f.write_text("0 100 zero\n")
    res = env.d.cli("create", "bad", str(f), "--table", "0 100 zero", check=False)
    assert res.returncode in (1, 2)
    assert "either --table or a table file" in res.stderr


def test_table_cannot_use_its_own_device(env) -> None:
    fails(env, "reload", "witness", "--table", "0 100 linear witness 0",
          must=("cannot use its own device",))
    fails(env, "reload", "witness", "--table", f"0 100 linear {env.d.path('witness')} 0",
          must=("cannot use its own device",))


# -- names ------------------------------------------------------------------------------


def test_duplicate_create(env) -> None:
    fails(env, "create", "witness", "--table", "0 100 zero", must=("witness", "already exists"))


@pytest.mark.parametrize("name", ["a/b", ".", "..", "x" * 200, "tab\there"])
def test_invalid_name(env, name) -> None:
    fails(env, "create", name, "--table", "0 100 zero", must=("invalid device name",))


@pytest.mark.parametrize("verb", ["remove", "reload", "suspend", "resume", "clear", "info",
                                  "table", "status"])
def test_verb_on_nonexistent_device(env, verb) -> None:
    extra = ("--table", "0 8 zero") if verb == "reload" else ()
    fails(env, verb, "ghost", *extra, must=("ghost", "does not exist"))


# -- removal ----------------------------------------------------------------------------


def test_remove_open_device_needs_force(env) -> None:
    d = env.d
    d.create("victim", "0 1024 linear img 4096")
    env.expected.add("victim")
    data = pattern("victim", 4096)
    write_at(d.path("victim"), 0, data)
    fd = os.open(d.path("victim"), os.O_RDWR)
    try:
        fails(env, "remove", "victim", must=("victim", "busy", "open count 1", "--force"))
        assert os.pread(fd, 4096, 0) == data  # untouched by the refusal
        assert d.info("victim")["open_count"] == 1
        d.cli("remove", "victim", "--force")
        env.expected.discard("victim")
        assert "victim" not in os.listdir(d.mnt)
        for op in (lambda: os.pread(fd, 4096, 0), lambda: os.pwrite(fd, data, 0),
                   lambda: os.fsync(fd)):
            with pytest.raises(OSError) as exc:  # its I/O now fails
                op()
            assert exc.value.errno == errno.ENXIO
        os.close(fd)  # closing it does not
        fd = -1
    finally:
        if fd >= 0:
            os.close(fd)
    assert read_at(d.dir / "img", 4096 * 512, 4096) == data  # data stays in the backing file


def test_remove_device_another_stacks_on(env) -> None:
    d = env.d
    d.create("lower", "0 1024 linear img 2048")
    env.expected.add("lower")
    d.create("upper", "0 512 linear lower 512")
    env.expected.add("upper")
    fails(env, "remove", "lower", must=("lower", "in use by another mapped device"))
    fails(env, "remove", "lower", "--force", must=("lower", "in use by another mapped device"))
    check_pattern_io(d.path("upper"), "upper")
    d.cli("remove", "upper")
    env.expected.discard("upper")
    d.cli("remove", "lower")
    env.expected.discard("lower")


# -- messages ---------------------------------------------------------------------------


def test_message_errors(env) -> None:
    fails(env, "message", "witness", "0", "hello", must=("does not support messages",))
    fails(env, "message", "witness", "2048", "hello", must=("sector outside device",))
    fails(env, "message", "witness", "abc", "hello", must=("Invalid target message parameters",))
    fails(env, "message", "witness", "0", must=("Empty message",))
    fails(env, "message", "ghost", "0", "hello", must=("ghost", "does not exist"))


# -- usage errors (exit 2) ------------------------------------------------------------


@pytest.mark.parametrize("args", [[], ["bogus"], ["create"], ["remove"], ["message", "witness"],
                                  ["ls", "--bogus"], ["remove", "a", "b"], ["info", "--json", "x",
                                                                            "y"]],
                         ids=lambda a: " ".join(a) or "no-verb")
def test_usage_errors(env, args) -> None:
    res = subprocess.run(dmuser_cmd(*args, "--socket", str(env.d.sock)), capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode == 2, res
    assert "usage: dmuser" in res.stderr and "error:" in res.stderr


# -- no daemon ------------------------------------------------------------------------


def test_no_daemon_running(env, tmp_path) -> None:
    missing = tmp_path / "none.sock"
    res = run_dmuser("ls", "--socket", str(missing), check=False)
    assert res.returncode == 1
    assert "no dmuser daemon is listening" in res.stderr and str(missing) in res.stderr
    # A socket file nobody listens on (a dead daemon's) says the same.
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(dead))
    s.close()
    for args in (["info"], ["create", "x", "--table", "0 8 zero"], ["shutdown"]):
        res = run_dmuser(*args, "--socket", str(dead), check=False)
        assert res.returncode == 1, (args, res)
        assert "no dmuser daemon is listening" in res.stderr, res.stderr
    # $DMUSER_SOCKET is honoured
    res = subprocess.run(dmuser_cmd("ls"), capture_output=True, text=True, timeout=30,
                         env={**os.environ, "DMUSER_SOCKET": str(env.d.sock)})
    assert res.returncode == 0 and "witness" in res.stdout


# -- table sources --------------------------------------------------------------------


def test_table_from_stdin(env) -> None:
    d = env.d
    for src in ([], ["-"]):
        d.cli("create", "piped", *src, input="0 512 linear img 6144\n512 512 zero\n")
        env.expected.add("piped")
        assert lines(d.cli("table", "piped").stdout) == [f"0 512 linear {d.dir / 'img'} 6144",
                                                         "512 512 zero"]
        check_pattern_io(d.path("piped"), "piped", nbytes=512 * 512)
        d.cli("remove", "piped")
        env.expected.discard("piped")


def test_no_table_on_a_terminal(env) -> None:
    primary, secondary = pty.openpty()
    try:
        res = subprocess.run(dmuser_cmd("create", "tty", "--socket", str(env.d.sock)),
                             stdin=secondary, capture_output=True, text=True, timeout=30)
    finally:
        os.close(primary)
        os.close(secondary)
    assert res.returncode == 1
    assert "no table given" in res.stderr


def test_multiline_table_from_file(env, tmp_path) -> None:
    d = env.d
    f = tmp_path / "multi.table"
    f.write_text("# a comment, then a blank line\n\n"
                 "0 100 linear img 7000\n"
                 "  100 28 zero  \n"
                 "128 100 linear small.img 0\n")
    d.cli("create", "multi", str(f))
    env.expected.add("multi")
    assert lines(d.cli("table", "multi").stdout) == [f"0 100 linear {d.dir / 'img'} 7000",
                                                     "100 28 zero",
                                                     f"128 100 linear {d.dir / 'small.img'} 0"]
    assert d.info("multi")["nr_sectors"] == 228
    assert os.stat(d.path("multi")).st_size == 228 * 512
    data = pattern("multi", 100 * 512)
    write_at(d.path("multi"), 128 * 512, data)
    assert read_at(d.dir / "small.img", 0, len(data)) == data
    assert read_at(d.path("multi"), 100 * 512, 28 * 512) == bytes(28 * 512)
    d.cli("remove", "multi")
    env.expected.discard("multi")


def test_semicolon_separated_table(env) -> None:
    d = env.d
    d.cli("create", "semi", "--table", "0 8 zero; 8 8 error ;16 8 zero")
    env.expected.add("semi")
    assert d.info("semi")["nr_targets"] == 3
    assert read_at(d.path("semi"), 0, 4096) == bytes(4096)
    fd = os.open(d.path("semi"), os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            os.pread(fd, 512, 8 * 512)  # the error target
    finally:
        os.close(fd)
    d.cli("remove", "semi")
    env.expected.discard("semi")


# -- --json ---------------------------------------------------------------------------


def test_json_outputs(env) -> None:
    d = env.d
    d.cli("create", "j", "--table", "0 64 zero;64 64 linear img 100")
    env.expected.add("j")
    d.cli("reload", "j", "--table", "0 256 zero")
    try:
        ls = d.json("ls")
        assert {"name": "j", "path": str(d.path("j"))} in ls
        info = d.json("info")
        assert {i["name"] for i in info} == env.expected
        (j,) = d.json("info", "j")
        assert j["live"] and j["inactive"] and j["nr_targets"] == 2 and j["nr_sectors"] == 128
        assert j["path"] == str(d.path("j"))
        assert d.json("table", "j").keys() == {"j"}
        assert lines(*d.json("table", "j")["j"]) == ["0 64 zero",
                                                     f"64 64 linear {d.dir / 'img'} 100"]
        assert lines(*d.json("table", "j", "--inactive")["j"]) == ["0 256 zero"]
        assert set(d.json("table")) == env.expected
        assert set(d.json("status")) == env.expected
        status = d.json("status", "j")
        assert isinstance(status, dict) and len(status["j"]) == 2
        targets = d.json("targets")
        assert {"linear", "zero", "error"} <= set(targets)
        assert all(isinstance(v, list) and len(v) == 3 for v in targets.values())
        # the plain outputs of the same verbs
        assert "j\t(" in d.cli("ls").stdout
        assert "Tables present:    LIVE & INACTIVE" in d.cli("info", "j").stdout
    finally:
        d.cli("remove", "j")
        env.expected.discard("j")
    for verb in ("ls", "info", "table", "status", "targets"):
        json.loads(d.cli(verb, "--json").stdout)
