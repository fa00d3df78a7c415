"""/history: a user's recent edits and how each chain of refinements went, with a before/after picker."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import render
from bot.comparison import history_picker

if TYPE_CHECKING:
    from bot.bot import MgieBot


class HistoryCog(commands.Cog, name="History"):
    def __init__(self, bot: MgieBot) -> None:
        self.bot = bot

    @app_commands.command(name="history", description="Your recent MGIE edits")
    @app_commands.allowed_installs(guilds=True, users=True)
    @app_commands.allowed_contexts(guilds=True, dms=True, private_channels=True)
    async def history(self, interaction: discord.Interaction) -> None:
        """The user's last ten edits, each with its chain of refinements."""
        jobs = await self.bot.store.recent_jobs(interaction.user.id, limit=10)
        if not jobs:
            await interaction.response.send_message("You have no edits yet. Try `/edit`.", ephemeral=True)
            return
        embed = discord.Embed(title="Your recent edits", color=render.COLOR_OK)
        for job in jobs:
            when = discord.utils.format_dt(datetime.datetime.fromtimestamp(job.created_at, datetime.UTC), "R")
            chain = await self.bot.store.chain(job.id, limit=10)
            steps = " → ".join(render.quote(r.instruction, 40) for r in chain)
            value = f"{job.state} · {when} · seed {job.seed} · CFG {job.text_cfg:g}/{job.image_cfg:g}\n{steps}"
            if job.expressive:
                value += f"\n*{render.quote(job.expressive, 150)}*"
            embed.add_field(name=render.quote(job.instruction, 200), value=value[:1024], inline=False)
        picker = history_picker(jobs, interaction.locale) or discord.utils.MISSING
        await interaction.response.send_message(embed=embed, ephemeral=True, view=picker)


async def setup(bot: MgieBot) -> None:
    """discord.py extension entry point."""
    await bot.add_cog(HistoryCog(bot))
