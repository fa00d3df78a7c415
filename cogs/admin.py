"""/mgie status, /mgie settings (server managers) and /mgie cancel (your own queued edit)."""

from __future__ import annotations

import re

import discord
from discord import app_commands
from discord.ext import commands

from bot import render


class AdminCog(commands.GroupCog, group_name="mgie", name="Admin"):
    def __init__(self, bot) -> None:
        self.bot = bot
        super().__init__()

    @app_commands.command(name="status", description="Queue, model and GPU status")
    async def status(self, interaction: discord.Interaction) -> None:
        queue, engine = self.bot.queue, self.bot.engine
        counts = await self.bot.store.counts_by_state()
        average = await self.bot.store.average_duration()
        embed = discord.Embed(title="MGIE status", color=render.COLOR_OK)
        error = engine.error
        embed.add_field(name="Model", value=engine.state.value + (f" ({render.quote(error, 200)})" if error else ""))
        for info in engine.info():
            device = f"{info.get('device', info['name'])} {info.get('dtype', '')}".strip()
            memory = f" · {info['memory']}" if "memory" in info else ""
            embed.add_field(name=f"Worker {info['name']}", value=f"{info['state']} · {device}{memory}")
        embed.add_field(name="Queue", value=f"{queue.depth} waiting, {len(queue.running)} running")
        embed.add_field(name="Average edit", value=render.seconds(average) if average else "no edits yet")
        embed.add_field(name="All time", value=", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none")
        if engine.random_weights:
            embed.set_footer(text="Running on RANDOM test weights: outputs are noise.")
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @app_commands.command(name="settings", description="Server settings for MGIE (managers only)")
    @app_commands.describe(allowed_channels="Channel mentions or ids where /edit works ('all' for every channel)",
                           max_steps="Most denoising steps a job may ask for (1-200)",
                           user_pending_cap="Most edits one user may have waiting (1-20)",
                           refine_depth="Earlier turns put in the prompt when refining (0-10)")
    @app_commands.guild_only()
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.checks.has_permissions(manage_guild=True)
    async def settings(self, interaction: discord.Interaction, allowed_channels: str | None = None,
                       max_steps: int | None = None, user_pending_cap: int | None = None,
                       refine_depth: int | None = None) -> None:
        changes: dict = {}
        if allowed_channels is not None:
            if allowed_channels.strip().lower() in ("all", "*", ""):
                changes["allowed_channel_ids"] = []
            else:
                ids = [int(x) for x in re.findall(r"\d{15,21}", allowed_channels)]
                if not ids:
                    await interaction.response.send_message("Give channel mentions (#channel) or 'all'.",
                                                            ephemeral=True)
                    return
                changes["allowed_channel_ids"] = ids
        for name, value in (("max_steps", max_steps), ("user_pending_cap", user_pending_cap),
                            ("refine_depth", refine_depth)):
            if value is not None:
                changes[name] = value
        try:
            settings = (await self.bot.store.update_guild_settings(interaction.guild_id, **changes) if changes
                        else await self.bot.store.guild_settings(interaction.guild_id))
        except ValueError as err:
            await interaction.response.send_message(str(err), ephemeral=True)
            return
        channels = ", ".join(f"<#{c}>" for c in settings.allowed_channel_ids) or "every channel"
        await interaction.response.send_message(
            f"**MGIE settings**\nChannels: {channels}\nMax steps: {settings.max_steps}\n"
            f"Pending edits per user: {settings.user_pending_cap}\nRefine history depth: {settings.refine_depth}",
            ephemeral=True)

    @app_commands.command(name="cancel", description="Cancel your queued or running edit")
    async def cancel(self, interaction: discord.Interaction) -> None:
        jobs = [j for j in await self.bot.store.recent_jobs(interaction.user.id, limit=20)
                if j.state in ("queued", "running")]
        if not jobs:
            await interaction.response.send_message("You have no edit waiting.", ephemeral=True)
            return
        job = jobs[0]
        self.bot.queue.cancel(job.id)
        await interaction.response.send_message(f"Cancelling: {render.quote(job.instruction)}", ephemeral=True)


async def setup(bot) -> None:
    await bot.add_cog(AdminCog(bot))
