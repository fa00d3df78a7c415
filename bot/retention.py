"""Deleting what the bot stores: old chains of jobs, storage over its cap, expired tokens, one user's data.

Jobs are deleted a *chain* at a time: a job, the job whose output it edits (``parent_id``) and every job
that shares an image file with it (a re-roll re-uses its source's input) form one chain. Deleting whole
chains keeps refinements from losing their input or history half-way, and a file is only ever unlinked
once no remaining row names it. A chain with a job still queued or running is never touched.

Every stored image is named ``images/<job id>-<in|out>.png`` after the job that wrote it, which is how
a user's own files are told apart from other users' files their jobs merely read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sqlite3
import time
from pathlib import Path

import aiosqlite

from . import i18n
from .delivery import TOKEN_LIFETIME
from .storage import DB_FILENAME, IMAGES_DIRNAME, TMP_PREFIX, UNFINISHED_STATES, Store

log = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS = 30.0
DEFAULT_MAX_STORAGE_GB = 10.0
TOKEN_SWEEP_EVERY = 60.0  # seconds; interaction tokens live 15 minutes
FULL_SWEEP_EVERY = 3600.0  # seconds between age and size passes (they stat every stored file)
ORPHAN_GRACE = 3600.0  # a file younger than this may belong to a job row about to be written


@dataclasses.dataclass
class SweepReport:
    jobs: int = 0
    files: int = 0
    bytes: int = 0
    tokens: int = 0


@dataclasses.dataclass
class ForgetReport:
    jobs: int = 0
    files: int = 0
    detached: int = 0  # other users' jobs whose link to (or input from) the forgotten user was cut


@dataclasses.dataclass
class DiskUse:
    images: int  # bytes in stored images
    files: int
    database: int  # bytes in the SQLite files

    @property
    def total(self) -> int:
        """Images and database together."""
        return self.images + self.database


@dataclasses.dataclass
class _Chain:
    ids: list[str] = dataclasses.field(default_factory=list)
    files: set[str] = dataclasses.field(default_factory=set)
    last_active: float = 0.0
    pending: bool = False


def file_owner(relative: str | None) -> str | None:
    """The id of the job that wrote ``images/<id>-<kind>.<ext>``; None for anything else."""
    if not relative or not relative.startswith(IMAGES_DIRNAME + "/"):
        return None
    name = relative[len(IMAGES_DIRNAME) + 1:]
    job_id, sep, _ = name.partition("-")
    return job_id if sep and job_id else None


def _chains(rows: list[sqlite3.Row]) -> list[_Chain]:
    """Group jobs linked by parent_id or by a shared image file (union-find)."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        root = key
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[key] != root:
            parent[key], key = root, parent[key]
        return root

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    ids = {row["id"] for row in rows}
    for row in rows:
        find(row["id"])
        if row["parent_id"] in ids:
            union(row["id"], row["parent_id"])
        for column in ("input_image", "output_image"):
            if row[column]:
                union(row["id"], "file:" + row[column])
    chains: dict[str, _Chain] = {}
    for row in rows:
        chain = chains.setdefault(find(row["id"]), _Chain())
        chain.ids.append(row["id"])
        chain.files.update(p for p in (row["input_image"], row["output_image"]) if p)
        chain.last_active = max(chain.last_active, row["created_at"] or 0.0, row["finished_at"] or 0.0)
        chain.pending = chain.pending or row["state"] in UNFINISHED_STATES
    return list(chains.values())


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _unlink(store: Store, relatives: set[str]) -> tuple[int, int]:
    files = freed = 0
    for relative in relatives:
        try:
            path = store.image_path(relative)
            size = path.stat().st_size
            path.unlink()
        except (OSError, ValueError):
            continue
        files, freed = files + 1, freed + size
    return files, freed


def _database_bytes(data_dir: Path) -> int:
    return sum(_size(data_dir / (DB_FILENAME + suffix)) for suffix in ("", "-wal", "-shm"))


def disk_use_sync(store: Store) -> DiskUse:
    """What the stored images and database files take on disk (blocking: a directory scan)."""
    images = files = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(store.images_dir) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    images += entry.stat(follow_symlinks=False).st_size
                    files += 1
    return DiskUse(images=images, files=files, database=_database_bytes(store.data_dir))


async def _clear_expired_tokens(store: Store, now: float) -> int:
    """Drop interaction tokens older than Discord's 15 minutes: a leaked database then holds none that work.

    ``application_id`` stays, so delivery still knows the job answered an interaction.
    """
    async with store.db.transaction() as conn:
        cursor = await conn.execute(
            "UPDATE jobs SET interaction_token = NULL WHERE interaction_token IS NOT NULL"
            " AND COALESCE(token_created_at, 0) <= ?", (now - TOKEN_LIFETIME,))
    return cursor.rowcount


def _doomed(store: Store, rows: list[sqlite3.Row], now: float, max_age: float | None,
            max_bytes: int | None) -> list[_Chain]:
    """Chains idle longer than ``max_age``, then the oldest others while storage is over ``max_bytes``."""
    chains = sorted((c for c in _chains(rows) if not c.pending), key=lambda c: c.last_active)
    used = disk_use_sync(store).total
    doomed = []
    for chain in chains:
        too_old = max_age is not None and chain.last_active < now - max_age
        too_big = max_bytes is not None and used > max_bytes
        if not (too_old or too_big):
            continue
        doomed.append(chain)
        used -= sum(_size(store.data_dir / p) for p in chain.files)
    return doomed


def _remove_files(store: Store, doomed: set[str], referenced: set[str], now: float) -> tuple[int, int]:
    """Unlink ``doomed`` files, and image files no row names (left by a crash) once ORPHAN_GRACE old."""
    files, freed = _unlink(store, doomed)
    for entry in store.images_dir.iterdir():
        relative = f"{IMAGES_DIRNAME}/{entry.name}"
        if entry.name.startswith(TMP_PREFIX) or relative in referenced or not entry.is_file():
            continue
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > ORPHAN_GRACE:  # newer rows only name files newer than this
                size = entry.stat().st_size
                entry.unlink()
                files, freed = files + 1, freed + size
    return files, freed


async def _sweep(store: Store, now: float, max_age: float | None, max_bytes: int | None) -> SweepReport:
    """Delete chains idle longer than ``max_age`` seconds, then the oldest others while storage is over
    ``max_bytes``; and image files no row names (left by a crash) once ORPHAN_GRACE old.

    Rows go in one transaction, files after it commits (in a worker thread, like every file scan here).
    """
    report = SweepReport()
    async with store.db.transaction() as conn:
        rows = list(await conn.execute_fetchall(
            "SELECT id, parent_id, input_image, output_image, state, created_at, finished_at FROM jobs"))
        doomed = await asyncio.to_thread(_doomed, store, rows, now, max_age, max_bytes)
        for chain in doomed:
            await conn.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in chain.ids])
            report.jobs += len(chain.ids)
    referenced = {p for row in rows for p in (row["input_image"], row["output_image"]) if p}
    report.files, report.bytes = await asyncio.to_thread(
        _remove_files, store, {p for c in doomed for p in c.files}, referenced, now)
    return report


async def _user_jobs(conn: aiosqlite.Connection, user_id: int) -> tuple[list[str], list[str]]:
    """(every job id of ``user_id``, the unfinished jobs anyone has that read one of their images)."""
    ids = [r[0] for r in await conn.execute_fetchall("SELECT id FROM jobs WHERE user_id = ?", (user_id,))]
    mine = set(ids)
    placeholders = ", ".join("?" * len(UNFINISHED_STATES))
    rows = await conn.execute_fetchall(
        f"SELECT id, user_id, input_image FROM jobs WHERE state IN ({placeholders})", UNFINISHED_STATES)
    pending = [r["id"] for r in rows if r["user_id"] == user_id or file_owner(r["input_image"]) in mine]
    return ids, pending


def _remove_user_files(store: Store, owned: set[str], mine: set[str]) -> int:
    on_disk = {f"{IMAGES_DIRNAME}/{p.name}" for i in mine for p in store.images_dir.glob(f"{i}-*")}
    return _unlink(store, owned | on_disk)[0]


async def _forget_user(store: Store, user_id: int) -> ForgetReport | list[str]:
    """Delete every job row and image of ``user_id``; other users' jobs keep their own results but lose
    the link to theirs (parent_id) and any input that was one of their images.

    Returns the ids of jobs still queued or running that need their data (cancel those first) instead.
    """
    report = ForgetReport()
    async with store.db.transaction() as conn:
        ids, pending = await _user_jobs(conn, user_id)
        if pending:
            return pending
        mine = set(ids)
        rows = await conn.execute_fetchall("SELECT id, user_id, parent_id, input_image, output_image FROM jobs")
        owned = {p for r in rows for p in (r["input_image"], r["output_image"]) if file_owner(p) in mine}
        for row in rows:
            if row["user_id"] == user_id:
                continue
            changes = {}
            if row["parent_id"] in mine:
                changes["parent_id"] = None
            if row["input_image"] in owned:
                changes["input_image"] = ""
            if row["output_image"] in owned:
                changes["output_image"] = None
            if changes:
                sets = ", ".join(f"{k} = ?" for k in changes)
                await conn.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*changes.values(), row["id"]))
                report.detached += 1
        await conn.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
        report.jobs = len(ids)
    report.files = await asyncio.to_thread(_remove_user_files, store, owned, mine)
    return report


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


class Retention:
    """The bot's retention policy: ``days`` (0 keeps jobs forever) and ``max_gb`` (0: no cap)."""

    def __init__(self, store: Store, days: float = DEFAULT_RETENTION_DAYS,
                 max_gb: float = DEFAULT_MAX_STORAGE_GB) -> None:
        self.store = store
        self.days, self.max_gb = days, max_gb

    @property
    def max_age(self) -> float | None:
        """Seconds a finished chain is kept; None: forever."""
        return self.days * 86400.0 if self.days > 0 else None

    @property
    def max_bytes(self) -> int | None:
        """The storage cap in bytes; None: no cap."""
        return int(self.max_gb * 2**30) if self.max_gb > 0 else None

    def describe(self, use: DiskUse, locale: object = None) -> str:
        """For /mgie status: what is stored and the limits that apply, in the reader's language."""
        cap = (i18n.text("admin.storage_limit", locale, gb=f"{self.max_gb:g}") if self.max_bytes
               else i18n.text("admin.storage_no_limit", locale))
        kept = (i18n.text("admin.storage_kept_days", locale, days=f"{self.days:g}") if self.max_age
                else i18n.text("admin.storage_kept_until_limit", locale))
        return i18n.text("admin.storage_use", locale, size=_human(use.total), files=use.files) + f" · {cap} · {kept}"

    async def sweep(self, now: float | None = None) -> SweepReport:
        """One full pass: old chains, storage over the cap, orphaned files and expired tokens."""
        now = time.time() if now is None else now
        report = await _sweep(self.store, now, self.max_age, self.max_bytes)
        report.tokens = await self.clear_expired_tokens(now)
        if report.jobs or report.files:
            log.info("retention: deleted %d job(s) and %d file(s) (%.1f MB)", report.jobs, report.files,
                     report.bytes / 2**20)
        return report

    async def clear_expired_tokens(self, now: float | None = None) -> int:
        """Drop interaction tokens past Discord's 15 minutes; how many."""
        now = time.time() if now is None else now
        return await _clear_expired_tokens(self.store, now)

    async def disk_use(self) -> DiskUse:
        """Bytes in stored images and the database files (a scan in a worker thread)."""
        return await asyncio.to_thread(disk_use_sync, self.store)

    async def run(self) -> None:
        """Forever: a full sweep now and every FULL_SWEEP_EVERY, expired tokens every TOKEN_SWEEP_EVERY."""
        next_full = 0.0
        while True:
            try:
                if time.monotonic() >= next_full:
                    await self.sweep()
                    next_full = time.monotonic() + FULL_SWEEP_EVERY
                else:
                    await self.clear_expired_tokens()
            except Exception:
                log.exception("retention sweep failed; trying again later")
            await asyncio.sleep(TOKEN_SWEEP_EVERY)

    async def pending_for_forget(self, user_id: int) -> list[str]:
        """Unfinished jobs that need ``user_id``'s data: to cancel before :meth:`forget_user` can run."""
        async with self.store.db.turn() as conn:
            return (await _user_jobs(conn, user_id))[1]

    async def forget_user(self, user_id: int) -> ForgetReport | list[str]:
        """Delete ``user_id``'s data (see :func:`_forget_user`), or the jobs that must stop first."""
        return await _forget_user(self.store, user_id)
