"""The discord.py bot: wires config, storage, the GPU worker, the fair queue and the cogs together."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, TypeVar

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from . import i18n
from .command_sync import sync_commands
from .comparison import HistoryPicker
from .config import BotConfig
from .deferred import tell_privately
from .i18n.commands import CatalogueTranslator
from .intake import IntakeSlots, JobRateLimiter
from .jobs import JobManager
from .metrics import BotMetrics
from .privacy import ForgetButton
from .queue import JobEvent, JobQueue
from .quiet_refusals import NoticeThrottle
from .redis_engine import RedisPool, redis_settings_from_env
from .retention import Retention
from .storage import Store
from .views import JobButton

if TYPE_CHECKING:
    from mgie_engine.worker import LocalWorker

log = logging.getLogger(__name__)

# A worker ends its current step before the process may exit (a step takes a fraction of a second on a GPU,
# seconds on a CPU); past this, exit anyway.
WORKER_STOP_SECONDS = 30.0
COGS = ("cogs.edit", "cogs.results", "cogs.history", "cogs.admin", "cogs.moderation", "cogs.stats")
T = TypeVar("T")


def _ready(part: T | None, name: str) -> T:
    if part is None:
        raise RuntimeError(f"the bot's {name} is made in setup_hook; it is not set up (yet)")
    return part


class MgieBot(commands.Bot):
    """The MGIE bot: one per process; cogs reach its parts through the typed properties below."""

    def __init__(self, config: BotConfig, workers: list[LocalWorker] | None = None) -> None:
        intents = discord.Intents.default()
        intents.message_content = config.message_content
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
        )
        self.config = config
        # One worker per GPU; the fair queue spreads jobs across them.
        # With MGIE_REDIS_URL the workers run elsewhere (mgie-worker) and this process loads no model.
        redis = None if workers else redis_settings_from_env()
        if redis is not None:
            self.engine = RedisPool(redis)
        else:  # torch and the model libraries are imported for local workers only (seconds)
            from mgie_engine.pool import WorkerPool

            self.engine = WorkerPool(workers) if workers else WorkerPool.from_settings(config.engine)
        # Made in setup_hook (they need the event loop or the database); reached through the properties below.
        self._store: Store | None = None
        self._queue: JobQueue | None = None
        self._jobs: JobManager | None = None
        self._retention: Retention | None = None
        self._rate_limiter: JobRateLimiter | None = None
        self._reply_notices: NoticeThrottle | None = None
        self.intake_slots = IntakeSlots()  # downloads and decodes of attachments at once
        self.metrics = BotMetrics()  # served at MGIE_METRICS_PORT when set (see bot.metrics)
        # Every task the bot starts: the loop keeps only weak references, so a task nobody holds can be
        # garbage-collected mid-run; and close() must be able to cancel them. Tasks leave the set when done.
        self.background_tasks: set[asyncio.Task] = set()
        self.started_at = time.time()
        self.http_session: aiohttp.ClientSession | None = None  # made in setup_hook (needs the loop)

    # -- the parts made in setup_hook ----------------------------------------------------------------
    @property
    def store(self) -> Store:
        """Jobs, server settings, bans and image files (SQLite + the data dir)."""
        return _ready(self._store, "store")

    @property
    def queue(self) -> JobQueue:
        """The fair queue in front of the GPU workers."""
        return _ready(self._queue, "queue")

    @property
    def jobs(self) -> JobManager:
        """Every job from its stored record to its delivered result."""
        return _ready(self._jobs, "jobs")

    @property
    def retention(self) -> Retention:
        """What is deleted when: old chains, storage over its cap, expired tokens, forget-me."""
        return _ready(self._retention, "retention")

    @property
    def rate_limiter(self) -> JobRateLimiter:
        """New jobs per user per minute (``MGIE_USER_JOBS_PER_MINUTE``)."""
        return _ready(self._rate_limiter, "rate_limiter")

    @property
    def reply_notices(self) -> NoticeThrottle:
        """How often a refused reply-refine may get a public notice (see bot.quiet_refusals)."""
        return _ready(self._reply_notices, "reply_notices")

    async def setup_hook(self) -> None:
        """Open storage, start the workers and the queue, load the cogs, sync commands if they changed."""
        self.http_session = aiohttp.ClientSession()  # attachment downloads (see bot.downloads)
        self._store = await Store.open(self.config.data_dir)
        # Models load in the background: the bot is online at once and queues early jobs.
        self.engine.start()
        self._retention = Retention(self._store, self.config.retention_days, self.config.max_storage_gb)
        self._queue = JobQueue(self.engine.workers, on_event=self._on_job_event, max_total=self.config.max_queue,
                               stall_timeout=self.config.stall_timeout, replace_worker=self.engine.replace)
        self._jobs = JobManager(self, self._store, self._queue, self.engine, self.config.progress_interval,
                                metrics=self.metrics)
        queue, engine = self._queue, self.engine
        self.metrics.watch(depth=lambda: queue.depth, running=lambda: len(queue.running),
                           workers=lambda: [(str(i["name"]), str(i["state"])) for i in engine.info()])
        if self.config.metrics_port:
            try:
                await self.metrics.serve(self.config.metrics_addr, self.config.metrics_port)
            except OSError as err:  # edits matter more than numbers: the bot runs on, and says why loudly
                log.error("no metrics endpoint: cannot listen on %s:%d (%s)", self.config.metrics_addr,
                          self.config.metrics_port, err)
        self._rate_limiter = JobRateLimiter(self.config.user_jobs_per_minute)
        self._reply_notices = NoticeThrottle()
        if isinstance(self.engine, RedisPool):
            self.engine.on_capacity = self._queue.wake  # a worker joined or left: release up to the free slots
        self.add_dynamic_items(JobButton, ForgetButton, HistoryPicker)
        for name in COGS:
            await self.load_extension(name)
        self.tree.on_error = self.on_app_command_error
        await self.tree.set_translator(CatalogueTranslator())  # localized names and descriptions (bot/i18n)
        await sync_commands(self, self._store.data_dir, self.config.guild_ids)
        # Before the gateway connects: on_ready comes seconds after interactions already queue new jobs, and
        # a recovery run then would take those for leftovers and queue them a second time.
        await self._jobs.recover()
        self._queue.start()
        self.spawn(self._retention.run(), name="mgie-retention")

    def spawn(self, coro, *, name: str | None = None) -> asyncio.Task:
        """Start ``coro`` as a task the bot holds until it ends; close() cancels it, a failure is logged."""
        task = asyncio.create_task(coro, name=name)
        self.background_tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.background_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    async def settle_events(self, timeout: float = 10.0) -> None:
        """Until the job-event handlers running now (status edits, deliveries) have finished."""
        busy = [t for t in self.background_tasks if t.get_name().startswith("mgie-event") and not t.done()]
        if busy:
            await asyncio.wait(busy, timeout=timeout)

    def _on_job_event(self, event: JobEvent) -> None:
        self.metrics.on_event(event)  # as emitted: the stage timings need the moment, not the handler's turn
        self.spawn(self.jobs.on_event(event), name=f"mgie-event-{event.kind}-{event.job_id[:8]}")

    async def on_message(self, message: discord.Message) -> None:
        """No prefix commands: everything is a slash command, and replies are handled by the Edit cog."""

    async def on_ready(self) -> None:
        """Connected (again after every reconnect); what a previous run left was resumed in setup_hook."""
        log.info("logged in as %s (%s) in %d guild(s)", self.user, self.user.id if self.user else "?", len(self.guilds))

    async def on_app_command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """Nothing a user does may end in Discord's bare "This interaction failed"."""
        locale = interaction.locale
        if isinstance(error, app_commands.MissingPermissions):
            message = i18n.text("errors.missing_user_permissions", locale)
        elif isinstance(error, app_commands.CheckFailure):
            message = str(error) or i18n.text("errors.check_failed", locale)
        elif isinstance(error, app_commands.TransformerError):
            message = i18n.text("errors.bad_value", locale, type=error.type.name.lower(), value=repr(error.value))
        else:
            log.error("command %s failed", interaction.command and interaction.command.name, exc_info=error)
            message = i18n.text("errors.command_failed", locale)
        try:
            await tell_privately(interaction, message)
        except discord.HTTPException:
            pass

    async def graceful_shutdown(self, grace: float) -> None:
        """SIGTERM: take no new jobs, give running ones up to `grace` seconds to finish, then close.

        Whatever is still queued or running stays so in the database and is resumed on the next start.
        """
        if self._queue is not None:
            self._queue.stop_accepting()
            deadline = time.monotonic() + grace
            while self._queue.running and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            if self._queue.running:
                log.warning("shutting down with %d job(s) unfinished; they resume on the next start",
                            len(self._queue.running))
            else:
                await asyncio.sleep(0.5)  # let the last result's message go out
        await self.close()

    async def close(self) -> None:
        """Stop the queue and every task, shut the workers down, then Discord, downloads and storage.

        Storage closes whatever failed before it: its connection thread would otherwise keep the process
        from exiting.
        """
        try:
            if self._queue is not None:
                self._queue.stop_accepting()
                await self._queue.stop()
            tasks = list(self.background_tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.intake_slots.close()
            await self.metrics.close()
            self.engine.shutdown()
            if not await asyncio.to_thread(self.engine.join, WORKER_STOP_SECONDS):
                log.warning("a worker is still inside a step after %.0f s; exiting anyway", WORKER_STOP_SECONDS)
            await super().close()
            if self.http_session is not None:
                await self.http_session.close()
        finally:
            if self._store is not None:
                await self._store.close()
