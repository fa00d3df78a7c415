"""The private before/after answer: one job's input and result side by side, for whoever asked.

Shared by the Compare button under a result (cogs/results.py) and the picker under /history
(cogs/history.py). Every answer is ephemeral; a result the safety check flagged follows the server's
policy for flagged outputs here too.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from typing import TYPE_CHECKING

import discord

from mgie_engine.errors import BadImageError

from . import i18n, render
from .compare import comparison_file
from .deferred import answer_failure, tell_privately
from .job_requests import upload_limit
from .jobs import DEFAULT_UPLOAD_LIMIT
from .storage import JobRecord

if TYPE_CHECKING:
    from .bot import MgieBot

log = logging.getLogger(__name__)

HISTORY_PICKER_ID = "mgie:history-compare"
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def _age_restricted(bot: MgieBot, channel_id: int) -> bool:
    channel = bot.get_channel(channel_id)
    return bool(getattr(channel, "nsfw", False) or (hasattr(channel, "is_nsfw") and channel.is_nsfw()))


async def _refusal(bot: MgieBot, job: JobRecord, locale: object) -> tuple[str | None, bytes, bytes]:
    """Why ``job`` cannot be compared (a message), or None and its (input, result) bytes."""
    if job.state in ("queued", "running"):
        return i18n.text("compare.not_finished", locale), b"", b""
    if job.state != "done":
        return i18n.text("compare.no_result", locale), b"", b""
    after = await bot.store.read_image(job.output_image)
    if after is None:
        return i18n.text("compare.result_gone", locale), b"", b""
    before = await bot.store.read_image(job.input_image)
    if before is None:
        return i18n.text("compare.input_gone", locale), b"", b""
    return None, before, after


async def send_comparison(bot: MgieBot, interaction: discord.Interaction, job: JobRecord) -> None:
    """Answer ``interaction`` privately with ``job``'s input and result side by side (or why not)."""
    locale = interaction.locale
    refusal, before, after = await _refusal(bot, job, locale)
    spoiler = False
    if refusal is None and job.flagged and not _age_restricted(bot, job.channel_id):
        if (await bot.store.guild_settings(job.guild_id)).flagged_outputs == "withhold":
            refusal = i18n.text("compare.withheld", locale)
        spoiler = True
    if refusal is not None:
        await tell_privately(interaction, refusal)
        return
    await interaction.response.defer(ephemeral=True, thinking=True)
    labels = (i18n.text("compare.before", locale), i18n.text("compare.after", locale))
    english = (i18n.text("compare.before"), i18n.text("compare.after"))
    limit = upload_limit(interaction) or DEFAULT_UPLOAD_LIMIT
    slots = bot.intake_slots  # the decode threads: bounded, and never the event loop
    try:
        async with slots.decode:
            data, ext = await asyncio.get_running_loop().run_in_executor(
                slots.executor, comparison_file, before, after, labels, limit, english)
    except BadImageError as err:
        log.warning("cannot compare job %s: a stored image does not decode (%s)", job.id, err)
        await tell_privately(interaction, i18n.text("compare.unreadable", locale))
        return
    filename = f"mgie-compare-{job.id[:8]}.{ext}"
    caption = i18n.text("compare.caption", locale, instruction=render.quote(job.instruction, 200))
    if bot.engine.random_weights:
        caption += f"\n-# {i18n.text('common.random_weights', locale)}"
    await interaction.edit_original_response(
        content=caption, attachments=[discord.File(io.BytesIO(data), filename=filename, spoiler=spoiler)],
        allowed_mentions=discord.AllowedMentions.none())


async def send_picked_comparison(bot: MgieBot, interaction: discord.Interaction, job_id: str) -> None:
    """A /history pick: the user's own job only (the picker lists only theirs; a forged pick is refused)."""
    job = await bot.store.get_job(job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None or job.user_id != interaction.user.id:
        await tell_privately(interaction, i18n.text("compare.not_yours", interaction.locale))
        return
    await send_comparison(bot, interaction, job)


def history_picker(jobs: list[JobRecord], locale: object) -> discord.ui.View | None:
    """A select under /history: pick one of the listed finished edits to see its before/after."""
    done = [job for job in jobs if job.state == "done" and job.output_image][:25]
    if not done:
        return None
    options = [discord.SelectOption(
        label=job.instruction[:100], value=job.id,
        description=i18n.text("compare.pick_detail", locale, seed=job.seed,
                              cfg=f"{job.text_cfg:g}/{job.image_cfg:g}")[:100]) for job in done]
    view = discord.ui.View(timeout=None)
    view.add_item(HistoryPicker(options, i18n.text("compare.pick", locale)))
    return view


class HistoryPicker(discord.ui.DynamicItem[discord.ui.Select], template=HISTORY_PICKER_ID):
    """The /history select; dynamic so a pick still works after a restart (its values are job ids)."""

    def __init__(self, options: list[discord.SelectOption] | None = None, placeholder: str | None = None) -> None:
        super().__init__(discord.ui.Select(custom_id=HISTORY_PICKER_ID, options=options or [],
                                           placeholder=placeholder, min_values=1, max_values=1))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Select, match: re.Match[str]):
        return cls()

    async def callback(self, interaction: discord.Interaction) -> None:
        values = (interaction.data or {}).get("values") or []
        try:
            await send_picked_comparison(interaction.client, interaction, str(values[0]) if values else "")
        except Exception as err:  # noqa: BLE001 - whatever it was, the user hears of it privately
            await answer_failure(interaction, err)
