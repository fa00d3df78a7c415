"""Opening the database: a damaged file or one another process holds locked gets a message the operator can
act on (and a lock is waited out with backoff), never a raw sqlite3 traceback."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest

from bot.storage import DB_FILENAME, DatabaseUnavailableError, Store

# Holds an exclusive lock on the database for argv[2] seconds, like a second bot or an open sqlite3 shell.
_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA locking_mode=EXCLUSIVE")  # in WAL mode a plain write lock would not keep readers out
conn.execute("BEGIN EXCLUSIVE")
conn.execute("CREATE TABLE IF NOT EXISTS holder_was_here (x)")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def _hold_lock(path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("junk", [b"this is not an SQLite file " * 100, b"SQLite format 3\0" + b"\xff" * 4000])
async def test_a_damaged_database_is_named_with_the_way_out(tmp_path, junk):
    (tmp_path / DB_FILENAME).write_bytes(junk)
    with pytest.raises(DatabaseUnavailableError) as info:
        await Store.open(tmp_path)
    message = str(info.value)
    assert DB_FILENAME in message and "damaged" in message and "backup" in message and "\n" not in message


async def test_a_locked_database_is_waited_for_with_backoff(tmp_path, caplog):
    await (await Store.open(tmp_path)).close()
    holder = _hold_lock(tmp_path / DB_FILENAME, 2.0)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="bot.storage"):
            store = await Store.open(tmp_path, lock_wait=30)
        waited = time.monotonic() - started
        await store.close()
    finally:
        holder.wait(30)
    assert 1.0 < waited < 20
    retries = [r.getMessage() for r in caplog.records if "locked by another process" in r.getMessage()]
    assert len(retries) >= 2 and "retrying in 0.2 s" in retries[0] and "retrying in 0.5 s" in retries[1]


async def test_a_database_that_stays_locked_gets_a_clear_message(tmp_path):
    await (await Store.open(tmp_path)).close()
    holder = _hold_lock(tmp_path / DB_FILENAME, 30.0)
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError, match="locked by another process") as info:
            await Store.open(tmp_path, lock_wait=1.0)
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
    assert "MGIE_DATA_DIR" in str(info.value)


async def test_a_data_dir_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(DatabaseUnavailableError, match="MGIE_DATA_DIR"):
        await Store.open(tmp_path / "file" / "data")
