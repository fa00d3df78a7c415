"""The store: one object for jobs, server settings and bans, and image files, over one SQLite database."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from .database import Database, connect, runs_to_completion
from .guilds import GuildQueries
from .images import IMAGES_DIRNAME, ImageFiles, remove_stale_temp_files
from .jobs import JobQueries
from .migrations import apply_migrations, schema_version

DB_FILENAME = "mgie.sqlite3"


def _migrate(data_dir: Path) -> int:
    """Create the folders, bring the schema up to date; the schema version. Blocking: run in a thread."""
    images_dir = data_dir / IMAGES_DIRNAME
    images_dir.mkdir(parents=True, exist_ok=True)
    conn = connect(data_dir / DB_FILENAME)
    try:
        apply_migrations(conn)
        version = schema_version(conn)
    finally:
        conn.close()
    remove_stale_temp_files(images_dir, time.time())
    return version


class Store(JobQueries, GuildQueries, ImageFiles):
    """Jobs, per-server settings, bans and the image files jobs point at, under ``data_dir``.

    Open with ``await Store.open(data_dir)``; several Store objects (or processes) may share a folder.
    A write whose caller is cancelled still commits (see :func:`~bot.storage.database.runs_to_completion`).
    """

    def __init__(self, data_dir: Path, db: Database, version: int) -> None:
        self.data_dir = data_dir
        self.images_dir = data_dir / IMAGES_DIRNAME
        self.schema_version = version
        self.db = db

    @classmethod
    async def open(cls, data_dir: str | Path) -> Store:
        """Create ``data_dir`` and ``data_dir/images``, open ``mgie.sqlite3`` there and migrate it."""
        data_dir = Path(data_dir).expanduser().resolve()
        version = await asyncio.to_thread(_migrate, data_dir)
        return cls(data_dir, await Database.open(data_dir / DB_FILENAME), version)

    async def close(self) -> None:
        """Close the connection (idempotent); waits for the statement in progress, later calls raise."""
        await self.db.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @runs_to_completion
    async def delete_new_job(self, job_id: str, own_file: str | None) -> None:
        """Undo ``create_job`` (and ``save_image``) for a job refused before it was queued."""
        async with self.db.transaction() as conn:
            await conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        if own_file:
            await self.remove_image(own_file)
