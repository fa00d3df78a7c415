"""The schema's migrations: ``bot/migrations/NNN_name.sql`` (plain SQL, no BEGIN/COMMIT), in numeric order.

They run synchronously on a plain ``sqlite3`` connection while the store opens (in a worker thread),
each file in its own transaction together with its ``schema_version`` row.
"""

from __future__ import annotations

import dataclasses
import re
import sqlite3
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

_MIGRATION_FILE = re.compile(r"(\d+)_([A-Za-z0-9_]+)\.sql")


class MigrationError(RuntimeError):
    """A migration file could not be applied (the database stays at the previous version)."""


class SchemaTooNewError(MigrationError):
    """The database was migrated by newer code; running older code on it could silently lose data."""


@dataclasses.dataclass(frozen=True)
class Migration:
    """One ``NNN_name.sql`` file."""

    version: int
    name: str
    sql: str


def load_migrations(directory: Path | Traversable | None = None) -> list[Migration]:
    """Read ``NNN_name.sql`` files in numeric order (the package's own unless ``directory`` is given).

    A misnamed ``.sql`` file or two files with one number are packaging bugs that would otherwise skip
    or reorder schema changes, so they raise instead of being ignored.
    """
    root = directory if directory is not None else resources.files("bot") / "migrations"
    found: dict[int, Migration] = {}
    for entry in root.iterdir():
        if not entry.name.endswith(".sql") or not entry.is_file():
            continue
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r} is not named NNN_name.sql")
        version = int(match.group(1))
        if version < 1:
            raise MigrationError(f"migration {entry.name!r}: versions start at 1")
        if version in found:
            raise MigrationError(f"migrations {found[version].name!r} and {entry.name!r} share version {version}")
        found[version] = Migration(version, entry.name, entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def schema_version(conn: sqlite3.Connection) -> int:
    """The highest applied migration, 0 for a fresh database."""
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    return int(row[0])


def apply_migrations(conn: sqlite3.Connection, directory: Path | Traversable | None = None) -> list[int]:
    """Bring the schema up to date and return the versions applied (empty when already current).

    ``conn`` must be in autocommit mode (``isolation_level=None``). Each file runs in its own
    ``BEGIN IMMEDIATE`` transaction with its ``schema_version`` row, so a failure leaves the database at
    the previous version rather than half-migrated. If another process applies the same file at the same
    time, the loser's transaction fails, it finds the version recorded and carries on.
    """
    migrations = load_migrations(directory)
    latest = migrations[-1].version if migrations else 0
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY NOT NULL, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    current = schema_version(conn)
    if current > latest:
        raise SchemaTooNewError(
            f"the database is at schema version {current}, but this code only knows migrations up to "
            f"{latest}; run a newer version of the bot (or restore a backup) instead of downgrading"
        )
    applied: list[int] = []
    for migration in migrations:
        if migration.version <= current:
            continue
        try:
            # executescript() commits any open transaction first, so BEGIN has to be part of the script.
            conn.executescript("BEGIN IMMEDIATE;\n" + migration.sql)
            if not conn.in_transaction:
                raise MigrationError(f"migration {migration.name} must not contain COMMIT or ROLLBACK")
            conn.execute(
                "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if not isinstance(exc, sqlite3.Error):
                raise
            current = schema_version(conn)
            if current >= migration.version:  # another process got there first
                continue
            raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
        applied.append(migration.version)
        current = migration.version
    return applied
