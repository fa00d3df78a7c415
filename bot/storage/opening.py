"""Opening the database: folders made, schema migrated, a lock held by another process waited out with
backoff, and a message the operator can act on (never a raw sqlite3 traceback) when it cannot be opened."""

from __future__ import annotations

import logging
import sqlite3
import time
from pathlib import Path

from .database import connect
from .images import IMAGES_DIRNAME, remove_stale_temp_files
from .migrations import MigrationError, apply_migrations, schema_version

log = logging.getLogger("bot.storage")

DB_FILENAME = "mgie.sqlite3"
OPEN_LOCK_WAIT_S = 60.0  # how long open() keeps retrying a database another process holds locked
_OPEN_BUSY_TIMEOUT_S = 0.5  # per attempt while opening; retried with backoff up to the lock wait


class DatabaseUnavailableError(RuntimeError):
    """The database cannot be opened (corrupt, locked too long, no permission); the message says what to do."""


def _is_locked(err: sqlite3.Error) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: another connection holds a lock we need; worth waiting for."""
    code = getattr(err, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(err) or "busy" in str(err)


def _unavailable(path: Path, err: BaseException) -> DatabaseUnavailableError:
    """The operator's message for a database that cannot be opened for a reason waiting will not fix."""
    code = getattr(err, "sqlite_errorcode", None)
    damaged = code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    if damaged or "malformed" in str(err) or "not a database" in str(err):
        return DatabaseUnavailableError(
            f"{path} is damaged ({err}). Restore it from a backup, or move it aside to start with an empty "
            "database (the jobs, chains and server settings in it are then lost).")
    return DatabaseUnavailableError(f"Cannot open the database {path} ({err}); check MGIE_DATA_DIR and the "
                                    "permissions of that folder and file.")


def _migrate_once(path: Path) -> int:
    conn = connect(path, busy_timeout=_OPEN_BUSY_TIMEOUT_S)
    try:
        apply_migrations(conn)
        return schema_version(conn)
    finally:
        conn.close()


def prepare_data_dir(data_dir: Path, lock_wait: float = OPEN_LOCK_WAIT_S) -> int:
    """Create ``data_dir/images``, migrate ``data_dir/mgie.sqlite3`` and return its schema version.

    Blocking (run it in a thread). While another process holds the database locked, retries with backoff
    for up to ``lock_wait`` seconds; raises :class:`DatabaseUnavailableError` when the file is damaged,
    stays locked or cannot be opened at all. A broken migration file or a schema too new raise as they are.
    """
    images_dir = data_dir / IMAGES_DIRNAME
    path = data_dir / DB_FILENAME
    try:
        images_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatabaseUnavailableError(f"Cannot create the data folder {images_dir} ({err.strerror}); set "
                                       "MGIE_DATA_DIR to a folder this user may write to.") from err
    deadline = time.monotonic() + lock_wait
    delay = 0.25
    while True:
        try:
            version = _migrate_once(path)
            break
        except (sqlite3.Error, MigrationError) as err:
            cause = err if isinstance(err, sqlite3.Error) else err.__cause__
            if not isinstance(cause, sqlite3.Error):  # a broken migration file, a schema too new: as is
                raise
            left = deadline - time.monotonic()
            if not _is_locked(cause):
                raise _unavailable(path, cause) from err
            if left <= 0:
                raise DatabaseUnavailableError(
                    f"{path} is locked by another process (another mgie-bot on the same MGIE_DATA_DIR?) and "
                    f"stayed locked for {lock_wait:.0f} s. Stop that process, or point MGIE_DATA_DIR at "
                    "another folder.") from err
            log.warning("%s is locked by another process; retrying in %.1f s", path, min(delay, left))
            time.sleep(min(delay, left))
            delay = min(delay * 2, 8.0)
    remove_stale_temp_files(images_dir, time.time())
    return version


__all__ = ["DB_FILENAME", "OPEN_LOCK_WAIT_S", "DatabaseUnavailableError", "prepare_data_dir"]
