"""/history: a user's recent edits and how each chain of refinements went, with a before/after picker."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import i18n, render
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
        loc = interaction.locale
        jobs = await self.bot.store.recent_jobs(interaction.user.id, limit=10)
        if not jobs:
            await interaction.response.send_message(i18n.text("history.empty", loc), ephemeral=True)
            return
        embed = discord.Embed(title=i18n.text("history.title", loc), color=render.COLOR_OK)
        for job in jobs:
            when = discord.utils.format_dt(datetime.datetime.fromtimestamp(job.created_at, datetime.UTC), "R")
            chain = await self.bot.store.chain(job.id, limit=10)
            steps = " → ".join(render.quote(r.instruction, 40) for r in chain)
            value = i18n.text("history.entry", loc, state=i18n.text(f"history.state_{job.state}", loc), when=when,
                              seed=job.seed, text_cfg=f"{job.text_cfg:g}", image_cfg=f"{job.image_cfg:g}") + f"\n{steps}"
            if job.expressive:
                value += f"\n*{render.quote(job.expressive, 150)}*"
            embed.add_field(name=render.quote(job.instruction, 200), value=value[:1024], inline=False)
        picker = history_picker(jobs, interaction.locale) or discord.utils.MISSING
        await interaction.response.send_message(embed=embed, ephemeral=True, view=picker)


async def setup(bot: MgieBot) -> None:
    """discord.py extension entry point."""
    await bot.add_cog(HistoryCog(bot))
