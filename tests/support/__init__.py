"""Test support, imported as ``support`` (``tests/conftest.py`` puts ``tests/`` on sys.path).

fakes    fake block devices, one family built on MemDevice
targets  the target types tests build tables with (TYPES, ProbeTarget), make_manager,
         DictResolver, remove_all_checked
daemon   the daemon rig: Daemon, DaemonFactory, run_dmuser
data     the one pattern(), image files, exact file reads and writes
system   mounts, loop devices, processes, the test-run registry and sweeps, mkfs/fsck, Io
oracles  independent readers of the on-disk formats (import nothing from dmuser)
vectors  the golden kernel vectors in tests/vectors and their loaders
fuzz     seeds and counts of the fuzz tier
volatile image files on a disk with a volatile write cache, at the syscall level
         (crash images of FileDevice-backed stacks)
"""
