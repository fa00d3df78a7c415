"""/mgie-admin settings, ban and unban: what a server's moderators control (Manage Server).

A separate top-level command from /mgie because Discord applies ``default_member_permissions`` to
top-level commands only: this way members without Manage Server never see these commands at all, and a
server can narrow them further in Server Settings > Integrations. The runtime check stays as a second
lock. The group allows both installs: a moderator who added the app to their own account can ban and
configure in a server the bot was never added to, since Discord itself reports their permissions with
each interaction, and every request made in that server, user-installed or not, is held to what they set.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import i18n, render
from bot.storage import MAX_BAN_REASON_CHARS, GuildSettings

if TYPE_CHECKING:
    from bot.bot import MgieBot

_LISTED_WORDS_CHARS = 800  # the settings reply must stay under Discord's 2000 characters
_NONE = ("none", "clear", "-")


@app_commands.default_permissions(manage_guild=True)
@app_commands.allowed_installs(guilds=True, users=True)
@app_commands.allowed_contexts(guilds=True, dms=False, private_channels=False)
class ModerationCog(commands.GroupCog, group_name="mgie-admin", name="Moderation",
                    group_description="Server moderation for MGIE (Manage Server)"):
    def __init__(self, bot: MgieBot) -> None:
        self.bot = bot
        super().__init__()

    @app_commands.command(name="settings", description="Server settings for MGIE (managers only)")
    @app_commands.describe(allowed_channels="Channel mentions or ids where /edit works ('all' for every channel)",
                           max_steps="Most denoising steps a job may ask for (1-200)",
                           user_pending_cap="Most edits one user may have waiting (1-20)",
                           refine_depth="Earlier turns put in the prompt when refining (0-10)",
                           blocked_words="Comma-separated words or phrases refused in instructions; "
                                         "replaces the list ('none' clears it)",
                           flagged_outputs="Results the safety check flags, outside age-restricted channels",
                           previews="Show a live preview of the image on the progress message while an edit runs")
    @app_commands.choices(flagged_outputs=[app_commands.Choice(name="send behind a spoiler", value="spoiler"),
                                           app_commands.Choice(name="withhold", value="withhold")])
    @app_commands.checks.has_permissions(manage_guild=True)
    async def settings(self, interaction: discord.Interaction, allowed_channels: str | None = None,
                       max_steps: int | None = None, user_pending_cap: int | None = None,
                       refine_depth: int | None = None, blocked_words: str | None = None,
                       flagged_outputs: str | None = None, previews: bool | None = None) -> None:
        changes: dict = {}
        loc = interaction.locale
        if previews is not None:
            changes["previews"] = previews
        if allowed_channels is not None:
            if allowed_channels.strip().lower() in ("all", "*", ""):
                changes["allowed_channel_ids"] = []
            else:
                ids = [int(x) for x in re.findall(r"\d{15,21}", allowed_channels)]
                if not ids:
                    await interaction.response.send_message(i18n.text("moderation.give_channels", loc),
                                                            ephemeral=True)
                    return
                changes["allowed_channel_ids"] = ids
        if flagged_outputs is not None:
            changes["flagged_outputs"] = flagged_outputs
        if blocked_words is not None:
            words = blocked_words.strip()
            changes["blocked_words"] = [] if words.lower() in _NONE else words.replace("\n", ",").split(",")
        for name, value in (("max_steps", max_steps), ("user_pending_cap", user_pending_cap),
                            ("refine_depth", refine_depth)):
            if value is not None:
                changes[name] = value
        try:
            settings = (await self.bot.store.update_guild_settings(interaction.guild_id, **changes) if changes
                        else await self.bot.store.guild_settings(interaction.guild_id))
        except ValueError as err:
            await interaction.response.send_message(_refused_setting(err, loc), ephemeral=True)
            return
        channels = (", ".join(f"<#{c}>" for c in settings.allowed_channel_ids)
                    or i18n.text("moderation.every_channel", loc))
        await interaction.response.send_message(
            i18n.text("moderation.settings", loc, channels=channels, max_steps=settings.max_steps,
                      pending=settings.user_pending_cap, depth=settings.refine_depth,
                      blocked=_listed_words(settings, loc),
                      flagged=i18n.text(f"moderation.flagged_{settings.flagged_outputs}", loc))
            + "\n" + _previews_line(settings, loc),
            ephemeral=True)

    @app_commands.command(name="ban", description="Stop a user from using MGIE in this server (managers only)")
    @app_commands.describe(user="Who may no longer use MGIE here", reason="Why (kept for moderators)")
    @app_commands.checks.has_permissions(manage_guild=True)
    async def ban(self, interaction: discord.Interaction, user: discord.User,
                  reason: app_commands.Range[str, 1, MAX_BAN_REASON_CHARS] | None = None) -> None:
        loc = interaction.locale
        if user.id == interaction.user.id:
            await interaction.response.send_message(i18n.text("moderation.cant_ban_self", loc), ephemeral=True)
            return
        store = self.bot.store
        if not await store.block_user(interaction.guild_id, user.id, reason=reason or "",
                                      blocked_by=interaction.user.id):
            earlier = await store.block_reason(interaction.guild_id, user.id)
            why = i18n.text("moderation.ban_reason", loc, reason=render.quote(earlier, 200)) if earlier else ""
            await interaction.response.send_message(i18n.text("moderation.already_banned", loc, user=user.mention,
                                                              why=why), ephemeral=True)
            return
        # A ban should also stop what they already queued here, or a full queue keeps serving them.
        waiting = [j for j in await store.recent_jobs(user.id, limit=50)
                   if j.guild_id == interaction.guild_id and j.state in ("queued", "running")]
        cancelled = sum(self.bot.queue.cancel(j.id) for j in waiting)
        note = i18n.text("moderation.ban_cancelled", loc, cancelled=cancelled) if cancelled else ""
        await interaction.response.send_message(i18n.text("moderation.banned", loc, user=user.mention, note=note),
                                                ephemeral=True)

    @app_commands.command(name="unban", description="Let a banned user use MGIE in this server again (managers only)")
    @app_commands.describe(user="Who may use MGIE here again")
    @app_commands.checks.has_permissions(manage_guild=True)
    async def unban(self, interaction: discord.Interaction, user: discord.User) -> None:
        key = "moderation.unbanned" if await self.bot.store.unblock_user(interaction.guild_id, user.id) \
            else "moderation.not_banned"
        message = i18n.text(key, interaction.locale, user=user.mention)
        await interaction.response.send_message(message, ephemeral=True)


def _previews_line(settings: GuildSettings, locale: object) -> str:
    state = i18n.text("previews.on" if settings.previews else "previews.off", locale)
    return i18n.text("previews.setting_line", locale, state=state)


def _refused_setting(err: ValueError, locale: object) -> str:
    """A setting the store refused (its English message, see bot/storage/guilds.py), in the reader's language."""
    matched = i18n.match_english(str(err), ("moderation",))
    if matched is None:
        return str(err)
    key, params = matched
    label = "moderation.label_" + re.sub(r"\W+", "_", params.get("label", "").lower()).strip("_")
    if label in i18n.catalogue(i18n.REFERENCE):
        params["label"] = i18n.text(label, locale)
    return i18n.text(key, locale, **params)


def _listed_words(settings: GuildSettings, locale: object = None) -> str:
    """The list for the manager who set it, in spoilers (others may be looking at their screen), cut short."""
    if not settings.blocked_words:
        return i18n.text("moderation.none", locale)
    shown: list[str] = []
    for word in settings.blocked_words:
        item = f"||{render.quote(word, 100)}||"
        if sum(len(s) + 2 for s in shown) + len(item) > _LISTED_WORDS_CHARS:
            shown.append(i18n.text("moderation.and_more", locale, more=len(settings.blocked_words) - len(shown)))
            break
        shown.append(item)
    return f"{len(settings.blocked_words)}: " + ", ".join(shown)


async def setup(bot: MgieBot) -> None:
    """discord.py extension entry point."""
    await bot.add_cog(ModerationCog(bot))
