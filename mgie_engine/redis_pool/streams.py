"""The stream protocol both sides speak: the bot submits, reclaims and reads results; workers fetch, renew
and commit. One job stream with one consumer group of workers; image bytes in their own keys with a TTL;
results announced on a results stream; progress as small Pub/Sub messages; heartbeats as keys with a TTL.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ..protocol import EditJob, EditOutcome, JobProgress
from . import payloads, scripts
from .connection import RedisSettings
from .keys import BOTS_GROUP, WORKERS_GROUP, Keys

log = logging.getLogger(__name__)

RESULTS_MAXLEN = 10_000
DEAD_MESSAGE = ("This edit stopped its GPU worker {n} times, so it was set aside instead of being tried again. "
                "Try a smaller image or fewer steps; the server admin can see it in the dead-letter stream.")


@dataclasses.dataclass(frozen=True)
class Delivery:
    """A job entry handed to a worker: its stream id, the job's id, its JSON body, how often delivered."""

    entry_id: str
    job_id: str
    body: bytes | None
    deliveries: int = 1


@dataclasses.dataclass(frozen=True)
class Pending:
    entry_id: str
    consumer: str
    idle_ms: int
    deliveries: int


def _s(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class StreamProtocol:
    def __init__(self, redis_client: Any, settings: RedisSettings) -> None:
        self.redis, self.settings = redis_client, settings
        self.keys = Keys(settings.prefix)
        self._submit = redis_client.register_script(scripts.SUBMIT)
        self._renew = redis_client.register_script(scripts.RENEW)
        self._commit = redis_client.register_script(scripts.COMMIT)
        self._dead = redis_client.register_script(scripts.DEAD_LETTER)
        self._claim_cursor = "0-0"

    async def ensure_groups(self) -> None:
        """Create the consumer groups (and streams) unless they exist: after a Redis restart that lost them too."""
        import redis.exceptions as rex

        for stream, group in ((self.keys.jobs, WORKERS_GROUP), (self.keys.results, BOTS_GROUP)):
            try:
                await self.redis.xgroup_create(stream, group, id="0", mkstream=True)
            except rex.ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise

    # -- the bot's side -------------------------------------------------------------------------------
    async def submit(self, job: EditJob) -> str:
        """Put a job on the stream unless it is there already or has a result: "done", "queued" or the new id."""
        if len(job.image) > payloads.MAX_INPUT_BYTES:
            raise payloads.BadPayloadError("input image too large for the pool")
        k = self.keys
        reply = await self._submit(keys=[k.jobs, k.ref(job.job_id), k.result(job.job_id), k.input(job.job_id)],
                                   args=[payloads.encode_job(job), job.image, self.settings.blob_ttl])
        return _s(reply)

    async def locate(self, job_ids: list[str]) -> dict[str, str | None]:
        """For reconciling: "result", "stream" (waiting or pending) or None (lost: submit it again)."""
        out: dict[str, str | None] = {}
        for job_id in job_ids:
            if await self.redis.exists(self.keys.result(job_id)):
                out[job_id] = "result"
                continue
            ref = await self.redis.get(self.keys.ref(job_id))
            in_stream = bool(ref) and bool(await self.redis.xrange(self.keys.jobs, _s(ref), _s(ref)))
            out[job_id] = "stream" if in_stream else None
        return out

    async def read_result(self, job_id: str) -> tuple[str, EditOutcome | None, str | None] | None:
        """(status, outcome, error text), or None while the job has no result."""
        result = await self.read_result_failure(job_id)
        if result is None:
            return None
        status, outcome, failure = result
        return status, outcome, failure.text if failure is not None else None

    async def read_result_failure(self, job_id: str) -> tuple[str, EditOutcome | None, payloads.Failure | None] | None:
        """(status, outcome, :class:`payloads.Failure` with its key, params and cause), or None while pending."""
        meta = await self.redis.getrange(self.keys.result(job_id), 0, payloads.MAX_META_JSON)
        if not meta:
            return None
        png = await self.redis.getrange(self.keys.result_png(job_id), 0, payloads.MAX_RESULT_BYTES)
        return payloads.decode_result_failure(job_id, meta, png or None)

    async def request_cancel(self, job_id: str) -> None:
        await self.redis.set(self.keys.cancel(job_id), b"1", ex=self.settings.blob_ttl)

    async def result_announcements(self, consumer: str, block_ms: int) -> list[str]:
        """Job ids with a new result (acknowledged at once: the result key, not this entry, is the truth)."""
        reply = await self.redis.xreadgroup(BOTS_GROUP, consumer, {self.keys.results: ">"}, count=100, block=block_ms)
        ids, entry_ids = [], []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                entry_ids.append(entry_id)
                try:
                    ids.append(payloads.job_id((fields or {}).get(b"job")))
                except payloads.BadPayloadError:
                    log.warning("ignoring a malformed results entry %s", _s(entry_id))
        if entry_ids:
            await self.redis.xack(self.keys.results, BOTS_GROUP, *entry_ids)
        return ids

    async def stale_pending(self, count: int = 100) -> list[Pending]:
        """Entries whose claim was not renewed for the reclaim time: their worker stopped. Empty while the group
        does not exist yet (a bot that starts before any worker, or a Redis restart that lost it)."""
        import redis.exceptions as rex

        try:
            rows = await self.redis.xpending_range(self.keys.jobs, WORKERS_GROUP, "-", "+", count,
                                                   idle=int(self.settings.reclaim_idle * 1000))
        except rex.ResponseError as err:
            if "NOGROUP" not in str(err):
                raise
            return []
        return [Pending(_s(r["message_id"]), _s(r["consumer"]), int(r["time_since_delivered"]),
                        int(r["times_delivered"])) for r in rows]

    async def dead_letter(self, entry_id: str, job_id: str, consumer: str = "") -> bool:
        """Move an entry at the delivery limit to the dead-letter stream and fail its job (owner- or idle-checked)."""
        k, n = self.keys, self.settings.max_deliveries
        meta = payloads.encode_result("dead", error=DEAD_MESSAGE.format(n=n))
        done = await self._dead(keys=[k.jobs, k.result(job_id), k.results, k.input(job_id), k.ref(job_id), k.dead],
                                args=[WORKERS_GROUP, entry_id, consumer, int(self.settings.reclaim_idle * 1000), n,
                                      job_id, meta, self.settings.result_ttl, RESULTS_MAXLEN])
        if done:
            log.warning("job %s dead-lettered after %d deliveries", job_id, n)
        return bool(done)

    async def entry_job_id(self, entry_id: str) -> str | None:
        rows = await self.redis.xrange(self.keys.jobs, entry_id, entry_id)
        if not rows:
            return None
        try:
            return _job_of(rows[0][1])
        except payloads.BadPayloadError:
            return None

    async def live_workers(self) -> list[dict[str, Any]]:
        """The heartbeats of workers alive now (expired keys are gone): capacity and state of each."""
        names = [_s(n) for n in await self.redis.smembers(self.keys.workers)][:1000]
        if not names:
            return []
        raws = await self.redis.mget([self.keys.worker(n) for n in names])
        gone = [n for n, raw in zip(names, raws, strict=True) if raw is None]
        if gone:
            await self.redis.srem(self.keys.workers, *gone)
        out = []
        for raw in raws:
            if raw is None:
                continue
            try:
                out.append(payloads.decode_heartbeat(raw))
            except payloads.BadPayloadError as err:
                log.warning("ignoring a malformed worker heartbeat: %s", err)
        return out

    # -- the worker's side ----------------------------------------------------------------------------
    async def fetch(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        reply = await self.redis.xreadgroup(WORKERS_GROUP, consumer, {self.keys.jobs: ">"}, count=count,
                                            block=block_ms)
        return [_delivery(entry_id, fields, 1) for _stream, entries in reply or [] for entry_id, fields in entries]

    async def claim_stale(self, consumer: str, count: int) -> list[Delivery]:
        """XAUTOCLAIM entries whose worker stopped renewing (min-idle = reclaim time), with their delivery counts."""
        reply = await self.redis.xautoclaim(self.keys.jobs, WORKERS_GROUP, consumer,
                                            int(self.settings.reclaim_idle * 1000), self._claim_cursor, count=count)
        # XAUTOCLAIM scans at most 10 x COUNT pending entries a call: go on from where it stopped next time.
        self._claim_cursor = _s(reply[0]) if reply else "0-0"
        entries = reply[1] if reply and len(reply) > 1 else []
        out = []
        for entry_id, fields in entries:
            if fields is None:
                continue  # deleted while pending (7.0 drops those from the pending list itself)
            rows = await self.redis.xpending_range(self.keys.jobs, WORKERS_GROUP, entry_id, entry_id, 1, consumer)
            out.append(_delivery(entry_id, fields, int(rows[0]["times_delivered"]) if rows else 1))
        return out

    async def read_input(self, job_id: str) -> bytes | None:
        data = await self.redis.getrange(self.keys.input(job_id), 0, payloads.MAX_INPUT_BYTES)
        if data and len(data) > payloads.MAX_INPUT_BYTES:
            raise payloads.BadPayloadError("input image larger than the cap")
        return data or None

    async def renew(self, consumer: str, owned: dict[str, str]) -> dict[str, tuple[bool, bool]]:
        """Renew the claims on ``{entry_id: job_id}``: {entry_id: (still owned, cancel requested)}."""
        if not owned:
            return {}
        entry_ids = list(owned)
        reply = await self._renew(keys=[self.keys.jobs, *(self.keys.cancel(owned[e]) for e in entry_ids)],
                                  args=[WORKERS_GROUP, consumer, *entry_ids])
        return {e: (bool(reply[2 * i]), bool(reply[2 * i + 1])) for i, e in enumerate(entry_ids)}

    async def is_cancelled(self, job_id: str) -> bool:
        return bool(await self.redis.exists(self.keys.cancel(job_id)))

    async def commit(self, consumer: str, delivery: Delivery, status: str, outcome: EditOutcome | None = None,
                     error: str | payloads.Failure | None = None) -> bool:
        """The result, its announcement and the XACK, atomically, only if ``consumer`` still owns the entry."""
        k, job_id = self.keys, delivery.job_id
        png = outcome.png if outcome is not None else b""
        done = await self._commit(
            keys=[k.jobs, k.result(job_id), k.result_png(job_id), k.results, k.input(job_id), k.ref(job_id)],
            args=[WORKERS_GROUP, consumer, delivery.entry_id, job_id, status,
                  payloads.encode_result(status, outcome, error), png, self.settings.result_ttl, RESULTS_MAXLEN])
        return bool(done)

    async def discard(self, delivery: Delivery) -> None:
        """Drop a malformed entry (it could never run): acknowledged and deleted, logged by the caller."""
        await self.redis.xack(self.keys.jobs, WORKERS_GROUP, delivery.entry_id)
        await self.redis.xdel(self.keys.jobs, delivery.entry_id)

    async def publish_progress(self, progress: JobProgress) -> None:
        """A progress tick on the channel; a preview first goes to its own key (short TTL), never the channel."""
        if progress.preview:
            await self.redis.set(self.keys.preview(progress.job_id), progress.preview, ex=payloads.PREVIEW_TTL)
        await self.redis.publish(self.keys.progress, payloads.encode_progress(progress))

    async def read_preview(self, job_id: str) -> bytes | None:
        """The job's latest preview, checked (``payloads.check_preview``); None when it has expired."""
        raw = await self.redis.get(self.keys.preview(job_id))
        return None if raw is None else payloads.check_preview(raw)

    async def heartbeat(self, consumer: str, **fields: Any) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.worker(consumer), payloads.encode_heartbeat(name=consumer, **fields),
                     px=int(self.settings.heartbeat_ttl * 1000))
            pipe.sadd(self.keys.workers, consumer)
            await pipe.execute()

    async def forget_worker(self, consumer: str) -> None:
        await self.redis.delete(self.keys.worker(consumer))
        await self.redis.srem(self.keys.workers, consumer)


def _job_of(fields: Any) -> str:
    body = (fields or {}).get(b"job")
    data = payloads._loads(body, payloads.MAX_JOB_JSON, "job")
    return payloads.job_id(data.get("id"))


def _delivery(entry_id: Any, fields: Any, deliveries: int) -> Delivery:
    body = (fields or {}).get(b"job")
    try:
        job_id = _job_of(fields)
    except payloads.BadPayloadError:
        job_id = ""
    return Delivery(_s(entry_id), job_id, body if isinstance(body, bytes) else None, deliveries)
