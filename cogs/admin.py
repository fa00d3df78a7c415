"""/mgie status, /mgie cancel (your own queued edit), /mgie forget-me (delete what the bot stores about
you) and /mgie help, for everyone; moderation is in cogs/moderation.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import i18n, privacy, render
from bot.help import help_embed

if TYPE_CHECKING:
    from bot.bot import MgieBot


@app_commands.allowed_installs(guilds=True, users=True)
@app_commands.allowed_contexts(guilds=True, dms=True, private_channels=True)
class AdminCog(commands.GroupCog, group_name="mgie", name="Admin",
               group_description="MGIE: help, status, cancel, forget-me"):
    def __init__(self, bot: MgieBot) -> None:
        self.bot = bot
        super().__init__()

    @app_commands.command(name="status", description="Queue, model and GPU status")
    async def status(self, interaction: discord.Interaction) -> None:
        queue, engine = self.bot.queue, self.bot.engine
        loc = interaction.locale

        def t(key: str, **params: object) -> str:
            return i18n.text(f"admin.{key}", loc, **params)

        counts = await self.bot.store.counts_by_state()
        average = await self.bot.store.average_duration()
        embed = discord.Embed(title=t("status_title"), color=render.COLOR_OK)
        error = engine.error
        embed.add_field(name=t("model"), value=_state(engine.state.value, loc)
                        + (f" ({render.quote(error, 200)})" if error else ""))
        for info in engine.info():
            device = f"{info.get('device', info['name'])} {info.get('dtype', '')}".strip()
            memory = f" · {info['memory']}" if "memory" in info else ""
            mode = f" · {engine_mode(info['mode'], loc)}" if info.get("mode") else ""
            embed.add_field(name=t("worker", name=info["name"]),
                            value=f"{_state(info['state'], loc)} · {device}{memory}{mode}")
        embed.add_field(name=t("queue"), value=t("queue_value", waiting=queue.depth, running=len(queue.running)))
        embed.add_field(name=t("average_edit"), value=render.seconds(average, loc) if average else t("no_edits_yet"))
        embed.add_field(name=t("all_time"), value=", ".join(f"{_state(k, loc)} {v}" for k, v in sorted(counts.items()))
                        or t("none"))
        embed.add_field(name=t("storage"), value=self.bot.retention.describe(await self.bot.retention.disk_use(), loc))
        if engine.random_weights:
            embed.set_footer(text=t("random_weights"))
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @app_commands.command(name="cancel", description="Cancel your queued or running edit")
    async def cancel(self, interaction: discord.Interaction) -> None:
        jobs = [j for j in await self.bot.store.recent_jobs(interaction.user.id, limit=20)
                if j.state in ("queued", "running")]
        if not jobs:
            await interaction.response.send_message(i18n.text("admin.nothing_waiting", interaction.locale),
                                                    ephemeral=True)
            return
        job = jobs[0]
        self.bot.queue.cancel(job.id)
        await interaction.response.send_message(i18n.text("admin.cancelling", interaction.locale,
                                                          instruction=render.quote(job.instruction)), ephemeral=True)

    @app_commands.command(name="forget-me", description="Delete everything MGIE stores about you (asks first)")
    async def forget_me(self, interaction: discord.Interaction) -> None:
        text, stored = await privacy.describe(self.bot, interaction.user.id, interaction.locale)
        if not stored:
            await interaction.response.send_message(text, ephemeral=True)
            return
        await interaction.response.send_message(text, view=privacy.confirm_view(interaction.user.id, interaction.locale),
                                                ephemeral=True)

    @app_commands.command(name="help", description="What MGIE does, good instructions, presets and CFG")
    async def help_command(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(embed=help_embed(interaction.locale), ephemeral=True)


def _state(value: str, locale: object) -> str:
    """A worker's or job's state ("ready", "done"...) in the reader's language; unknown ones as they are."""
    key = f"admin.state_{value}"
    return i18n.text(key, locale) if key in i18n.catalogue(i18n.REFERENCE) else value


async def setup(bot: MgieBot) -> None:
    """discord.py extension entry point."""
    await bot.add_cog(AdminCog(bot))


# A worker's mode (mgie_engine/serving_modes.py) -> its name in the catalogue.
_MODES = {"eager": "eager", "eager (compiling)": "compiling", "compiled": "compiled",
          "eager (compile failed)": "compile_failed"}


def engine_mode(mode: str, locale: object) -> str:
    """A worker's mode ("mode: compiled") in the reader's language; an unknown mode is shown as it came."""
    name = _MODES.get(mode)
    return i18n.text("engine_mode.label", locale, mode=i18n.text(f"engine_mode.{name}", locale) if name else mode)
