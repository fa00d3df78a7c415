"""The store: one object for jobs, server settings and bans, and image files, over one SQLite database."""

from __future__ import annotations

import asyncio
from pathlib import Path

from .database import Database, runs_to_completion
from .guild_cache import GuildCache
from .guilds import GuildQueries
from .images import IMAGES_DIRNAME, ImageFiles
from .jobs import JobQueries
from .opening import DB_FILENAME, OPEN_LOCK_WAIT_S, prepare_data_dir


class Store(JobQueries, GuildQueries, ImageFiles):
    """Jobs, per-server settings, bans and the image files jobs point at, under ``data_dir``.

    Open with ``await Store.open(data_dir)``; several Store objects (or processes) may share a folder.
    A write whose caller is cancelled still commits (see :func:`~bot.storage.database.runs_to_completion`).
    Server settings and bans are answered from memory once read (:mod:`~bot.storage.guild_cache`): write them
    through the Store that reads them, or the other one will not see the change until it is reopened.
    """

    def __init__(self, data_dir: Path, db: Database, version: int) -> None:
        self.data_dir = data_dir
        self.images_dir = data_dir / IMAGES_DIRNAME
        self.schema_version = version
        self.db = db
        self.guild_cache = GuildCache(self.load_guild_entry)  # settings and bans, read without SQLite

    @classmethod
    async def open(cls, data_dir: str | Path, lock_wait: float = OPEN_LOCK_WAIT_S) -> Store:
        """Create ``data_dir`` and ``data_dir/images``, open ``mgie.sqlite3`` there and migrate it.

        While another process holds the database locked, retries with backoff for up to ``lock_wait``
        seconds. Raises :class:`~bot.storage.opening.DatabaseUnavailableError` with a message fit for the
        operator when the file is damaged, stays locked or cannot be opened at all.
        """
        data_dir = Path(data_dir).expanduser().resolve()
        version = await asyncio.to_thread(prepare_data_dir, data_dir, lock_wait)
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
