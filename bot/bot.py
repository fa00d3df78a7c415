"""The discord.py bot: wires config, storage, the GPU worker, the fair queue and the cogs together."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from mgie_engine.pool import WorkerPool
from mgie_engine.worker import LocalWorker

from .config import BotConfig
from .deferred import fail_after_defer
from .intake import IntakeSlots
from .jobs import JobManager
from .privacy import ForgetButton
from .queue import JobEvent, JobQueue
from .redis_engine import RedisPool, redis_settings_from_env
from .retention import Retention
from .storage import Store
from .views import JobButton

log = logging.getLogger(__name__)

# A worker ends its current step before the process may exit (a step takes a fraction of a second on a GPU,
# seconds on a CPU); past this, exit anyway.
WORKER_STOP_SECONDS = 30.0
COGS = ("cogs.edit", "cogs.results", "cogs.history", "cogs.admin", "cogs.moderation")


class MgieBot(commands.Bot):
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
        self.engine = (WorkerPool(workers) if workers else RedisPool(redis) if redis is not None
                       else WorkerPool.from_settings(config.engine))
        self.store: Store | None = None
        self.queue: JobQueue | None = None
        self.jobs: JobManager | None = None
        self.retention: Retention | None = None
        self.intake_slots = IntakeSlots()  # downloads and decodes of attachments at once
        # Every task the bot starts: the loop keeps only weak references, so a task nobody holds can be
        # garbage-collected mid-run; and close() must be able to cancel them. Tasks leave the set when done.
        self.background_tasks: set[asyncio.Task] = set()
        self.started_at = time.time()

    async def setup_hook(self) -> None:
        self.http_session = aiohttp.ClientSession()  # attachment downloads (see bot.downloads)
        self.store = await Store.open(self.config.data_dir)
        # Models load in the background: the bot is online at once and queues early jobs.
        self.engine.start()
        self.retention = Retention(self.store, self.config.retention_days, self.config.max_storage_gb)
        self.queue = JobQueue(self.engine.workers, on_event=self._on_job_event, max_total=self.config.max_queue,
                              stall_timeout=self.config.stall_timeout, replace_worker=self.engine.replace)
        self.jobs = JobManager(self, self.store, self.queue, self.engine, self.config.progress_interval)
        if isinstance(self.engine, RedisPool):
            self.engine.on_capacity = self.queue.wake  # a worker joined or left: release up to the free slots
        self.add_dynamic_items(JobButton, ForgetButton)
        for name in COGS:
            await self.load_extension(name)
        self.tree.on_error = self.on_app_command_error
        await self._sync_commands()
        self.queue.start()
        self.spawn(self.retention.run(), name="mgie-retention")

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
        self.spawn(self.jobs.on_event(event), name=f"mgie-event-{event.kind}-{event.job_id[:8]}")

    async def _sync_commands(self) -> None:
        if self.config.guild_ids:
            for gid in self.config.guild_ids:
                guild = discord.Object(gid)
                self.tree.copy_global_to(guild=guild)
                await self.tree.sync(guild=guild)
        else:
            await self.tree.sync()

    async def on_message(self, message: discord.Message) -> None:
        """No prefix commands: everything is a slash command, and replies are handled by the Edit cog."""

    async def on_ready(self) -> None:
        log.info("logged in as %s (%s) in %d guild(s)", self.user, self.user.id if self.user else "?", len(self.guilds))
        if not getattr(self, "_recovered", False):
            self._recovered = True
            await self.jobs.recover()

    async def on_app_command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        """Nothing a user does may end in Discord's bare "This interaction failed"."""
        if isinstance(error, app_commands.CheckFailure):
            message = str(error) or "You can't use that here."
        elif isinstance(error, app_commands.TransformerError):
            message = f"That value doesn't work for {error.type.name.lower()}: {error.value!r}."
        else:
            log.error("command %s failed", interaction.command and interaction.command.name, exc_info=error)
            message = "Something went wrong on my side; the error is logged."
        try:
            if interaction.response.type is discord.InteractionResponseType.deferred_channel_message:
                await fail_after_defer(interaction, message)  # a plain follow-up would replace it publicly
            elif interaction.response.is_done():
                await interaction.followup.send(message, ephemeral=True)
            else:
                await interaction.response.send_message(message, ephemeral=True)
        except discord.HTTPException:
            pass

    async def graceful_shutdown(self, grace: float) -> None:
        """SIGTERM: take no new jobs, give running ones up to `grace` seconds to finish, then close.

        Whatever is still queued or running stays so in the database and is resumed on the next start.
        """
        if self.queue is not None:
            self.queue.stop_accepting()
            deadline = time.monotonic() + grace
            while self.queue.running and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            if self.queue.running:
                log.warning("shutting down with %d job(s) unfinished; they resume on the next start",
                            len(self.queue.running))
            else:
                await asyncio.sleep(0.5)  # let the last result's message go out
        await self.close()

    async def close(self) -> None:
        if self.queue is not None:
            self.queue.stop_accepting()
            await self.queue.stop()
        tasks = list(self.background_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.intake_slots.close()
        self.engine.shutdown()
        if not await asyncio.to_thread(self.engine.join, WORKER_STOP_SECONDS):
            log.warning("a worker is still inside a step after %.0f s; exiting anyway", WORKER_STOP_SECONDS)
        await super().close()
        if getattr(self, "http_session", None) is not None:
            await self.http_session.close()
        if self.store is not None:
            await self.store.close()
