"""The buttons under a result (re-roll, stronger, closer, refine, undo, delete) and cancel while queued.

Re-roll, Stronger, Closer and Refine by anyone start that person's own job (their own quota); Undo,
Delete and Cancel are the requester's, or a moderator's (Manage Messages).
"""

from __future__ import annotations

import io
import logging

import discord
from discord.ext import commands

from bot import render
from bot.intake import Refusal, check_access
from bot.jobs import new_seed
from bot.queue import QueueFullError
from bot.storage import JobRecord
from bot.views import result_view
from mgie_engine.errors import MgieError
from mgie_engine.instructions import MAX_INSTRUCTION_CHARS, normalize_instruction
from mgie_engine.options import IMAGE_CFG_RANGE, TEXT_CFG_RANGE

log = logging.getLogger(__name__)

STRONGER_STEP = 1.0  # text CFG added by "Stronger edit"
CLOSER_STEP = 0.5  # image CFG added by "Closer to original"
OWNER_ONLY = {"undo", "delete", "cancel"}


class RefineModal(discord.ui.Modal, title="Refine this edit"):
    instruction = discord.ui.TextInput(label="What should change next?", placeholder="now make it night",
                                       max_length=MAX_INSTRUCTION_CHARS, custom_id="instruction")

    def __init__(self, cog: ResultsCog, source: JobRecord) -> None:
        super().__init__()
        self.cog, self.source = cog, source

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.cog.refine(self.source, self.instruction.value, interaction.user, interaction.guild_id,
                              interaction.channel_id, interaction=interaction)


def _is_moderator(interaction: discord.Interaction) -> bool:
    perms = interaction.permissions
    return bool(perms and (perms.manage_messages or perms.administrator))


class ResultsCog(commands.Cog, name="Results"):
    def __init__(self, bot) -> None:
        self.bot = bot

    async def on_button(self, interaction: discord.Interaction, action: str, job_id: str) -> None:
        source = await self.bot.store.get_job(job_id)
        if source is None:
            await interaction.response.send_message("I have no record of that edit any more.", ephemeral=True)
            return
        if action in OWNER_ONLY and interaction.user.id != source.user_id and not _is_moderator(interaction):
            await interaction.response.send_message(f"Only <@{source.user_id}> or a moderator can do that.",
                                                    ephemeral=True, allowed_mentions=discord.AllowedMentions.none())
            return
        handler = getattr(self, f"_on_{action}")
        try:
            await handler(interaction, source)
        except MgieError as err:
            if interaction.response.is_done():
                await interaction.followup.send(str(err), ephemeral=True)
            else:
                await interaction.response.send_message(str(err), ephemeral=True)

    # -- new jobs from a result -----------------------------------------------------------------------
    async def _on_reroll(self, interaction: discord.Interaction, source: JobRecord) -> None:
        await self._variant(interaction, source, "reroll", seed=new_seed())

    async def _on_stronger(self, interaction: discord.Interaction, source: JobRecord) -> None:
        if source.text_cfg >= TEXT_CFG_RANGE[1]:
            raise Refusal(f"Text guidance is already at its maximum ({TEXT_CFG_RANGE[1]:g}).")
        await self._variant(interaction, source, "stronger",
                            text_cfg=min(source.text_cfg + STRONGER_STEP, TEXT_CFG_RANGE[1]))

    async def _on_closer(self, interaction: discord.Interaction, source: JobRecord) -> None:
        if source.image_cfg >= IMAGE_CFG_RANGE[1]:
            raise Refusal(f"Image guidance is already at its maximum ({IMAGE_CFG_RANGE[1]:g}).")
        image_cfg = max(source.image_cfg + CLOSER_STEP, 1.0)  # below 1 diffusers ignores the image entirely
        await self._variant(interaction, source, "closer", image_cfg=min(image_cfg, IMAGE_CFG_RANGE[1]))

    async def _variant(self, interaction: discord.Interaction, source: JobRecord, kind: str, **changes) -> None:
        """Same input, instruction and earlier turns as `source`; a new seed or CFG. The LLM output is cached."""
        settings = await self.bot.store.guild_settings(interaction.guild_id)
        await check_access(self.bot, interaction.user, interaction.guild_id, interaction.channel_id, settings,
                           instruction=source.instruction)
        if await self.bot.store.read_image(source.input_image) is None:
            raise Refusal("The original image of that edit is no longer stored, so I can't redo it.")
        await interaction.response.defer(thinking=True)
        original = await interaction.original_response()
        fields = {"seed": source.seed, "text_cfg": source.text_cfg, "image_cfg": source.image_cfg, **changes}
        reason = {"reroll": "re-roll: same settings, new seed",
                  "stronger": f"stronger edit: text CFG {source.text_cfg:g} → {fields['text_cfg']:g}",
                  "closer": f"closer to original: image CFG {source.image_cfg:g} → {fields['image_cfg']:g}"}[kind]
        record = self.bot.jobs.new_record(
            user_id=interaction.user.id, channel_id=interaction.channel_id, guild_id=interaction.guild_id,
            instruction=source.instruction, steps=min(source.steps, settings.max_steps), preset="custom",
            preset_reason=reason, kind=kind, parent_id=source.parent_id, input_image=source.input_image,
            history_depth=source.history_depth, application_id=interaction.application_id,
            interaction_token=interaction.token, token_created_at=interaction.created_at.timestamp(),
            status_message_id=original.id, **fields)
        await self._submit(record, interaction)

    async def _on_refine(self, interaction: discord.Interaction, source: JobRecord) -> None:
        if source.state != "done":
            raise Refusal("That edit has not finished yet.")
        await interaction.response.send_modal(RefineModal(self, source))

    async def refine(self, source: JobRecord, text: str, user: discord.abc.User, guild_id: int | None,
                     channel_id: int, *, interaction: discord.Interaction | None = None,
                     reply_to: discord.Message | None = None) -> None:
        """Edit the result of `source` with a follow-up instruction; earlier turns go into the prompt."""
        async def refuse(message: str) -> None:
            if interaction is not None:
                if interaction.response.is_done():
                    await interaction.followup.send(message, ephemeral=True)
                else:
                    await interaction.response.send_message(message, ephemeral=True)
            elif reply_to is not None:
                await reply_to.reply(message, mention_author=False, allowed_mentions=discord.AllowedMentions.none())

        settings = await self.bot.store.guild_settings(guild_id)
        try:
            instruction = normalize_instruction(text)
            await check_access(self.bot, user, guild_id, channel_id, settings, instruction=instruction)
            if not source.output_image or await self.bot.store.read_image(source.output_image) is None:
                raise Refusal("The image of that edit is no longer stored, so I can't refine it. Start a new /edit.")
        except MgieError as err:
            await refuse(str(err))
            return
        chain = await self.bot.store.chain(source.id, limit=settings.refine_depth)
        common = dict(user_id=user.id, channel_id=channel_id, guild_id=guild_id, instruction=instruction,
                      seed=source.seed, text_cfg=source.text_cfg, image_cfg=source.image_cfg,
                      steps=min(source.steps, settings.max_steps), preset="custom",
                      preset_reason=f"refinement of an earlier edit; {len(chain)} earlier turn(s) in the prompt",
                      kind="refine", parent_id=source.id, input_image=source.output_image,
                      history_depth=min(len(chain), settings.refine_depth))
        if interaction is not None:
            await interaction.response.defer(thinking=True)
            original = await interaction.original_response()
            record = self.bot.jobs.new_record(**common, application_id=interaction.application_id,
                                              interaction_token=interaction.token, status_message_id=original.id,
                                              token_created_at=interaction.created_at.timestamp())
        else:
            status = await reply_to.reply("⏳ Queued", mention_author=False,
                                          allowed_mentions=discord.AllowedMentions.none())
            record = self.bot.jobs.new_record(**common, reply_to_message_id=reply_to.id, status_message_id=status.id)
        await self._submit(record, interaction)

    async def _submit(self, record: JobRecord, interaction: discord.Interaction | None) -> None:
        try:
            await self.bot.jobs.submit(record, None, upload_limit=interaction and
                                       getattr(interaction, "filesize_limit", None))
        except QueueFullError as err:  # refused before it was stored: answer from the record in hand
            await self.bot.jobs.delivery.show(record, render.failed(record, str(err)), view=None)

    # -- owner actions ------------------------------------------------------------------------------
    async def _on_undo(self, interaction: discord.Interaction, source: JobRecord) -> None:
        previous = await self.bot.store.get_job(source.parent_id) if source.parent_id else None
        if previous is None or previous.state != "done":
            raise Refusal("This is the first edit of its chain, so there is nothing to undo; Delete removes it.")
        data = await self.bot.store.read_image(previous.output_image)
        if data is None:
            raise Refusal("The previous image is no longer stored.")
        filename = f"mgie-{previous.id[:8]}.png"
        # The message is about to show `previous`: replies and buttons on it act on that step.
        await self.bot.store.update_job(source.id, result_message_id=None, status_message_id=None)
        await self.bot.store.update_job(previous.id, result_message_id=interaction.message.id)
        await interaction.response.edit_message(
            content="↩️ Back to the previous step.",
            embed=render.result_embed(previous, filename, self.bot.engine.random_weights),
            attachments=[discord.File(io.BytesIO(data), filename=filename)],
            view=result_view(previous.id), allowed_mentions=discord.AllowedMentions.none())

    async def _on_delete(self, interaction: discord.Interaction, source: JobRecord) -> None:
        await interaction.response.defer()
        await interaction.delete_original_response()
        await self.bot.store.update_job(source.id, result_message_id=None)

    async def _on_cancel(self, interaction: discord.Interaction, source: JobRecord) -> None:
        if source.state not in ("queued", "running") or not self.bot.queue.cancel(source.id):
            raise Refusal("That edit is no longer waiting or running.")
        await interaction.response.send_message("Cancelling your edit.", ephemeral=True)


async def setup(bot) -> None:
    await bot.add_cog(ResultsCog(bot))
