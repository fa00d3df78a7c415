"""The SQLite connection: opened with WAL, migrated, then used through aiosqlite, one transaction at a time.

aiosqlite runs the connection on a thread of its own, so the event loop never waits on the disk. Every
use of it takes a turn (:meth:`Database.turn`): a transaction is never interleaved with another
coroutine's statements on the same connection, and turns go in the order they were asked for. Writes are one ``BEGIN IMMEDIATE`` transaction each (the write
lock is taken up front, so a write cannot fail half-way on a busy database).
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
    stops waiting. The database's turn is taken before that task starts, so writes and reads still go
    in the order they were asked for.
    """
    @functools.wraps(method)
    async def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
        db: Database = self.db  # type: ignore[attr-defined]
        if _HOLDS_TURN.get():  # called from inside another write: it already has the turn
            return await method(self, *args, **kwargs)
        await db.lock.acquire()  # cancelled while waiting: nothing started, nothing to finish
        token = _HOLDS_TURN.set(True)
        try:
            task = asyncio.ensure_future(method(self, *args, **kwargs))  # the task inherits the turn
        except BaseException:
            db.lock.release()
            raise
        finally:
            _HOLDS_TURN.reset(token)
        task.add_done_callback(lambda _: db.lock.release())
        _UNFINISHED_WRITES.add(task)
        task.add_done_callback(_UNFINISHED_WRITES.discard)
        return await asyncio.shield(task)

    return wrapper


class Database:
    """One aiosqlite connection in autocommit mode, shared by the store's parts under one lock."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn: aiosqlite.Connection | None = conn
        self.lock = asyncio.Lock()  # whose turn it is; taken through turn() (or runs_to_completion)

    @classmethod
    async def open(cls, path: Path) -> Database:
        """Connect to an already migrated ``path`` with the pragmas of :func:`connect`."""
        conn = await aiosqlite.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            await conn.execute("PRAGMA synchronous=NORMAL")
            await conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            await conn.close()
            raise
        return cls(conn)

    @property
    def connection(self) -> aiosqlite.Connection:
        """The connection itself (use it inside :meth:`turn`); RuntimeError once closed."""
        if self._conn is None:
            raise RuntimeError("the store is closed")
        return self._conn

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection to this coroutine alone until the block ends (statements in autocommit)."""
        if _HOLDS_TURN.get():
            yield self.connection
            return
        async with self.lock:
            token = _HOLDS_TURN.set(True)
            try:
                yield self.connection
            finally:
                _HOLDS_TURN.reset(token)

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

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[aiosqlite.Connection]:
        """A read transaction, so several SELECTs see one state even while another process writes."""
        async with self.turn() as conn:
            await conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    await conn.execute("COMMIT")

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        """The first row of one statement (autocommit)."""
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        """Every row of one statement (autocommit)."""
        async with self.turn() as conn:
            return list(await conn.execute_fetchall(sql, tuple(params)))

    async def close(self) -> None:
        """Wait for the statement in progress, optimise and close; idempotent, later uses raise."""
        async with self.lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            with contextlib.suppress(sqlite3.Error):
                await conn.execute("PRAGMA optimize")
            await conn.close()
