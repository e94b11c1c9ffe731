"""Run the real kernel's device-mapper on image files: a thin wrapper of ``kvm-dm``.

``kvm-dm GUEST_SCRIPT IMAGE...`` (``$DMUSER_KVM_DM``, else
``<repo>/../shared/tools/kvm-dm``: CI clones the repository with ``shared/``
beside it) boots a Debian kernel in QEMU with
the images as ``/dev/vda``, ``/dev/vdb``... and runs the script as root
inside; the script's output is the tool's stdout, its exit status the tool's
(125: the VM failed before reporting one).  The first run builds a kernel +
initramfs cache (``~/.cache/kvm-dm``), which can take minutes.

:func:`run` returns a :class:`KvmResult`, or raises :class:`KvmUnavailable`
when the tool cannot run here at all (missing, the cache cannot be built, the
VM never reported): the caller decides whether that is a skip or a failure.
A failure of the guest script itself is *not* "unavailable": guest scripts
written for :func:`run` end with ``exit 0`` and report through markers.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: ``$DMUSER_KVM_DM`` when set, else where CI (and the development checkout) keeps the
#: tool: ``shared/tools/kvm-dm`` beside the repository
TOOL_FROM_ENV = bool(os.environ.get("DMUSER_KVM_DM"))
TOOL = Path(os.environ.get("DMUSER_KVM_DM") or REPO.parent / "shared" / "tools" / "kvm-dm")

#: the VM is killed after this long (the tool's own watchdog)
VM_TIMEOUT = int(os.environ.get("DMUSER_KVM_VM_TIMEOUT", "300"))
#: the whole call (which may include building the cache) is abandoned after this long
CALL_TIMEOUT = int(os.environ.get("DMUSER_KVM_CALL_TIMEOUT", "1500"))

#: the helper functions every guest script gets (GNU dd is /usr/bin/gdd in the guest)
GUEST_PRELUDE = r"""
set +e
hashdev() {  # sha256 of a whole device, read with O_DIRECT
  for d in "$@"; do
    h=$(gdd if="$d" bs=1M iflag=direct status=none | sha256sum | cut -d' ' -f1)
    echo "SHA $d $h"
  done
}
insync() {  # the in-sync counter of mirror $1 as "done/total"
  dmsetup status "$1" | tr ' ' '\n' | grep / | head -n1
}
"""


class KvmUnavailable(Exception):
    """kvm-dm cannot run here; the message says why."""


@dataclass
class KvmResult:
    rc: int
    stdout: str
    stderr: str
    seconds: float

    def markers(self, name: str) -> list[str]:
        """The rest of each stdout line that starts with ``name`` + a space."""
        return [line[len(name) + 1:] for line in self.stdout.splitlines()
                if line.startswith(name + " ")]

    def marker(self, name: str) -> str:
        found = self.markers(name)
        assert len(found) == 1, f"expected one {name} line in the guest output:\n{self.stdout}"
        return found[0]

    @property
    def timing(self) -> str:
        """The tool's timing line (boot, script, wall; accelerator)."""
        m = re.search(r"^kvm-dm: kernel .*$", self.stderr, re.M)
        return m[0] if m else f"wall {self.seconds:.1f}s"


def tool() -> Path:
    """The kvm-dm executable, or KvmUnavailable."""
    if not TOOL.is_file():
        hint = "set by $DMUSER_KVM_DM" if TOOL_FROM_ENV else \
            "shared/tools/kvm-dm beside the repository; $DMUSER_KVM_DM is not set"
        raise KvmUnavailable(f"kvm-dm not found at {TOOL} ({hint})")
    if not os.access(TOOL, os.X_OK):
        raise KvmUnavailable(f"{TOOL} is not executable")
    return TOOL


def run(script: str, images: Sequence[str | os.PathLike[str]],
        files: dict[str, bytes] | None = None) -> KvmResult:
    """Boot, run ``script`` (``GUEST_PRELUDE`` prepended) on ``images``; the result.

    ``files`` are copied into the guest as ``/files/<name>``.
    Raises KvmUnavailable if the VM could not run (cache build failed, no
    QEMU, no exit status from the guest, timeout)."""
    exe = tool()
    if shutil.which("bash") is None:
        raise KvmUnavailable("bash not found (kvm-dm is a bash script)")
    with tempfile.TemporaryDirectory(prefix="dmuser-kvm-") as tmp:
        script_path = Path(tmp) / "guest.sh"
        script_path.write_text(GUEST_PRELUDE + script)
        env = dict(os.environ, KVM_DM_TIMEOUT=str(VM_TIMEOUT))
        if files:
            fdir = Path(tmp) / "files"
            fdir.mkdir()
            for name, data in files.items():
                (fdir / name).write_bytes(data)
            env["KVM_DM_FILES"] = str(fdir)
        t0 = time.monotonic()
        try:
            res = subprocess.run([str(exe), str(script_path), *map(str, images)],
                                 capture_output=True, text=True, timeout=CALL_TIMEOUT,
                                 env=env, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise KvmUnavailable(f"kvm-dm did not finish within {CALL_TIMEOUT} s") from exc
        except OSError as exc:
            raise KvmUnavailable(f"cannot run {exe}: {exc}") from exc
        result = KvmResult(res.returncode, res.stdout, res.stderr, time.monotonic() - t0)
    if res.returncode in (2, 125):
        tail = " | ".join(res.stderr.strip().splitlines()[-8:])
        raise KvmUnavailable(f"kvm-dm exited {res.returncode} (the VM did not run the "
                             f"script): {tail}")
    return result
