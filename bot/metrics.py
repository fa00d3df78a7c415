"""Numbers for hosts: Prometheus metrics of the queue, the workers and each job's life, and their endpoint.

One :class:`BotMetrics` per bot, on a registry of its own (tests run several bots in one process, and
the process-wide default registry would mix them). The bot feeds it through two small hooks:
:meth:`BotMetrics.on_event` sees every queue event as it is emitted (waits and stage timings, from the
progress events the workers already send), and :meth:`BotMetrics.job_ended` is called where a job's final
state is written (results and failures by cause). Queue depth and worker states are read at scrape time.

With ``MGIE_METRICS_PORT`` the registry is served at ``/metrics`` by aiohttp on the bot's own event loop:
a scrape reads the queue and workers from the thread that owns them, and rendering the text takes well
under a millisecond, so the loop is never held up.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mgie_engine.protocol import JobStage

from .failure_causes import DEAD_LETTER, ENGINE_ERROR, FAILURE_CAUSES
from .queue import EventKind, JobEvent

log = logging.getLogger(__name__)

OUTCOMES = ("done", "failed", "cancelled", "dead_lettered")
STAGES = ("language", "denoise", "decode", "total")
WORKER_STATES = ("loading", "ready", "failed")
# Seconds. Waits run from nothing to many minutes on a busy server; a stage from a few milliseconds on a
# GPU (a cached language stage) to minutes on a CPU.
WAIT_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

WorkerStates = Callable[[], Iterable[tuple[str, str]]]  # (worker name, state) for each worker now


@dataclasses.dataclass
class _StageClock:
    """When a running job passed each stage boundary (time.monotonic()), from its progress events."""

    started: float
    language_start: float | None = None
    language_end: float | None = None
    decode_start: float | None = None


class _WorkerStateCollector(Collector):
    """``mgie_workers{worker, state}``: 1 for each worker's current state, 0 for its other states."""

    def __init__(self, states: WorkerStates) -> None:
        self.states = states

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("mgie_workers", "Workers by name and state (1 = the state it is in now).",
                                   labels=["worker", "state"])
        try:
            current = list(self.states())
        except Exception:  # a scrape must never fail because one worker could not say how it is
            log.exception("could not read the workers' states for the metrics")
            current = []
        for name, state in current:
            for known in dict.fromkeys((*WORKER_STATES, state)):
                family.add_metric([name, known], 1.0 if known == state else 0.0)
        yield family


class BotMetrics:
    """The bot's metrics on a private registry, and (optionally) the HTTP endpoint serving them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("mgie_queue_depth", "Jobs waiting in the fair queue (not running yet).", registry=r)
        self.running = Gauge("mgie_jobs_running", "Jobs on a worker now.", registry=r)
        self.wait = Histogram("mgie_wait_seconds", "Seconds a job waited in the queue before a worker took it.",
                              buckets=WAIT_BUCKETS, registry=r)
        self.stage = Histogram("mgie_edit_stage_seconds", "Seconds an edit spent in each stage "
                               "(language = instruction and guidance, denoise, decode; total = start to result).",
                               ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.results = Counter("mgie_results", "Jobs ended, by outcome.", ["outcome"], registry=r)
        self.failures = Counter("mgie_failures", "Failed jobs by cause (a fixed set of words, never the error text).",
                                ["cause"], registry=r)
        self.previews = Counter("mgie_previews_sent", "Preview images sent while edits ran.", registry=r)
        for stage in STAGES:  # every series exists from the start, so rates and alerts see zeros, not gaps
            self.stage.labels(stage)
        for outcome in OUTCOMES:
            self.results.labels(outcome)
        for cause in FAILURE_CAUSES:
            self.failures.labels(cause)
        self._clocks: dict[str, _StageClock] = {}
        self._runner: web.AppRunner | None = None

    # -- what is read at scrape time ------------------------------------------------------------------
    def watch(self, depth: Callable[[], int], running: Callable[[], int], workers: WorkerStates) -> None:
        """Read the queue's depth, its running jobs and the workers' states whenever metrics are collected."""
        self.queue_depth.set_function(depth)
        self.running.set_function(running)
        self.registry.register(_WorkerStateCollector(workers))

    # -- hooks --------------------------------------------------------------------------------------
    def on_event(self, event: JobEvent) -> None:
        """A queue event as it is emitted: waits on start, stage boundaries from progress, timings at the end."""
        now, job_id = time.monotonic(), event.job_id
        if event.kind is EventKind.STARTED:
            if event.waited is not None:
                self.wait.observe(max(event.waited, 0.0))
            self._clocks[job_id] = _StageClock(started=now)
        elif event.kind is EventKind.PROGRESS:
            clock, progress = self._clocks.get(job_id), event.progress
            if clock is None or progress is None:
                return
            if progress.stage == JobStage.LANGUAGE:
                if clock.language_start is None:
                    clock.language_start = now
                if progress.step >= progress.total and clock.language_end is None:
                    clock.language_end = now
            elif progress.stage == JobStage.DENOISE:
                clock.language_end = clock.language_end or now
            elif progress.stage == JobStage.DECODE:
                clock.language_end = clock.language_end or now
                clock.decode_start = clock.decode_start or now
        elif event.kind is EventKind.DONE:
            clock = self._clocks.pop(job_id, None)
            if clock is not None:
                self._observe_stages(clock, now)
        else:  # failed, cancelled, or given back to the queue: its timings would describe no whole edit
            self._clocks.pop(job_id, None)

    def _observe_stages(self, clock: _StageClock, done: float) -> None:
        self.stage.labels("total").observe(done - clock.started)
        if clock.language_end is not None:
            self.stage.labels("language").observe(clock.language_end - (clock.language_start or clock.started))
            if clock.decode_start is not None:
                self.stage.labels("denoise").observe(clock.decode_start - clock.language_end)
        if clock.decode_start is not None:
            self.stage.labels("decode").observe(done - clock.decode_start)

    def job_ended(self, state: str, cause: str | None = None) -> None:
        """A job's final state was stored: ``done``, ``cancelled`` or ``failed`` (with its cause word)."""
        if state == "failed":
            cause = cause if cause in FAILURE_CAUSES else ENGINE_ERROR
            self.results.labels("dead_lettered" if cause == DEAD_LETTER else "failed").inc()
            self.failures.labels(cause).inc()
        elif state in OUTCOMES:
            self.results.labels(state).inc()

    def preview_sent(self) -> None:
        """A preview image went out on a job's progress message (``mgie_previews_sent_total``)."""
        self.previews.inc()

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)

    # -- the endpoint -------------------------------------------------------------------------------
    async def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` on ``host:port`` from this event loop until :meth:`close`."""
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("metrics at http://%s:%d/metrics", host, port)

    async def _scrape(self, request: web.Request) -> web.Response:
        return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def close(self) -> None:
        """Stop serving (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
