"""``dmuser demo``: the main job, end to end on throw-away images.

Makes two sparse images under a temporary directory, starts a daemon on a
private mountpoint and socket, maps a two-segment ``linear`` device across the
images, runs ``mkfs.ext4`` on it, loop-mounts it (when root and loop devices are
available), writes files, checks the file system, prints ``ls``/``table``/
``status``/``info``, and tears everything down, whatever happens on the way.
Every dmuser command is echoed as the user would type it.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile

IMAGE_MIB = 64


def _run(cmd: list[str], check: bool = True, quiet: bool = False) -> str:
    shown = ["dmuser", *cmd[3:]] if cmd[1:3] == ["-m", "dmuser"] else cmd
    print("$ " + " ".join(shlex.quote(c) for c in shown), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if not quiet and proc.stdout:
        print(proc.stdout, end="" if proc.stdout.endswith("\n") else "\n", flush=True)
    if proc.returncode and check:
        sys.stdout.write(proc.stderr)
        raise SystemExit(f"demo: command failed with status {proc.returncode}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    work = tempfile.mkdtemp(prefix="dmuser-demo-")
    sock, mnt = os.path.join(work, "dmuser.sock"), os.path.join(work, "devices")
    dm = [sys.executable, "-m", "dmuser"]
    sockopt = ["--socket", sock]
    loop_dev = ""
    fs_dir = os.path.join(work, "fs")
    daemon_started = False
    print(f"dmuser demo in {work}\n")
    try:
        for name in ("a.img", "b.img"):
            with open(os.path.join(work, name), "wb") as f:
                f.truncate(IMAGE_MIB << 20)
        half = (IMAGE_MIB << 20) // 512 - 2048
        table = (f"0 {half} linear {work}/a.img 2048\n"
                 f"{half} {half} linear {work}/b.img 2048\n")
        _run(dm + ["serve", "--mountpoint", mnt] + sockopt)
        daemon_started = True
        table_file = os.path.join(work, "demo.table")
        with open(table_file, "w") as f:
            f.write(table)
        print(f"# two segments: the first half on a.img, the second on b.img\n{table}")
        _run(dm + ["create", "demo", table_file] + sockopt)
        dev = os.path.join(mnt, "demo")
        _run(["mkfs.ext4", "-q", "-F", "-L", "dmuser-demo", dev])
        if os.geteuid() == 0 and shutil.which("losetup"):
            loop_dev = _run(["losetup", "--find", "--show", dev]).strip()
            os.makedirs(fs_dir)
            _run(["mount", loop_dev, fs_dir])
            for i in range(20):
                with open(os.path.join(fs_dir, f"file{i:02d}.txt"), "w") as f:
                    f.write(f"file {i}\n" * 1000 * (i + 1))
            _run(["sync"])
            _run(["df", "-h", fs_dir])
            _run(["umount", fs_dir])
            _run(["losetup", "-d", loop_dev])
            loop_dev = ""
        else:
            print("# not root: skipping the loop mount (mkfs and fsck still run)")
        _run(["e2fsck", "-fn", dev])
        for verb in ("ls", "table", "status", "info"):
            _run(dm + [verb] + sockopt)
        _run(dm + ["remove", "demo"] + sockopt)
        print("demo: OK")
        return 0
    finally:
        if loop_dev:
            subprocess.run(["umount", fs_dir], capture_output=True)
            subprocess.run(["losetup", "-d", loop_dev], capture_output=True)
        if daemon_started:
            _run(dm + ["shutdown"] + sockopt, check=False)
            _wait_unmounted(mnt)
        shutil.rmtree(work, ignore_errors=True)


def _wait_unmounted(mnt: str, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while os.path.ismount(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.ismount(mnt):
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
