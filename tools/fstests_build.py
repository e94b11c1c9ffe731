"""The one place that builds fstests from the pinned tarball (stdlib only).

``tools/fstests`` runs the suite from :func:`build_tree`; the log-writes tests
take fstests' ``replay-log`` from :func:`replay_log`.  The tarball is
``$DMUSER_FSTESTS_TARBALL`` or ``<repo>/../shared/third_party/fstests-*.tar.xz``;
builds are cached under ``$DMUSER_FSTESTS_CACHE`` (default
``/var/tmp/dmuser-fstests``), one directory per tarball, and made again only
when missing.

Guarantees: a build is made in a private temporary directory and renamed into
place only once it succeeded, so a cached tree is always complete (an
interrupted build leaves only a ``*.tmp-PID`` directory, removed by the next
build); concurrent builders (two pytest runs, the tool and a test) serialise on
an ``flock`` of ``<cache>/<name>.lock`` and the second one reuses the first
one's result.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TARBALL = REPO.parent / "shared" / "third_party" / "fstests-63a29724.tar.xz"
DEFAULT_CACHE = Path("/var/tmp/dmuser-fstests")
#: Debian 12 packages a full build needs (scripts/setup installs them)
BUILD_COMMANDS = ("make", "gcc", "autoconf", "automake", "libtoolize")


class BuildError(Exception):
    """The tarball or a build tool is missing, or the build failed (one-line reason)."""


def tarball() -> Path:
    return Path(os.environ.get("DMUSER_FSTESTS_TARBALL", DEFAULT_TARBALL))


def cache_dir() -> Path:
    return Path(os.environ.get("DMUSER_FSTESTS_CACHE", DEFAULT_CACHE))


def _name(tar: Path) -> str:
    return tar.name.removesuffix(".xz").removesuffix(".tar")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _extract(tar: Path, dest: Path, prefix: str = "") -> Path:
    """Extract the tarball's ``fstests/`` (only members under ``fstests/PREFIX``) to ``dest``."""
    with tarfile.open(tar) as t:
        members = [m for m in t.getmembers() if m.name.startswith("fstests/" + prefix)]
        if not members:
            raise BuildError(f"{tar}: no fstests/{prefix} in the tarball")
        t.extractall(dest, members=members, filter="data")
    return dest / "fstests"


def _check_tarball(tar: Path) -> None:
    if not tar.is_file():
        raise BuildError(f"no fstests tarball at {tar} (set DMUSER_FSTESTS_TARBALL)")


def build_tree(tar: Path | None = None, cache: Path | None = None, jobs: int | None = None,
               log: Path | None = None) -> Path:
    """The built fstests tree for ``tar`` (``./check`` in it runs the suite).

    Builds it (``make -jN``, about a minute on 2 cores) unless the cache has it.
    The build's output goes to ``log`` (default ``<cache>/<name>.build.log``)."""
    tar = tar or tarball()
    cache = cache or cache_dir()
    name = _name(tar)
    tree = cache / name
    if (tree / "ltp" / "fsstress").is_file():
        return tree
    _check_tarball(tar)
    missing = [c for c in BUILD_COMMANDS if shutil.which(c) is None]
    if missing:
        raise BuildError(f"cannot build fstests: missing {', '.join(missing)} "
                         "(scripts/setup installs them)")
    log = log or cache / f"{name}.build.log"
    with _locked(cache / f"{name}.lock"):
        if (tree / "ltp" / "fsstress").is_file():
            return tree
        for old in cache.glob(f"{name}.tmp-*"):
            shutil.rmtree(old, ignore_errors=True)
        tmp = cache / f"{name}.tmp-{os.getpid()}"
        try:
            src = _extract(tar, tmp)
            with open(log, "w") as out:
                res = subprocess.run(["make", f"-j{jobs or os.cpu_count() or 1}"], cwd=src,
                                     stdout=out, stderr=subprocess.STDOUT, timeout=1800)
            if res.returncode != 0 or not (src / "ltp" / "fsstress").is_file():
                raise BuildError(f"fstests build failed (exit {res.returncode}); see {log}")
            if tree.exists():
                shutil.rmtree(tree)
            src.rename(tree)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tree


def replay_log(tar: Path | None = None, cache: Path | None = None) -> Path:
    """fstests' ``src/log-writes/replay-log``: from the built tree if there is one,
    else compiled on its own with gcc (about a second) into the cache."""
    tar = tar or tarball()
    cache = cache or cache_dir()
    name = _name(tar)
    built = cache / name / "src" / "log-writes" / "replay-log"
    if built.is_file():
        return built
    out = cache / f"{name}.replay-log"
    if out.is_file():
        return out
    _check_tarball(tar)
    if shutil.which("gcc") is None:
        raise BuildError("cannot build replay-log: gcc is missing")
    with _locked(cache / f"{name}.lock"):
        if out.is_file():
            return out
        tmp = cache / f"{name}.tmp-{os.getpid()}"
        try:
            src = _extract(tar, tmp, "src/log-writes/") / "src" / "log-writes"
            res = subprocess.run(["gcc", "-O2", "-o", str(tmp / "replay-log"),
                                  str(src / "replay-log.c"), str(src / "log-writes.c")],
                                 capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise BuildError(f"replay-log build failed: {res.stderr.strip()[-500:]}")
            (tmp / "replay-log").rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
