"""/mgie stats: a server's own last day and last week (edits, median wait, median edit time, failures).

For the server's managers (Manage Server, checked on each use: /mgie is open to everyone, so the command
cannot hide behind ``default_permissions``). Added to the /mgie group of the Admin cog from here, so the
feature stays in one file; whole-bot numbers are for the host, at ``MGIE_METRICS_PORT`` (bot/metrics.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import i18n, render
from bot.storage.jobs import GuildStats

if TYPE_CHECKING:
    from bot.bot import MgieBot

DAY = 86_400.0
WEEK = 7 * DAY


def _seconds(value: float | None, locale: object) -> str:
    if value is None:
        return i18n.text("stats.no_value", locale)
    return i18n.text("stats.seconds", locale, value=f"{value:.0f}" if value >= 10 else f"{value:.1f}")


def _summary(stats: GuildStats, locale: object) -> str:
    return i18n.text("stats.summary", locale, edits=stats.edits, failures=stats.failures,
                     wait=_seconds(stats.median_wait, locale), edit=_seconds(stats.median_edit, locale))


def stats_embed(day: GuildStats, week: GuildStats, locale: object) -> discord.Embed:
    """The private answer to /mgie stats."""
    embed = discord.Embed(title=i18n.text("stats.title", locale), color=render.COLOR_OK)
    embed.add_field(name=i18n.text("stats.last_day", locale), value=_summary(day, locale))
    embed.add_field(name=i18n.text("stats.last_week", locale), value=_summary(week, locale))
    embed.set_footer(text=i18n.text("stats.footer", locale))
    return embed


async def stats(interaction: discord.Interaction) -> None:
    """This server's numbers, privately, for members who may manage it."""
    locale = interaction.locale
    if interaction.guild_id is None:
        await interaction.response.send_message(i18n.text("stats.server_only", locale), ephemeral=True)
        return
    if not interaction.permissions.manage_guild:
        await interaction.response.send_message(i18n.text("stats.not_manager", locale), ephemeral=True)
        return
    bot: MgieBot = interaction.client  # type: ignore[assignment]
    now = time.time()
    day = await bot.store.guild_stats(interaction.guild_id, now - DAY)
    week = await bot.store.guild_stats(interaction.guild_id, now - WEEK)
    await interaction.response.send_message(embed=stats_embed(day, week, locale), ephemeral=True)


class StatsCog(commands.Cog, name="Stats"):
    """Holds /mgie stats while loaded: a subcommand of the Admin cog's /mgie group."""

    def __init__(self, bot: MgieBot) -> None:
        self.bot = bot
        self.command = app_commands.Command(name="stats", callback=stats,
                                            description="This server's edits, waits and failures (Manage Server)")

    async def cog_load(self) -> None:
        group = self._group()
        if group.get_command(self.command.name) is None:
            group.add_command(self.command)

    async def cog_unload(self) -> None:
        admin = self.bot.get_cog("Admin")  # gone already when the bot closes: the command went with it
        if admin is not None and isinstance(admin.app_command, app_commands.Group):
            admin.app_command.remove_command(self.command.name)

    def _group(self) -> app_commands.Group:
        admin = self.bot.get_cog("Admin")
        if admin is None or not isinstance(admin.app_command, app_commands.Group):
            raise RuntimeError("cogs.stats adds /mgie stats to the Admin cog's /mgie group: load cogs.admin first")
        return admin.app_command


async def setup(bot: MgieBot) -> None:
    """discord.py extension entry point."""
    await bot.add_cog(StatsCog(bot))
