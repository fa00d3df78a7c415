"""Job rows: :class:`JobRecord` and the queries on the ``jobs`` table (chains of refinements included)."""

from __future__ import annotations

import dataclasses
import statistics
import time
import uuid
from typing import Any

import aiosqlite

from .database import Database, runs_to_completion

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
UNFINISHED_STATES = ("queued", "running")


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
    locale: str | None = None  # the requester's Discord locale: the language of the job's messages


@dataclasses.dataclass(frozen=True)
class GuildStats:
    """One server's jobs that ended in a time window, for ``/mgie stats``.

    ``edits`` counts results delivered (done), ``failures`` jobs that failed; the medians are over the done
    jobs: ``median_wait`` from stored to started, ``median_edit`` from started to finished (None if none).
    """

    edits: int
    failures: int
    median_wait: float | None
    median_edit: float | None


_JOB_COLUMNS = tuple(f.name for f in dataclasses.fields(JobRecord))
_JOB_UPDATABLE = frozenset(_JOB_COLUMNS) - {"id"}
_JOB_SELECT = f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs"
_JOB_INSERT = f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS)}) VALUES ({', '.join('?' * len(_JOB_COLUMNS))})"
_BOOL_COLUMNS = frozenset({"llm_cached", "flagged"})
_UNFINISHED_SQL = "('queued', 'running')"


def _check_state(state: object) -> None:
    if state not in JOB_STATES:
        raise ValueError(f"unknown job state {state!r}; expected one of {', '.join(JOB_STATES)}")


def _to_db(column: str, value: Any) -> Any:
    if column in _BOOL_COLUMNS:
        return int(bool(value))
    return value


def _row_to_job(row: Any) -> JobRecord:
    values = {c: row[c] for c in _JOB_COLUMNS}
    for column in _BOOL_COLUMNS:
        values[column] = bool(values[column])
    return JobRecord(**values)


async def _job_row(conn: aiosqlite.Connection, where: str, params: tuple[Any, ...]) -> JobRecord | None:
    rows = await conn.execute_fetchall(f"{_JOB_SELECT} WHERE {where}", params)
    return _row_to_job(rows[0]) if rows else None


class JobQueries:
    """The ``jobs`` table, for :class:`~bot.storage.Store`."""

    db: Database

    @runs_to_completion
    async def create_job(self, job: JobRecord) -> JobRecord:
        """Insert ``job`` and return the stored copy, with ``id`` (if empty) and ``created_at`` (if 0) filled.

        ``job`` itself is not modified. A duplicate id or a bad state raises ValueError.
        """
        record = dataclasses.replace(job, id=job.id or uuid.uuid4().hex, created_at=job.created_at or time.time())
        _check_state(record.state)
        async with self.db.transaction() as conn:
            if await _job_row(conn, "id = ?", (record.id,)) is not None:
                raise ValueError(f"job {record.id} already exists")
            await conn.execute(_JOB_INSERT, tuple(_to_db(c, getattr(record, c)) for c in _JOB_COLUMNS))
        return record

    @runs_to_completion
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
        async with self.db.transaction() as conn:
            if fields:
                await conn.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values, job_id))
            record = await _job_row(conn, "id = ?", (job_id,))
        if record is None:
            raise KeyError(job_id)
        return record

    async def get_job(self, job_id: str) -> JobRecord | None:
        """The job ``job_id``, or None when there is none (never stored, deleted, forgotten)."""
        rows = await self._select("WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    async def job_by_message(self, message_id: int) -> JobRecord | None:
        """The job whose result (preferred: it carries the buttons) or status message this is."""
        rows = await self._select(
            "WHERE result_message_id = ? OR status_message_id = ?"
            " ORDER BY result_message_id = ? DESC, created_at DESC, rowid DESC LIMIT 1",
            (message_id, message_id, message_id))
        return rows[0] if rows else None

    async def unfinished_jobs(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first: what a restarted bot must resume or report as lost."""
        return await self._select(f"WHERE state IN {_UNFINISHED_SQL} ORDER BY created_at, rowid", ())

    async def undelivered_results(self, since: float) -> list[JobRecord]:
        """Jobs done since ``since`` whose result never reached Discord (a stop cut the delivery off)."""
        return await self._select(
            "WHERE state = 'done' AND result_message_id IS NULL AND output_image IS NOT NULL"
            " AND finished_at >= ? ORDER BY finished_at, rowid", (since,))

    async def pending_count(self, user_id: int) -> int:
        """Queued + running jobs of ``user_id``, for the per-user cap."""
        row = await self.db.fetchone(f"SELECT COUNT(*) FROM jobs WHERE user_id = ? AND state IN {_UNFINISHED_SQL}",
                                     (user_id,))
        return int(row[0])

    async def chain(self, job_id: str, limit: int = 50) -> list[JobRecord]:
        """``job_id`` and its ancestors via parent_id, oldest first, at most ``limit`` records.

        Stops early at a missing parent (pruned or never stored) or a cycle; [] when ``job_id`` is unknown
        or ``limit`` < 1.
        """
        if limit < 1:
            return []
        # One statement, so the walk sees one state of the table; cycles are cut below.
        rows = await self.db.fetchall(
            "WITH RECURSIVE walk(id, depth) AS ("
            " SELECT ?, 0"
            " UNION ALL"
            " SELECT jobs.parent_id, walk.depth + 1 FROM walk JOIN jobs ON jobs.id = walk.id"
            " WHERE jobs.parent_id IS NOT NULL AND walk.depth + 1 < ?)"
            f" SELECT {', '.join('jobs.' + c for c in _JOB_COLUMNS)} FROM walk JOIN jobs ON jobs.id = walk.id"
            " ORDER BY walk.depth",
            (job_id, limit))
        records: list[JobRecord] = []
        seen: set[str] = set()
        for row in rows:  # newest first; a missing parent ends the walk (its row is simply absent)
            if row["id"] in seen:
                break
            seen.add(row["id"])
            records.append(_row_to_job(row))
        records.reverse()
        return records

    async def recent_jobs(self, user_id: int, limit: int = 10) -> list[JobRecord]:
        """``user_id``'s latest jobs, newest first."""
        if limit < 1:
            return []
        return await self._select("WHERE user_id = ? ORDER BY created_at DESC, rowid DESC LIMIT ?", (user_id, limit))

    async def average_duration(self, last_n: int = 50) -> float | None:
        """Mean run time (finished_at - started_at) of the last ``last_n`` done jobs, for ETAs; None if none."""
        if last_n < 1:
            return None
        row = await self.db.fetchone(
            "SELECT AVG(finished_at - started_at) FROM ("
            " SELECT started_at, finished_at FROM jobs"
            " WHERE state = 'done' AND started_at IS NOT NULL AND finished_at IS NOT NULL"
            " ORDER BY finished_at DESC LIMIT ?)",
            (last_n,),
        )
        return None if row[0] is None else float(row[0])

    async def guild_stats(self, guild_id: int, since: float) -> GuildStats:
        """Jobs of ``guild_id`` that ended (done or failed) at or after ``since`` (a time.time())."""
        # idx_jobs_state_finished narrows the rows to the window; the guild is filtered among them.
        rows = await self.db.fetchall(
            "SELECT state, started_at - created_at, finished_at - started_at FROM jobs"
            " WHERE state IN ('done', 'failed') AND finished_at >= ? AND guild_id = ?", (since, guild_id))
        done = [r for r in rows if r[0] == "done"]
        waits = [max(float(r[1]), 0.0) for r in done if r[1] is not None]
        edits = [max(float(r[2]), 0.0) for r in done if r[2] is not None]
        return GuildStats(edits=len(done), failures=len(rows) - len(done),
                          median_wait=statistics.median(waits) if waits else None,
                          median_edit=statistics.median(edits) if edits else None)

    async def counts_by_state(self) -> dict[str, int]:
        """Number of jobs per state; every state in JOB_STATES is present, 0 when unused."""
        counts = dict.fromkeys(JOB_STATES, 0)
        for row in await self.db.fetchall("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[row[0]] = int(row[1])
        return counts

    async def _select(self, where: str, params: tuple[Any, ...]) -> list[JobRecord]:
        return [_row_to_job(r) for r in await self.db.fetchall(f"{_JOB_SELECT} {where}", params)]

