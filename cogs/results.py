"""The buttons under a result (re-roll, stronger, closer, refine, compare, undo, delete) and cancel while queued.

Re-roll, Stronger, Closer and Refine by anyone start that person's own job (their own quota); Undo,
Delete and Cancel are the requester's, or a moderator's (Manage Messages).
"""

from __future__ import annotations

import dataclasses
import io
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from bot import i18n, job_requests, render
from bot.comparison import send_comparison
from bot.deferred import answer_failure
from bot.intake import Refusal
from bot.storage import JobRecord
from bot.views import result_view
from mgie_engine.instructions import MAX_INSTRUCTION_CHARS

if TYPE_CHECKING:
    from bot.bot import MgieBot

OWNER_ONLY = {"undo", "delete", "cancel"}


class RefineModal(discord.ui.Modal, title="Refine this edit"):
    # A Label (component type 18) names the input: TextInput's own label is deprecated since discord.py 2.6.
    instruction = discord.ui.Label(text="What should change next?", component=discord.ui.TextInput(
        placeholder="now make it night", max_length=MAX_INSTRUCTION_CHARS, custom_id="instruction"))

    def __init__(self, bot: MgieBot, source: JobRecord, locale: object = None) -> None:
        super().__init__(title=i18n.text("results.refine_title", locale))
        self.text_input: discord.ui.TextInput = self.instruction.component  # this modal's own copy
        self.instruction.text = i18n.text("results.refine_label", locale)
        self.text_input.placeholder = i18n.text("results.refine_placeholder", locale)
        self.bot, self.source = bot, source

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await job_requests.start_refine(self.bot, self.source, self.text_input.value, interaction.user,
                                        interaction.guild_id, interaction.channel_id, interaction=interaction)

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:
        await answer_failure(interaction, error)


def _is_moderator(interaction: discord.Interaction) -> bool:
    perms = interaction.permissions
    return bool(perms and (perms.manage_messages or perms.administrator))


class ResultsCog(commands.Cog, name="Results"):
    def __init__(self, bot: MgieBot) -> None:
        self.bot = bot

    async def on_button(self, interaction: discord.Interaction, action: str, job_id: str) -> None:
        """A press of one of a job's buttons (see bot.views.JobButton): check who may, then act on it."""
        source = await self.bot.store.get_job(job_id)
        if source is None:
            await interaction.response.send_message(i18n.text("results.no_record", interaction.locale),
                                                    ephemeral=True)
            return
        if action in OWNER_ONLY and interaction.user.id != source.user_id and not _is_moderator(interaction):
            await interaction.response.send_message(i18n.text("results.owner_only", interaction.locale,
                                                              owner=f"<@{source.user_id}>"),
                                                    ephemeral=True, allowed_mentions=discord.AllowedMentions.none())
            return
        handler = getattr(self, f"_on_{action}")
        try:
            await handler(interaction, source)
        except Exception as err:  # noqa: BLE001 - refusals and failures alike end in a private answer
            await answer_failure(interaction, err)

    # -- new jobs from a result (made in bot.job_requests) ------------------------------------------
    async def _on_reroll(self, interaction: discord.Interaction, source: JobRecord) -> None:
        await job_requests.start_variant(self.bot, interaction, source, "reroll")

    async def _on_stronger(self, interaction: discord.Interaction, source: JobRecord) -> None:
        await job_requests.start_variant(self.bot, interaction, source, "stronger")

    async def _on_closer(self, interaction: discord.Interaction, source: JobRecord) -> None:
        await job_requests.start_variant(self.bot, interaction, source, "closer")

    async def _on_refine(self, interaction: discord.Interaction, source: JobRecord) -> None:
        if source.state != "done":
            raise Refusal("results.not_finished")
        await interaction.response.send_modal(RefineModal(self.bot, source, interaction.locale))

    async def _on_compare(self, interaction: discord.Interaction, source: JobRecord) -> None:
        # Anyone may look; the answer is private to whoever pressed (bot.comparison).
        await send_comparison(self.bot, interaction, source)

    # -- owner actions ------------------------------------------------------------------------------
    async def _shown_on(self, message: discord.Message, maker: JobRecord) -> JobRecord:
        """The job whose result ``message`` shows now: its maker's, or an earlier step after an Undo."""
        shown = await self.bot.store.job_by_message(message.id)
        return shown if shown is not None else maker

    async def _on_undo(self, interaction: discord.Interaction, source: JobRecord) -> None:
        # `source` made this message (Undo and Delete carry the maker, see result_view), so it stays theirs
        # whichever step it shows.
        shown = await self._shown_on(interaction.message, source)
        previous = await self.bot.store.get_job(shown.parent_id) if shown.parent_id else None
        if previous is None or previous.state != "done":
            raise Refusal("results.nothing_to_undo")
        data = await self.bot.store.read_image(previous.output_image)
        if data is None:
            raise Refusal("results.previous_gone")
        filename = f"mgie-{previous.id[:8]}.png"
        # The message is about to show `previous`: replies and buttons on it act on that step.
        await self.bot.store.update_job(shown.id, result_message_id=None, status_message_id=None)
        await self.bot.store.update_job(previous.id, result_message_id=interaction.message.id)
        await interaction.response.edit_message(
            content=i18n.text("results.back_to_previous", source.locale),
            embed=render.result_embed(dataclasses.replace(previous, locale=source.locale), filename,
                                      self.bot.engine.random_weights),
            attachments=[discord.File(io.BytesIO(data), filename=filename)],
            view=result_view(previous.id, owner_job_id=source.id, locale=source.locale),
            allowed_mentions=discord.AllowedMentions.none())

    async def _on_delete(self, interaction: discord.Interaction, source: JobRecord) -> None:
        shown = await self._shown_on(interaction.message, source)
        await interaction.response.defer()
        await interaction.delete_original_response()
        for job in {shown.id: shown, source.id: source}.values():
            if job.result_message_id == interaction.message.id:
                await self.bot.store.update_job(job.id, result_message_id=None)

    async def _on_cancel(self, interaction: discord.Interaction, source: JobRecord) -> None:
        if source.state not in ("queued", "running") or not self.bot.queue.cancel(source.id):
            raise Refusal("results.not_running")
        await interaction.response.send_message(i18n.text("results.cancelling", interaction.locale), ephemeral=True)


async def setup(bot: MgieBot) -> None:
    """discord.py extension entry point."""
    await bot.add_cog(ResultsCog(bot))
