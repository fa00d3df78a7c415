"""The SQLite connections: opened with WAL after migrating, then used through aiosqlite.

aiosqlite runs each connection on a thread of its own, so the event loop never waits on the disk. Writes
go through one connection and take turns (:meth:`Database.turn`): a transaction is never interleaved
with another coroutine's statements, and turns go in the order they were asked for. Each write is one
``BEGIN IMMEDIATE`` transaction (the write lock is taken up front, so it cannot fail half-way on a busy
database). Reads are single statements on a second connection: they never wait for each other, only for
the writes asked before them, so a read sees every write its caller (or anyone) asked for earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiosqlite

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S")

BUSY_TIMEOUT_S = 10.0  # another process (or a crashed one's successor) holding the write lock briefly
_UNFINISHED_WRITES: set[asyncio.Task] = set()
_HOLDS_TURN: contextvars.ContextVar[bool] = contextvars.ContextVar("mgie_db_turn", default=False)


def connect(path: Path, busy_timeout: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """Open ``path`` in autocommit mode (transactions are explicit) with WAL, NORMAL sync and foreign keys.

    The plain ``sqlite3`` connection the migrations run on (and tests use to look inside).
    """
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


def runs_to_completion(method: Callable[Concatenate[S, P], Awaitable[T]]) -> Callable[Concatenate[S, P], Awaitable[T]]:
    """A write (a method of an object with a ``db``) that its caller's cancellation does not cut short.

    A job's state change must not be lost because the task that asked for it was cancelled (a shutdown,
    a timeout): the write runs in a task of its own and commits (or fails) whole; a cancelled caller just
    stops waiting. The write's turn is taken before that task starts, so writes and reads still go in
    the order they were asked for.
    """
    @functools.wraps(method)
    async def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
        db: Database = self.db  # type: ignore[attr-defined]
        if _HOLDS_TURN.get():  # called from inside another write: it already has the turn
            return await method(self, *args, **kwargs)
        ticket = await db.take_turn()  # cancelled while waiting: nothing started, nothing to finish
        token = _HOLDS_TURN.set(True)
        try:
            task = asyncio.ensure_future(method(self, *args, **kwargs))  # the task inherits the turn
        except BaseException:
            db.end_turn(ticket)
            raise
        finally:
            _HOLDS_TURN.reset(token)
        task.add_done_callback(lambda _: db.end_turn(ticket))
        _UNFINISHED_WRITES.add(task)
        task.add_done_callback(_UNFINISHED_WRITES.discard)
        return await asyncio.shield(task)

    return wrapper


async def _connect(path: Path, *pragmas: str) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        for pragma in ("synchronous=NORMAL", "foreign_keys=ON", *pragmas):
            await conn.execute(f"PRAGMA {pragma}")
    except BaseException:
        await conn.close()
        raise
    return conn


class Database:
    """A writer connection taken in turns and a reader connection for single-statement reads."""

    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection) -> None:
        self._writer: aiosqlite.Connection | None = writer
        self._reader: aiosqlite.Connection | None = reader
        self.lock = asyncio.Lock()  # whose turn it is on the writer (FIFO)
        self._asked = 0  # writes asked for so far; each has its number
        self._unfinished: set[int] = set()  # numbers of writes asked for and not yet over
        self._write_over = asyncio.Condition()
        self._readers_waiting = 0

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Connect to an already migrated ``path`` with the pragmas of :func:`connect`."""
        writer = await _connect(path)
        try:
            reader = await _connect(path, "query_only=ON")
        except BaseException:
            await writer.close()
            raise
        return cls(writer, reader)

    @property
    def connection(self) -> aiosqlite.Connection:
        """The writer connection (use it inside :meth:`turn`); RuntimeError once closed."""
        if self._writer is None:
            raise RuntimeError("the store is closed")
        return self._writer

    async def take_turn(self) -> int:
        """Wait for the writer (in the order asked); the turn's number, for :meth:`end_turn`."""
        self._asked += 1
        ticket = self._asked
        self._unfinished.add(ticket)
        try:
            await self.lock.acquire()
        except BaseException:
            self._finish(ticket)
            raise
        return ticket

    def end_turn(self, ticket: int) -> None:
        """Give the writer to the next in line."""
        self.lock.release()
        self._finish(ticket)

    def _finish(self, ticket: int) -> None:
        self._unfinished.discard(ticket)
        if self._readers_waiting:
            asyncio.ensure_future(self._announce_write_over())

    async def _announce_write_over(self) -> None:
        async with self._write_over:
            self._write_over.notify_all()

    async def _after_earlier_writes(self) -> None:
        """Return once every write asked for before now is over (at once when none is pending)."""
        last = self._asked
        if any(t <= last for t in self._unfinished):
            self._readers_waiting += 1
            try:
                async with self._write_over:
                    await self._write_over.wait_for(lambda: not any(t <= last for t in self._unfinished))
            finally:
                self._readers_waiting -= 1

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[aiosqlite.Connection]:
        """The writer to this coroutine alone until the block ends (statements in autocommit)."""
        if _HOLDS_TURN.get():
            yield self.connection
            return
        ticket = await self.take_turn()
        token = _HOLDS_TURN.set(True)
        try:
            yield self.connection
        finally:
            _HOLDS_TURN.reset(token)
            self.end_turn(ticket)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction: committed when the block ends, rolled back if it raises."""
        async with self.turn() as conn:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                await conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    await conn.execute("ROLLBACK")
                raise

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        """The first row of one read statement (see :meth:`fetchall`)."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """Every row of one read statement, on the reader, once the writes asked for before it are over.

        Inside a write's turn it runs on the writer instead (it may read that write's own changes).
        """
        if _HOLDS_TURN.get():
            return list(await self.connection.execute_fetchall(sql, tuple(params)))
        await self._after_earlier_writes()
        if self._reader is None:
            raise RuntimeError("the store is closed")
        return list(await self._reader.execute_fetchall(sql, tuple(params)))

    async def close(self) -> None:
        """Wait for the statement in progress, optimise and close; idempotent, later uses raise."""
        async with self.lock:
            writer, reader, self._writer, self._reader = self._writer, self._reader, None, None
            if reader is not None:
                await reader.close()
            if writer is None:
                return
            with contextlib.suppress(sqlite3.Error):
                await writer.execute("PRAGMA optimize")
            await writer.close()
