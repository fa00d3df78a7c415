"""The bot's SQLite store: jobs, per-guild settings, block lists and the image files jobs point at.

discord.py runs everything on one event loop and ``sqlite3`` blocks, so every database call runs in a
worker thread (``asyncio.to_thread``) on a single connection serialised by a ``threading.Lock``: the
loop never waits on the disk and no two threads ever use the connection at once.

Durability: WAL journal with ``synchronous=NORMAL`` and one explicit transaction per write. A killed
process loses nothing that was committed, and even a power cut can at worst drop the last few commits;
it never leaves a half-written update or a corrupt file behind. Images are written to a temporary file,
fsynced and renamed into place, so a reader sees either the old file, the new one or none.

Schema changes live in ``bot/migrations/NNN_name.sql`` (plain SQL, no BEGIN/COMMIT), applied in numeric
order, each in its own transaction together with its ``schema_version`` row.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .moderation_text import fold_text

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

T = TypeVar("T")
log = logging.getLogger(__name__)

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
UNFINISHED_STATES = ("queued", "running")
DB_FILENAME = "mgie.sqlite3"
IMAGES_DIRNAME = "images"

_BUSY_TIMEOUT_S = 10.0  # another process (or a crashed one's successor) holding the write lock briefly
_OPEN_BUSY_TIMEOUT_S = 0.5  # per attempt while opening; open() retries with backoff up to its lock_wait
OPEN_LOCK_WAIT_S = 60.0  # how long open() keeps retrying a database another process holds locked
_MIGRATION_FILE = re.compile(r"(\d+)_([A-Za-z0-9_]+)\.sql")
_SAFE_NAME_PART = re.compile(r"[A-Za-z0-9_-]+")
_SAFE_EXT = re.compile(r"[A-Za-z0-9]+")
_TMP_PREFIX = ".tmp-"
_STALE_TMP_S = 3600.0  # leftovers of a crash mid-write; younger ones may belong to a live process


class MigrationError(RuntimeError):
    """A migration file could not be applied (the database stays at the previous version)."""


class SchemaTooNewError(MigrationError):
    """The database was migrated by newer code; running older code on it could silently lose data."""


class DatabaseUnavailableError(RuntimeError):
    """The database cannot be opened (corrupt, locked too long, no permission); the message says what to do."""


@dataclasses.dataclass
class JobRecord:
    """One edit request and everything needed to finish, resume or answer it after a restart."""

    id: str  # uuid4 hex; create_job fills it when empty
    user_id: int
    channel_id: int
    guild_id: int | None  # None in DMs
    instruction: str
    seed: int
    text_cfg: float
    image_cfg: float
    steps: int
    preset: str = "balanced"  # auto/preserve/balanced/dramatic/custom
    preset_reason: str = ""  # why auto picked these values, shown to the user
    kind: str = "edit"  # edit | reroll | stronger | closer | refine
    parent_id: str | None = None  # the job whose OUTPUT is this job's input (refine) or whose input it re-uses
    input_image: str = ""  # path relative to the data dir, e.g. "images/<id>-in.png"
    output_image: str | None = None
    expressive: str | None = None
    error: str | None = None
    state: str = "queued"
    created_at: float = 0.0  # time.time(); filled by create_job when 0
    started_at: float | None = None
    finished_at: float | None = None
    application_id: int | None = None
    interaction_token: str | None = None  # to post follow-ups; valid 15 minutes from token_created_at
    token_created_at: float | None = None
    status_message_id: int | None = None  # the message showing queue position / progress
    result_message_id: int | None = None  # the message holding the result image (for replies and buttons)
    reply_to_message_id: int | None = None  # for reply-refines: the user's message to reply to
    history_depth: int = 0  # how many earlier turns went into the prompt
    llm_cached: bool = False
    flagged: bool = False  # the safety check flagged the output


@dataclasses.dataclass
class GuildSettings:
    """Per-server limits set by its moderators; DMs (guild_id None) always get the defaults."""

    guild_id: int | None
    allowed_channel_ids: list[int]  # empty = every channel
    max_steps: int = 100
    user_pending_cap: int = 3
    refine_depth: int = 3
    blocked_words: list[str] = dataclasses.field(default_factory=list)  # folded with moderation_text.fold_text; [] = none
    flagged_outputs: str = "spoiler"  # flagged results outside age-restricted channels: spoiler | withhold


_JOB_COLUMNS = tuple(f.name for f in dataclasses.fields(JobRecord))
_JOB_UPDATABLE = frozenset(_JOB_COLUMNS) - {"id"}
_JOB_SELECT = f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs"
_JOB_INSERT = f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS)}) VALUES ({', '.join('?' * len(_JOB_COLUMNS))})"
_BOOL_COLUMNS = frozenset({"llm_cached", "flagged"})
_UNFINISHED_SQL = "('queued', 'running')"

# name -> (lowest, highest, how moderators see it)
_SETTING_LIMITS = {
    "max_steps": (1, 200, "Max steps"),
    "user_pending_cap": (1, 20, "Pending jobs per user"),
    "refine_depth": (0, 10, "Refine depth"),
}
_SETTING_FIELDS = frozenset(_SETTING_LIMITS) | {"allowed_channel_ids", "blocked_words", "flagged_outputs"}
FLAGGED_OUTPUT_CHOICES = ("spoiler", "withhold")
MAX_BLOCKED_WORDS = 100  # one compiled pattern per server; keeps matching cheap and the settings reply short
MAX_BLOCKED_WORD_CHARS = 60
MAX_BAN_REASON_CHARS = 500



# --- migrations -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations(directory: Path | Traversable | None = None) -> list[Migration]:
    """Read ``NNN_name.sql`` files in numeric order (the package's own unless ``directory`` is given).

    A misnamed ``.sql`` file or two files with one number are packaging bugs that would otherwise skip
    or reorder schema changes, so they raise instead of being ignored.
    """
    root = directory if directory is not None else resources.files(__package__ or "bot") / "migrations"
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


def connect(path: Path, busy_timeout: float = _BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode (transactions are explicit) with WAL, NORMAL sync and foreign keys."""
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    try:
        conn.row_factory = sqlite3.Row
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":  # e.g. some network file systems
            raise sqlite3.OperationalError(f"could not switch {path} to WAL mode (got {mode!r})")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction; IMMEDIATE takes the write lock up front so it cannot fail half-way on BUSY."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def _read(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A read transaction, so several SELECTs see one snapshot even while another process writes."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


# --- conversions and validation ---------------------------------------------------------------------


def _check_state(state: object) -> None:
    if state not in JOB_STATES:
        raise ValueError(f"unknown job state {state!r}; expected one of {', '.join(JOB_STATES)}")


def _to_db(column: str, value: Any) -> Any:
    if column in _BOOL_COLUMNS:
        return int(bool(value))
    return value


def _row_to_job(row: sqlite3.Row) -> JobRecord:
    values = {c: row[c] for c in _JOB_COLUMNS}
    for column in _BOOL_COLUMNS:
        values[column] = bool(values[column])
    return JobRecord(**values)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_settings(changes: dict[str, Any]) -> dict[str, Any]:
    """Check moderator input; messages are shown to them as-is."""
    unknown = sorted(set(changes) - _SETTING_FIELDS)
    if unknown:
        raise ValueError(f"Unknown setting(s): {', '.join(unknown)}.")
    clean: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "allowed_channel_ids":
            clean[name] = _validate_channels(value)
            continue
        if name == "blocked_words":
            clean[name] = _validate_blocked_words(value)
            continue
        if name == "flagged_outputs":
            if value not in FLAGGED_OUTPUT_CHOICES:
                raise ValueError(f"Flagged outputs must be one of {', '.join(FLAGGED_OUTPUT_CHOICES)}.")
            clean[name] = value
            continue
        low, high, label = _SETTING_LIMITS[name]
        if not _is_int(value) or not low <= value <= high:
            raise ValueError(f"{label} must be a whole number from {low} to {high} (got {value!r}).")
        clean[name] = value
    return clean


def _validate_blocked_words(value: object) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError("Blocked words must be a list of words or phrases.")
    words: list[str] = []
    for entry in value:
        if not isinstance(entry, str):
            raise ValueError(f"Blocked words must be text (got {entry!r}).")
        word = fold_text(entry)
        if len(word) > MAX_BLOCKED_WORD_CHARS:
            raise ValueError(f"Each blocked word or phrase can be at most {MAX_BLOCKED_WORD_CHARS} characters.")
        if word and word not in words:
            words.append(word)
    if len(words) > MAX_BLOCKED_WORDS:
        raise ValueError(f"At most {MAX_BLOCKED_WORDS} blocked words or phrases (got {len(words)}).")
    return words


def _validate_channels(value: object) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError("Allowed channels must be a list of channel IDs.")
    channels: list[int] = []
    for channel in value:
        if not _is_int(channel) or channel <= 0:
            raise ValueError(f"Allowed channels must be channel IDs (got {channel!r}).")
        if channel not in channels:
            channels.append(channel)
    return channels


def _settings_from_row(guild_id: int | None, row: sqlite3.Row | None) -> GuildSettings:
    if row is None:
        return GuildSettings(guild_id=guild_id, allowed_channel_ids=[])
    return GuildSettings(
        guild_id=guild_id,
        allowed_channel_ids=[int(c) for c in json.loads(row["allowed_channel_ids"])],
        max_steps=row["max_steps"],
        user_pending_cap=row["user_pending_cap"],
        refine_depth=row["refine_depth"],
        blocked_words=[str(w) for w in json.loads(row["blocked_words"])],
        flagged_outputs=row["flagged_outputs"],
    )


# --- image files ------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; best effort because some platforms cannot open directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via temp file + fsync + os.replace, so a full disk or crash never leaves a partial image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _remove_stale_temp_files(images_dir: Path, now: float) -> None:
    for leftover in images_dir.glob(_TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            if now - leftover.stat().st_mtime > _STALE_TMP_S:
                leftover.unlink()


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


# --- the store --------------------------------------------------------------------------------------


class Store:
    """Async facade over one SQLite connection plus the ``images/`` folder under ``data_dir``.

    Open with ``await Store.open(data_dir)``; several Store objects (or processes) may share a folder.
    A cancelled caller does not cancel its worker thread: the write it started still commits.
    """

    def __init__(self, data_dir: Path, conn: sqlite3.Connection, version: int) -> None:
        self.data_dir = data_dir
        self.images_dir = data_dir / IMAGES_DIRNAME
        self.schema_version = version
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()

    @classmethod
    async def open(cls, data_dir: str | Path, lock_wait: float = OPEN_LOCK_WAIT_S) -> Store:
        """Create ``data_dir`` and ``data_dir/images``, open ``mgie.sqlite3`` there and migrate it.

        While another process holds the database locked, retries with backoff for up to ``lock_wait``
        seconds. Raises :class:`DatabaseUnavailableError` with a message fit for the operator when the
        file is corrupt, stays locked or cannot be opened at all.
        """
        return await asyncio.to_thread(cls._open_sync, Path(data_dir), lock_wait)

    @classmethod
    def _open_sync(cls, data_dir: Path, lock_wait: float = OPEN_LOCK_WAIT_S) -> Store:
        data_dir = data_dir.expanduser().resolve()
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
                conn, version = cls._connect_and_migrate(path)
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
        _remove_stale_temp_files(images_dir, time.time())
        return cls(data_dir, conn, version)

    @staticmethod
    def _connect_and_migrate(path: Path) -> tuple[sqlite3.Connection, int]:
        conn = connect(path, busy_timeout=_OPEN_BUSY_TIMEOUT_S)
        try:
            apply_migrations(conn)
            version = schema_version(conn)
            conn.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
        except BaseException:
            conn.close()
            raise
        return conn, version

    async def close(self) -> None:
        """Close the connection (idempotent); waits for the call in progress, later calls raise."""
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA optimize")
            conn.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.to_thread(self._locked, fn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)`` in a worker thread with the connection to itself: for modules with their own
        queries (bot/retention.py); use ``_write`` inside for a transaction."""
        return await self._call(fn)

    def _locked(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            if self._conn is None:
                raise RuntimeError("the store is closed")
            return fn(self._conn)

    # --- jobs ---------------------------------------------------------------------------------------

    async def create_job(self, job: JobRecord) -> JobRecord:
        """Insert ``job`` and return the stored copy, with ``id`` (if empty) and ``created_at`` (if 0) filled.

        ``job`` itself is not modified. A duplicate id or a bad state raises ValueError.
        """
        record = dataclasses.replace(job, id=job.id or uuid.uuid4().hex, created_at=job.created_at or time.time())
        _check_state(record.state)
        values = tuple(_to_db(c, getattr(record, c)) for c in _JOB_COLUMNS)

        def insert(conn: sqlite3.Connection) -> None:
            with _write(conn):
                if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (record.id,)).fetchone():
                    raise ValueError(f"job {record.id} already exists")
                conn.execute(_JOB_INSERT, values)

        await self._call(insert)
        return record

    async def update_job(self, job_id: str, **fields: Any) -> JobRecord:
        """Set the given columns in one transaction and return the updated record.

        Only the named columns are written, so concurrent updates of different fields never undo each
        other. Unknown (or ``id``) fields and states outside JOB_STATES raise ValueError; a missing job
        raises KeyError.
        """
        unknown = sorted(set(fields) - _JOB_UPDATABLE)
        if unknown:
            raise ValueError(f"unknown or read-only job field(s): {', '.join(unknown)}")
        if "state" in fields:
            _check_state(fields["state"])
        assignments = ", ".join(f"{name} = ?" for name in fields)
        values = tuple(_to_db(name, value) for name, value in fields.items())

        def update(conn: sqlite3.Connection) -> JobRecord:
            with _write(conn):
                if fields:
                    conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values, job_id))
                row = conn.execute(f"{_JOB_SELECT} WHERE id = ?", (job_id,)).fetchone()
                if row is None:
                    raise KeyError(job_id)
            return _row_to_job(row)

        return await self._call(update)

    async def get_job(self, job_id: str) -> JobRecord | None:
        def get(conn: sqlite3.Connection) -> JobRecord | None:
            row = conn.execute(f"{_JOB_SELECT} WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else _row_to_job(row)

        return await self._call(get)

    async def job_by_message(self, message_id: int) -> JobRecord | None:
        """The job whose result (preferred: it carries the buttons) or status message this is."""

        def find(conn: sqlite3.Connection) -> JobRecord | None:
            with _read(conn):
                for column in ("result_message_id", "status_message_id"):
                    row = conn.execute(
                        f"{_JOB_SELECT} WHERE {column} = ? ORDER BY created_at DESC, rowid DESC LIMIT 1",
                        (message_id,),
                    ).fetchone()
                    if row is not None:
                        return _row_to_job(row)
            return None

        return await self._call(find)

    async def unfinished_jobs(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first: what a restarted bot must resume or report as lost."""
        return await self._select(
            f"{_JOB_SELECT} WHERE state IN {_UNFINISHED_SQL} ORDER BY created_at, rowid", ()
        )

    async def undelivered_results(self, since: float) -> list[JobRecord]:
        """Jobs done since ``since`` whose result never reached Discord (a stop cut the delivery off)."""
        return await self._select(
            f"{_JOB_SELECT} WHERE state = 'done' AND result_message_id IS NULL AND output_image IS NOT NULL"
            " AND finished_at >= ? ORDER BY finished_at, rowid", (since,)
        )

    async def pending_count(self, user_id: int) -> int:
        """Queued + running jobs of ``user_id``, for the per-user cap."""

        def count(conn: sqlite3.Connection) -> int:
            sql = f"SELECT COUNT(*) FROM jobs WHERE user_id = ? AND state IN {_UNFINISHED_SQL}"
            return int(conn.execute(sql, (user_id,)).fetchone()[0])

        return await self._call(count)

    async def chain(self, job_id: str, limit: int = 50) -> list[JobRecord]:
        """``job_id`` and its ancestors via parent_id, oldest first, at most ``limit`` records.

        Stops early at a missing parent (pruned or never stored) or a cycle; [] when ``job_id`` is unknown
        or ``limit`` < 1.
        """

        def walk(conn: sqlite3.Connection) -> list[JobRecord]:
            records: list[JobRecord] = []
            seen: set[str] = set()
            current: str | None = job_id
            with _read(conn):
                while current is not None and current not in seen and len(records) < limit:
                    row = conn.execute(f"{_JOB_SELECT} WHERE id = ?", (current,)).fetchone()
                    if row is None:
                        break
                    record = _row_to_job(row)
                    records.append(record)
                    seen.add(current)
                    current = record.parent_id
            records.reverse()
            return records

        return await self._call(walk)

    async def recent_jobs(self, user_id: int, limit: int = 10) -> list[JobRecord]:
        """``user_id``'s latest jobs, newest first."""
        if limit < 1:
            return []
        return await self._select(
            f"{_JOB_SELECT} WHERE user_id = ? ORDER BY created_at DESC, rowid DESC LIMIT ?", (user_id, limit)
        )

    async def average_duration(self, last_n: int = 50) -> float | None:
        """Mean run time (finished_at - started_at) of the last ``last_n`` done jobs, for ETAs; None if none."""
        if last_n < 1:
            return None

        def average(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT AVG(finished_at - started_at) FROM ("
                " SELECT started_at, finished_at FROM jobs"
                " WHERE state = 'done' AND started_at IS NOT NULL AND finished_at IS NOT NULL"
                " ORDER BY finished_at DESC LIMIT ?)",
                (last_n,),
            ).fetchone()
            return None if row[0] is None else float(row[0])

        return await self._call(average)

    async def counts_by_state(self) -> dict[str, int]:
        """Number of jobs per state; every state in JOB_STATES is present, 0 when unused."""

        def count(conn: sqlite3.Connection) -> dict[str, int]:
            counts = dict.fromkeys(JOB_STATES, 0)
            for row in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                counts[row[0]] = int(row[1])
            return counts

        return await self._call(count)

    async def _select(self, sql: str, params: tuple[Any, ...]) -> list[JobRecord]:
        return await self._call(lambda conn: [_row_to_job(r) for r in conn.execute(sql, params)])

    # --- guild settings -----------------------------------------------------------------------------

    async def guild_settings(self, guild_id: int | None) -> GuildSettings:
        """The guild's settings, or the defaults when none were saved (always for DMs: ``guild_id`` None)."""
        if guild_id is None:
            return _settings_from_row(None, None)

        def get(conn: sqlite3.Connection) -> GuildSettings:
            row = conn.execute("SELECT * FROM guild_settings WHERE guild_id = ?", (guild_id,)).fetchone()
            return _settings_from_row(guild_id, row)

        return await self._call(get)

    async def update_guild_settings(self, guild_id: int, **changes: Any) -> GuildSettings:
        """Validate and save ``changes``; ValueError messages are written for the moderator who sent them.

        Limits: max_steps 1..200, user_pending_cap 1..20, refine_depth 0..10, allowed_channel_ids a list of
        channel IDs (duplicates dropped; empty = every channel), blocked_words a list of at most
        MAX_BLOCKED_WORDS words or phrases (stored folded by fold_text, blanks and duplicates dropped).
        """
        if not _is_int(guild_id):
            raise ValueError("Settings can only be changed in a server.")
        clean = _validate_settings(changes)

        def upsert(conn: sqlite3.Connection) -> GuildSettings:
            with _write(conn):
                row = conn.execute("SELECT * FROM guild_settings WHERE guild_id = ?", (guild_id,)).fetchone()
                settings = dataclasses.replace(_settings_from_row(guild_id, row), **clean)
                conn.execute(
                    "INSERT INTO guild_settings"
                    " (guild_id, allowed_channel_ids, max_steps, user_pending_cap, refine_depth, blocked_words,"
                    " flagged_outputs) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (guild_id) DO UPDATE SET allowed_channel_ids = excluded.allowed_channel_ids,"
                    " max_steps = excluded.max_steps, user_pending_cap = excluded.user_pending_cap,"
                    " refine_depth = excluded.refine_depth, blocked_words = excluded.blocked_words,"
                    " flagged_outputs = excluded.flagged_outputs",
                    (
                        guild_id,
                        json.dumps(settings.allowed_channel_ids),
                        settings.max_steps,
                        settings.user_pending_cap,
                        settings.refine_depth,
                        json.dumps(settings.blocked_words),
                        settings.flagged_outputs,
                    ),
                )
            return settings

        return await self._call(upsert)

    # --- block list ---------------------------------------------------------------------------------

    async def blocked_users(self, guild_id: int | None) -> list[int]:
        """Users blocked in ``guild_id``, ascending; DMs have no moderators, so always []."""
        if guild_id is None:
            return []

        def get(conn: sqlite3.Connection) -> list[int]:
            rows = conn.execute("SELECT user_id FROM blocked_users WHERE guild_id = ? ORDER BY user_id", (guild_id,))
            return [int(r[0]) for r in rows]

        return await self._call(get)

    async def is_blocked(self, guild_id: int | None, user_id: int) -> bool:
        if guild_id is None:
            return False

        def get(conn: sqlite3.Connection) -> bool:
            sql = "SELECT 1 FROM blocked_users WHERE guild_id = ? AND user_id = ?"
            return conn.execute(sql, (guild_id, user_id)).fetchone() is not None

        return await self._call(get)

    async def block_user(self, guild_id: int, user_id: int, *, reason: str = "",
                         blocked_by: int | None = None) -> bool:
        """Block ``user_id`` in ``guild_id``; False when they already were (the first reason is kept).

        ``reason`` (cut to MAX_BAN_REASON_CHARS) and ``blocked_by`` are kept for moderators to look back on.
        """
        reason = reason.strip()[:MAX_BAN_REASON_CHARS]

        def block(conn: sqlite3.Connection) -> bool:
            with _write(conn):
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO blocked_users (guild_id, user_id, blocked_at, reason, blocked_by)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (guild_id, user_id, time.time(), reason, blocked_by),
                )
            return cursor.rowcount == 1

        return await self._call(block)

    async def block_reason(self, guild_id: int | None, user_id: int) -> str | None:
        """Why ``user_id`` is blocked in ``guild_id`` ('' when no reason was given); None when not blocked."""
        if guild_id is None:
            return None

        def get(conn: sqlite3.Connection) -> str | None:
            sql = "SELECT reason FROM blocked_users WHERE guild_id = ? AND user_id = ?"
            row = conn.execute(sql, (guild_id, user_id)).fetchone()
            return None if row is None else str(row[0])

        return await self._call(get)

    async def unblock_user(self, guild_id: int, user_id: int) -> bool:
        """Unblock ``user_id`` in ``guild_id``; False when they were not blocked."""

        def unblock(conn: sqlite3.Connection) -> bool:
            with _write(conn):
                cursor = conn.execute(
                    "DELETE FROM blocked_users WHERE guild_id = ? AND user_id = ?", (guild_id, user_id)
                )
            return cursor.rowcount == 1

        return await self._call(unblock)

    # --- images -------------------------------------------------------------------------------------

    async def save_image(self, job_id: str, kind: str, data: bytes, ext: str = "png") -> str:
        """Write ``images/<job_id>-<kind>.<ext>`` atomically and return that relative path.

        The file is fsynced before this returns, so a job row that names it (written afterwards) never
        points at a missing or partial image after a crash. I/O errors (disk full) raise OSError and leave
        no temporary file and any earlier version intact; the database is not touched.
        """
        for label, value, pattern in (("job id", job_id, _SAFE_NAME_PART), ("kind", kind, _SAFE_NAME_PART),
                                      ("extension", ext, _SAFE_EXT)):
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise ValueError(f"unsafe image {label}: {value!r}")
        relative = f"{IMAGES_DIRNAME}/{job_id}-{kind}.{ext}"
        await asyncio.to_thread(_atomic_write, self.data_dir / relative, bytes(data))
        return relative

    def image_path(self, relative: str) -> Path:
        """Absolute path for a stored relative path; ValueError if it is absolute or escapes ``data_dir``.

        Paths come from the database, so a tampered row must not make the bot read or send arbitrary files.
        """
        if not relative or Path(relative).is_absolute():
            raise ValueError(f"not a relative image path: {relative!r}")
        resolved = (self.data_dir / relative).resolve()  # follows symlinks, so links out are refused too
        if resolved == self.data_dir or not resolved.is_relative_to(self.data_dir):
            raise ValueError(f"image path escapes the data directory: {relative!r}")
        return resolved

    async def read_image(self, relative: str | None) -> bytes | None:
        """The file's bytes, or None when there is no path or the file is gone (pruned, lost in a crash)."""
        if not relative:
            return None

        def read() -> bytes | None:
            try:
                return self.image_path(relative).read_bytes()
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(read)

    async def existing_image_path(self, relative: str | None) -> str | None:
        """The absolute path of a stored image that exists, else None (for a worker to read it itself)."""
        if not relative:
            return None

        def check() -> str | None:
            path = self.image_path(relative)
            return str(path) if path.is_file() else None

        return await asyncio.to_thread(check)

    async def delete_new_job(self, job_id: str, own_file: str | None) -> None:
        """Undo ``create_job`` (and ``save_image``) for a job refused before it was queued."""

        def delete(conn: sqlite3.Connection) -> None:
            with _write(conn):
                conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            if own_file:
                with contextlib.suppress(OSError, ValueError):
                    self.image_path(own_file).unlink()

        await self._call(delete)
