"""Example suite: SQLite survives a power cut at every flush of a transaction workload.

The database lives on ext4 on a recorded (``log-writes``) device.  The device is
then rebuilt as it was at each flush, FUA and mark -- every state a power cut could
leave -- and each must mount, pass ``PRAGMA integrity_check``, hold every commit
made before it, and fsck clean.  ext4 is the kernel's as root, fuse2fs without.
"""

import sqlite3

from dmuser.pytest_plugin import fsck, mkfs

TRANSACTIONS = 12


def workload(db, rec):
    """The application: one row per transaction; a mark once each commit returned."""
    con = sqlite3.connect(db, isolation_level=None)
    # WAL + FULL: a commit is durable when it returns.  (The default rollback journal
    # is not: its deletion -- the commit -- is never synced; this test catches that.)
    con.executescript("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB)")
    for i in range(TRANSACTIONS):
        with con:
            con.execute("BEGIN")
            con.execute("INSERT INTO t VALUES (?, ?)", (i, bytes([i]) * 3000))
        rec.mark(f"committed {i + 1}")  # from here on, rows 0..i must survive
    con.close()


def check(dmuser_devices, point, committed):
    with dmuser_devices.mounted(point.image) as root:
        con = sqlite3.connect(root / "app.db")  # opening it recovers the WAL
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        has_t = con.execute("SELECT 1 FROM sqlite_master WHERE name = 't'").fetchone()
        rows = [i for (i,) in con.execute("SELECT id FROM t")] if has_t else []
        con.close()
    assert rows[:committed] == list(range(committed)), "a committed transaction is lost"
    fsck(point.image)


def test_sqlite_survives_a_power_cut_at_every_flush(dmuser_devices):
    rec = dmuser_devices.recording(32 << 20)
    mkfs(rec.path)
    rec.mark("mkfs done")
    with dmuser_devices.mounted(rec.device) as root:
        workload(root / "app.db", rec)
    checked, committed, failures = 0, 0, []
    for point in rec.crash_points(since="mkfs done"):
        if point.mark and point.mark.startswith("committed "):
            committed = int(point.mark.split()[1])
        checked += 1
        try:
            check(dmuser_devices, point, committed)
        except (AssertionError, OSError, sqlite3.Error) as exc:
            failures.append(f"{point}: {exc}")
    print(f"\nSQLite: {checked} crash points checked, {checked - len(failures)} passed")
    assert not failures and checked > TRANSACTIONS and committed == TRANSACTIONS, failures
