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
from .jobs import JobManager
from .queue import JobQueue
from .storage import Store
from .views import JobButton

log = logging.getLogger(__name__)

COGS = ("cogs.edit", "cogs.results", "cogs.history", "cogs.admin")


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
        self.engine = WorkerPool(workers) if workers else WorkerPool.from_settings(config.engine)
        self.store: Store | None = None
        self.queue: JobQueue | None = None
        self.jobs: JobManager | None = None
        self.started_at = time.time()

    async def setup_hook(self) -> None:
        self.http_session = aiohttp.ClientSession()  # attachment downloads (see bot.downloads)
        self.store = await Store.open(self.config.data_dir)
        # Models load in the background: the bot is online at once and queues early jobs.
        self.engine.start()
        self.queue = JobQueue(self.engine.workers, on_event=self._on_job_event, max_total=self.config.max_queue,
                              stall_timeout=self.config.stall_timeout, replace_worker=self.engine.replace)
        self.jobs = JobManager(self, self.store, self.queue, self.engine, self.config.progress_interval)
        self.add_dynamic_items(JobButton)
        for name in COGS:
            await self.load_extension(name)
        self.tree.on_error = self.on_app_command_error
        await self._sync_commands()
        self.queue.start()

    async def _on_job_event(self, event) -> None:
        await self.jobs.on_event(event)

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
            if interaction.response.is_done():
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
        self.engine.shutdown()
        await super().close()
        if getattr(self, "http_session", None) is not None:
            await self.http_session.close()
        if self.store is not None:
            await self.store.close()
