"""The bot's engine when ``MGIE_REDIS_URL`` is set: GPU workers on other hosts, reached through Redis Streams.

:class:`RedisPool` offers what the fair queue and the cogs use of the in-process :class:`WorkerPool`
(``workers``, ``state``, ``error``, ``random_weights``, ``info``, ``start``, ``shutdown``) and loads no
model. Its one queue-facing worker, :class:`RemoteWorker`, has a ``capacity`` equal to the sum of the live
workers' heartbeat capacities, so the fair queue releases jobs only up to the pool's free slots and SQLite
keeps the order. A reclaimer dead-letters jobs that stopped their workers too often; a reconciler submits
again what a Redis restart lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mgie_engine.errors import JobCancelledError, MgieError
from mgie_engine.protocol import EditJob, EditOutcome, ProgressCallback, WorkerState
from mgie_engine.redis_pool import payloads
from mgie_engine.redis_pool.connection import BLOCK_MS, RedisSettings, RedisSetupError, check_server, client
from mgie_engine.redis_pool.streams import StreamProtocol

from . import i18n
from .failure_causes import BAD_INPUT, ENGINE_ERROR, STORAGE

log = logging.getLogger(__name__)

BOT_CONSUMER = "bot"
WATCH_INTERVAL = 1.0  # heartbeats and the reclaimer
RECONCILE_INTERVAL = 5.0


class JobDeadLetteredError(MgieError):
    """The job stopped its workers too often and was moved to the dead-letter stream; the message says so."""

    failure_cause = "dead_letter"  # bot.failure_causes.DEAD_LETTER: the metrics count it apart


class RemoteJobError(MgieError):
    """A job failed on a worker: its English text, and the message key, params and cause the worker sent
    where the bot knows them (:func:`remote_error`), so the queue reports it like an error of its own."""

    def __init__(self, message: str, key: str | None, params: dict[str, object], cause: str) -> None:
        super().__init__(message, key=key)
        self.params = params  # set apart: a param may be named like MgieError's own arguments
        self.failure_cause = cause


WORKER_FAILED = "The edit failed on a GPU worker."  # engine.worker_failed: a failure that came without text


WORKER_CAUSES = (BAD_INPUT, ENGINE_ERROR, STORAGE)  # what a worker may say of its own failure


def _known_message(key: str | None, params: dict[str, object]) -> bool:
    """Whether ``key`` is an engine or errors message of the catalogue whose placeholders ``params`` fill."""
    if key is None or key.split(".", 1)[0] not in ("engine", "errors"):
        return False
    template = i18n.catalogue(i18n.REFERENCE).get(key)
    return template is not None and i18n.placeholders(template) <= params.keys()


def remote_error(failure: payloads.Failure | None) -> RemoteJobError:
    """The error for a failure read from Redis (a trust boundary): a key the catalogue lacks, or whose
    placeholders the params leave open, is dropped (its English text is matched instead, as for workers
    that send only text); a worker may only name the causes a worker can know (bad input, engine, storage):
    anything else, a dead letter or a lost worker included (those are the bot's to say), is an engine error."""
    if failure is None:
        return RemoteJobError(WORKER_FAILED, "engine.worker_failed", {}, ENGINE_ERROR)
    known = _known_message(failure.key, failure.params)
    if failure.key and not known:
        log.warning("a worker's failure named message %r, which this bot cannot show; using its text",
                    failure.key[:80])
    return RemoteJobError(failure.text, failure.key if known else None, dict(failure.params) if known else {},
                          failure.cause if failure.cause in WORKER_CAUSES else ENGINE_ERROR)


def _connection_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions as rex

    return (rex.ConnectionError, rex.TimeoutError, OSError)


def redis_settings_from_env() -> RedisSettings | None:
    """The pool's settings, or None for the in-process default. Raises RedisSetupError when malformed."""
    return RedisSettings.from_env()


async def check_redis(settings: RedisSettings) -> str:
    """At start: reachable, password right, version 7+ (RedisSetupError with one line otherwise)."""
    conn = client(settings)
    try:
        return await check_server(conn, settings)
    finally:
        await conn.aclose()


class RemoteWorker:
    """The whole remote pool as the fair queue's single worker (``protocol.Worker``); capacity follows the
    live heartbeats. Its ``heartbeat`` is always now: the queue's watchdog never replaces it, because the
    reclaimer moves a stalled worker's jobs to live workers instead."""

    name = "redis-pool"

    def __init__(self, pool: RedisPool) -> None:
        self.pool = pool

    @property
    def capacity(self) -> int:
        return self.pool.capacity

    @property
    def state(self) -> WorkerState:
        return self.pool.state

    @property
    def error(self) -> str | None:
        return self.pool.error

    @property
    def heartbeat(self) -> float:
        return time.monotonic()

    def start(self) -> None:
        """Nothing to load here: the pool's connections start with the bot (``RedisPool.start``)."""

    async def wait_ready(self) -> WorkerState:
        return WorkerState.READY  # dispatch is held back by capacity (0 until a worker's heartbeat arrives)

    async def run(self, job: EditJob, on_progress: ProgressCallback | None = None,
                  cancel: threading.Event | None = None) -> EditOutcome:
        return await self.pool.run_job(job, on_progress, cancel)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state.value, "error": self.error, "max_batch": self.capacity}

    def shutdown(self) -> None:
        """The pool's connections close with the bot (``RedisPool.shutdown``); remote workers go on."""

    def join(self, timeout: float) -> bool:
        """No threads of its own to wait for."""
        return True


class RedisPool:
    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.workers = [RemoteWorker(self)]
        self.capacity = 0
        self.on_capacity: Callable[[], None] | None = None  # the bot wakes the fair queue's dispatcher with it
        self._heartbeats: list[dict[str, Any]] = []
        self._futures: dict[str, asyncio.Future] = {}
        self._progress: dict[str, ProgressCallback | None] = {}
        self._jobs: dict[str, EditJob] = {}
        self._tasks: list[asyncio.Task] = []
        self._conn: Any = None
        self.proto: StreamProtocol | None = None
        self.reconnects = 0

    # -- what the bot reads -----------------------------------------------------------------------
    @property
    def state(self) -> WorkerState:
        states = {w["state"] for w in self._heartbeats}
        if "ready" in states:
            return WorkerState.READY
        if states and states <= {"failed"}:
            return WorkerState.FAILED
        return WorkerState.LOADING

    @property
    def error(self) -> str | None:
        if not self._heartbeats:
            return "no GPU worker connected to the pool yet"
        return next((w["error"] for w in self._heartbeats if w.get("error")), None)

    @property
    def random_weights(self) -> bool:
        return any(w["random_weights"] for w in self._heartbeats)

    def info(self) -> list[dict[str, Any]]:
        return [{"name": w["name"], "state": w["state"], "device": f"{w['device']} · {w['active']}/{w['capacity']} jobs",
                 **({"mode": w["mode"], "compiles": w.get("compiles", 0)} if w.get("mode") else {})}
                for w in self._heartbeats]

    def replace(self, worker: Any) -> Any:
        return worker  # remote workers are never replaced by the bot: the reclaimer moves their jobs instead

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._conn = client(self.settings)
        self.proto = StreamProtocol(self._conn, self.settings)
        for coro, name in ((self._results_loop(), "results"), (self._progress_loop(), "progress"),
                           (self._watch_loop(), "watch")):
            self._tasks.append(asyncio.create_task(coro, name=f"mgie-redis-{name}"))

    def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                asyncio.get_running_loop().create_task(conn.aclose())
            except RuntimeError:
                pass

    def join(self, timeout: float) -> bool:
        """Nothing to wait for here: the models and their threads live in the workers' processes."""
        return True

    # -- one job ----------------------------------------------------------------------------------
    async def run_job(self, job: EditJob, on_progress: ProgressCallback | None,
                      cancel: threading.Event | None) -> EditOutcome:
        """Release the job to the stream (idempotently: a restarted bot may release it again) and wait for its
        result; a cancel is passed on to whichever worker has it."""
        job = await _with_bytes(job)
        future = asyncio.get_running_loop().create_future()
        self._futures[job.job_id], self._progress[job.job_id], self._jobs[job.job_id] = future, on_progress, job
        try:
            await self._submit(job)
            cancel_sent = False
            while not future.done():
                if cancel is not None and cancel.is_set() and not cancel_sent:
                    cancel_sent = await self._try(self.proto.request_cancel(job.job_id))
                await asyncio.wait({future}, timeout=0.25)
            status, outcome, error = future.result()
        finally:
            self._futures.pop(job.job_id, None)
            self._progress.pop(job.job_id, None)
            self._jobs.pop(job.job_id, None)
        if status == "done" and outcome is not None:
            return outcome
        if status == "cancelled":
            raise JobCancelledError("The edit was cancelled.")
        if status == "dead":
            raise JobDeadLetteredError(error.text if error is not None else WORKER_FAILED)
        raise remote_error(error)

    async def _submit(self, job: EditJob) -> None:
        while True:
            try:
                where = await self.proto.submit(job)
            except payloads.BadPayloadError as err:
                raise MgieError("This image is too large for the GPU workers.") from err
            except _connection_errors() as err:
                log.warning("Redis unreachable while releasing job %s (%s); retrying", job.job_id, type(err).__name__)
                await asyncio.sleep(1.0)
                continue
            if where == "done":
                await self._resolve(job.job_id)
            return

    async def _resolve(self, job_id: str) -> None:
        future = self._futures.get(job_id)
        if future is None or future.done():
            return  # not waited for now: the result key keeps it until the job is released again
        try:
            result = await self.proto.read_result_failure(job_id)
        except payloads.BadPayloadError as err:
            log.warning("the result of job %s is malformed: %s", job_id, err)
            result = ("failed", None,
                      payloads.Failure("The GPU worker's answer was damaged on the way back; please try again."))
        if result is not None and not future.done():
            future.set_result(result)

    async def _try(self, coro) -> bool:
        try:
            await coro
            return True
        except _connection_errors():
            return False

    # -- background loops -------------------------------------------------------------------------
    async def _results_loop(self) -> None:
        import redis.exceptions as rex

        groups_ok = False
        while True:
            try:
                if not groups_ok:
                    await self.proto.ensure_groups()
                    groups_ok = True
                for job_id in await self.proto.result_announcements(BOT_CONSUMER, BLOCK_MS):
                    await self._resolve(job_id)
            except rex.ResponseError as err:
                if "NOGROUP" not in str(err):
                    log.warning("results: %s", err)
                groups_ok = False
                await asyncio.sleep(0.5)
            except _connection_errors() as err:
                log.warning("Redis unreachable (%s); retrying", type(err).__name__)
                groups_ok = False
                self.reconnects += 1
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("results loop")
                await asyncio.sleep(1.0)

    async def _progress_loop(self) -> None:
        while True:
            pubsub = self._conn.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.proto.keys.progress)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        progress, has_preview = payloads.decode_progress_message(message.get("data"))
                    except payloads.BadPayloadError:
                        continue
                    callback = self._progress.get(progress.job_id)
                    if callback is not None:
                        if has_preview:
                            progress = dataclasses.replace(progress, preview=await self._preview(progress.job_id))
                        callback(progress)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.info("progress channel dropped (%s); subscribing again", type(err).__name__)
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    async def _preview(self, job_id: str) -> bytes | None:
        """A job's latest preview from its key (checked and size-capped); None when gone or malformed."""
        try:
            return await self.proto.read_preview(job_id)
        except payloads.BadPayloadError as err:
            log.warning("the preview of job %s is malformed: %s", job_id, err)
        except _connection_errors():
            pass  # best effort: the next tick brings another
        return None

    async def _watch_loop(self) -> None:
        """Heartbeats -> capacity; the reclaimer's dead letters; reconciling SQLite's view with Redis."""
        last_reconcile = 0.0
        while True:
            try:
                self._heartbeats = await self.proto.live_workers()
                capacity = sum(w["capacity"] for w in self._heartbeats if w["state"] == "ready")
                if capacity != self.capacity:
                    log.info("pool capacity %d -> %d (%d worker(s))", self.capacity, capacity, len(self._heartbeats))
                    self.capacity = capacity
                    if self.on_capacity is not None:
                        self.on_capacity()
                await self._dead_letters()
                if time.monotonic() - last_reconcile > RECONCILE_INTERVAL:
                    await self.reconcile()
                    last_reconcile = time.monotonic()
            except _connection_errors() as err:
                log.warning("Redis unreachable (%s); retrying", type(err).__name__)
                last_reconcile = 0.0  # reconcile as soon as it is back
            except Exception:
                log.exception("pool watch loop")
            await asyncio.sleep(WATCH_INTERVAL)

    async def _dead_letters(self) -> None:
        """Jobs whose worker stopped renewing are taken over by live workers (XAUTOCLAIM); those delivered
        ``max_deliveries`` times already go to the dead-letter stream instead, and their users are told."""
        for pending in await self.proto.stale_pending():
            if pending.deliveries < self.settings.max_deliveries:
                continue
            job_id = await self.proto.entry_job_id(pending.entry_id)
            if job_id is not None:
                await self.proto.dead_letter(pending.entry_id, job_id)

    async def reconcile(self) -> None:
        """Every job the bot waits for must have a result or a stream entry (waiting or pending); one in neither
        (Redis restarted and lost its last second) is released again."""
        waiting = [job_id for job_id, future in self._futures.items() if not future.done()]
        if not waiting:
            return
        for job_id, where in (await self.proto.locate(waiting)).items():
            if where == "result":
                await self._resolve(job_id)
            elif where is None and job_id in self._jobs:
                log.warning("job %s was in neither the stream nor the pending list; releasing it again", job_id)
                await self.proto.submit(self._jobs[job_id])


async def _with_bytes(job: EditJob) -> EditJob:
    """The job with its input's bytes: queued jobs name a file on the bot's disk, which workers cannot read."""
    if isinstance(job.image, bytes | bytearray):
        return job
    try:
        data = await asyncio.to_thread(Path(job.image).read_bytes)
    except OSError as err:
        log.warning("input of job %s unreadable: %s", job.job_id, err)
        raise MgieError("The input image of this edit was lost on the server; please send it again.") from None
    return dataclasses.replace(job, image=data)


__all__ = ["JobDeadLetteredError", "RedisPool", "RemoteJobError", "RemoteWorker", "RedisSetupError", "check_redis",
           "redis_settings_from_env", "remote_error"]
