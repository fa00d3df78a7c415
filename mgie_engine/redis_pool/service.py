"""One `mgie-worker` process: a :class:`LocalWorker` (models loaded once, batching inside) fed from the job
stream. ``XREADGROUP COUNT`` is the worker's free slots; claims are renewed while the worker makes progress;
each result is committed atomically and only while this worker still owns the job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import socket
import threading
import time

from ..errors import JobCancelledError, MgieError
from ..protocol import JobProgress, WorkerState
from ..worker import LocalWorker
from . import payloads
from .connection import BLOCK_MS, RedisSettings
from .streams import Delivery, StreamProtocol

log = logging.getLogger(__name__)


def _mode_fields(worker: LocalWorker) -> dict:
    """The heartbeat's mode and compiles during service (serving_modes.py), once the worker has loaded
    (read without a CUDA call: the heartbeat runs beside the GPU thread)."""
    if worker.pipeline is None:
        return {}
    info = worker.modes.info()
    return {"mode": info["mode"], "compiles": info["compiles"]}


def consumer_name(device: str) -> str:
    """host:pid:device, unique per process: the consumer in the group and the heartbeat key's name."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:60] or "host"
    return f"{host}:{os.getpid()}:{re.sub(r'[^A-Za-z0-9_.-]', '-', device)}"


@dataclasses.dataclass
class _Running:
    delivery: Delivery
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    started: float = dataclasses.field(default_factory=time.monotonic)
    lost: bool = False  # the reclaimer gave it to another worker: never commit it here


class WorkerService:
    def __init__(self, worker: LocalWorker, proto: StreamProtocol, consumer: str) -> None:
        self.worker, self.proto, self.consumer = worker, proto, consumer
        self.settings: RedisSettings = proto.settings
        self.running: dict[str, _Running] = {}
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False

    @property
    def free(self) -> int:
        if self.worker.state is not WorkerState.READY or self._stopping:
            return 0
        return max(self.worker.capacity - len(self.running), 0)

    async def run(self, stop: asyncio.Event, grace: float = 30.0) -> int:
        """Take jobs until ``stop`` is set, then let running ones finish (up to ``grace``). Returns an exit code."""
        await self._retrying(self.proto.ensure_groups)
        background = [asyncio.create_task(self._heartbeat_loop(), name="mgie-heartbeat"),
                      asyncio.create_task(self._renew_loop(), name="mgie-renew")]
        self.worker.start()
        ready = asyncio.ensure_future(self.worker.wait_ready())
        await asyncio.wait({ready, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if self.worker.state is WorkerState.FAILED:
            log.error("worker %s could not load the models: %s", self.consumer, self.worker.error)
            code = 1
        else:
            log.info("worker %s taking jobs (%d at once)", self.consumer, self.worker.capacity)
            while not stop.is_set():
                await self._take_jobs(stop)
        self._stopping = True
        deadline = time.monotonic() + grace
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.running:
            log.warning("stopping with %d job(s) unfinished; live workers take them over", len(self.running))
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        try:
            await self.proto.forget_worker(self.consumer)
        except Exception:  # Redis gone: the heartbeat key expires by itself
            pass
        self.worker.shutdown()
        # The process must not exit while the worker thread is inside a torch call (a daemon thread woken during
        # interpreter shutdown aborts the process: "terminate called without an active exception", exit -6).
        if not await asyncio.to_thread(self.worker.join, max(deadline - time.monotonic(), 5.0)):
            log.warning("worker %s is still inside a step; exiting anyway", self.consumer)
        return code

    async def _take_jobs(self, stop: asyncio.Event) -> None:
        import redis.exceptions as rex

        free = self.free
        if free <= 0:
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), 0.5)
            except TimeoutError:
                pass
            return
        try:
            deliveries = await self.proto.claim_stale(self.consumer, free)
            if len(deliveries) < free:
                deliveries += await self.proto.fetch(self.consumer, free - len(deliveries), BLOCK_MS)
        except rex.ResponseError as err:
            if "NOGROUP" in str(err):
                await self._retrying(self.proto.ensure_groups)
                return
            raise
        except (rex.ConnectionError, rex.TimeoutError, OSError) as err:
            log.warning("Redis unreachable (%s); retrying", type(err).__name__)
            await asyncio.sleep(1.0)
            return
        for delivery in deliveries:
            await self._start(delivery)

    async def _start(self, delivery: Delivery) -> None:
        if not delivery.job_id or delivery.body is None:
            log.warning("dropping malformed job entry %s", delivery.entry_id)
            await self.proto.discard(delivery)
            return
        if delivery.entry_id in self.running:
            # XAUTOCLAIM gave this worker its own entry back (its renewals paused while the job made no visible
            # progress): the run already going on here keeps it; a second run beside it would only waste a slot.
            log.warning("job %s: this worker's own claim went stale (delivery %d); its run here goes on",
                        delivery.job_id, delivery.deliveries)
            return
        if delivery.deliveries > self.settings.max_deliveries:
            await self.proto.dead_letter(delivery.entry_id, delivery.job_id, self.consumer)
            return
        if delivery.deliveries > 1:
            log.info("job %s taken over (delivery %d)", delivery.job_id, delivery.deliveries)
        running = _Running(delivery)
        self.running[delivery.entry_id] = running
        task = asyncio.create_task(self._run_job(running), name=f"mgie-job-{delivery.job_id[:8]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_job(self, running: _Running) -> None:
        delivery = running.delivery
        status, outcome = "failed", None
        error: str | payloads.Failure | None = None
        try:
            image = await self.proto.read_input(delivery.job_id)
            if image is None:
                raise MgieError("The input image expired before a GPU worker was free; please send it again.")
            job = payloads.decode_job(delivery.body, image)
            if job.job_id != delivery.job_id:
                raise payloads.BadPayloadError("job id mismatch")
            if await self.proto.is_cancelled(job.job_id):
                raise JobCancelledError("The edit was cancelled.")
            outcome = await self.worker.run(job, self._progress, running.cancel)
            status = "done"
        except JobCancelledError:
            if self._stopping and not running.cancel.is_set():
                # This worker stopped under the job (shut down past the grace): no result, so its entry stays
                # pending and a live worker reclaims it, as after a crash.
                log.info("job %s left for another worker (this one is stopping)", delivery.job_id)
                self.running.pop(delivery.entry_id, None)
                return
            status = "cancelled"
        except payloads.BadPayloadError as err:
            log.warning("job %s arrived malformed: %s", delivery.job_id, err)
            error = "This edit's data was damaged on the way to the GPU worker; please try again."
        except MgieError as err:
            error = payloads.failure_of(err)  # its key, params and cause go along: the bot tells it like its own
        except Exception as err:  # a bug or a device fault: the job fails, the worker goes on
            log.exception("job %s failed", delivery.job_id)
            name = type(err).__name__
            error = payloads.Failure(f"Something went wrong on the GPU ({name}); the error is logged.",
                                     "engine.gpu_failed", {"error": name[:payloads.MAX_PARAM_TEXT]},
                                     payloads.ENGINE_ERROR)
        try:
            await self._commit(running, status, outcome, error)
        finally:
            self.running.pop(delivery.entry_id, None)
            self._slot_freed.set()

    async def _commit(self, running: _Running, status: str, outcome, error: str | payloads.Failure | None) -> None:
        import redis.exceptions as rex

        delivery = running.delivery
        while not running.lost:
            try:
                if await self.proto.commit(self.consumer, delivery, status, outcome, error):
                    log.info("job %s %s%s", delivery.job_id, status, f" ({error})" if error else "")
                else:
                    log.info("job %s was taken over by another worker; its result here is dropped", delivery.job_id)
                return
            except (rex.ConnectionError, rex.TimeoutError, OSError) as err:
                log.warning("could not commit job %s yet (%s); retrying", delivery.job_id, type(err).__name__)
                await asyncio.sleep(1.0)
        log.info("job %s was taken over by another worker; not committing it here", delivery.job_id)

    def _progress(self, progress: JobProgress) -> None:
        task = asyncio.ensure_future(self.proto.publish_progress(progress))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # progress is best effort

    async def _renew_loop(self) -> None:
        """Renew the claims of jobs that are progressing: a worker whose GPU thread hangs stops renewing, and
        its jobs go to live workers after the reclaim time. Also picks up cancels made on other hosts."""
        stall = self.settings.reclaim_idle * 0.6
        while True:
            await asyncio.sleep(self.settings.renew_interval)
            now = time.monotonic()
            mine = {e: r.delivery.job_id for e, r in self.running.items()
                    if now - max(self.worker.heartbeat, r.started) < stall}
            try:
                answers = await self.proto.renew(self.consumer, mine)
            except Exception as err:
                log.warning("could not renew claims (%s)", type(err).__name__)
                continue
            for entry_id, (owned, cancelled) in answers.items():
                running = self.running.get(entry_id)
                if running is None:
                    continue
                if not owned:
                    running.lost = True
                if cancelled or not owned:
                    running.cancel.set()

    async def _heartbeat_loop(self) -> None:
        while True:
            state = "stopping" if self._stopping else self.worker.state.value
            try:
                await self.proto.heartbeat(self.consumer, state=state, capacity=0 if self._stopping else
                                           (self.worker.capacity if state == "ready" else 0),
                                           active=len(self.running), device=self.worker.settings.device,
                                           random_weights=self.worker.random_weights, error=self.worker.error,
                                           **_mode_fields(self.worker))
            except Exception as err:
                log.warning("could not send heartbeat (%s)", type(err).__name__)
            await asyncio.sleep(self.settings.renew_interval)

    async def _retrying(self, call) -> None:
        import redis.exceptions as rex

        while True:
            try:
                return await call()
            except (rex.ConnectionError, rex.TimeoutError, OSError) as err:
                log.warning("Redis unreachable (%s); retrying", type(err).__name__)
                await asyncio.sleep(1.0)
