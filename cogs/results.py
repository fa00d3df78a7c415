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
from bot.deferred import answer_failure, describe_failure, failures_told_privately, status_message_id
from bot.intake import Refusal, check_access
from bot.jobs import new_seed
from bot.quiet_refusals import refuse_reply
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

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:
        await answer_failure(interaction, error)


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
        except Exception as err:  # noqa: BLE001 - refusals and failures alike end in a private answer
            await answer_failure(interaction, err)

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
        if await self.bot.store.read_image(source.input_image) is None:
            raise Refusal("The original image of that edit is no longer stored, so I can't redo it.")
        ticket = await check_access(self.bot, interaction.user, interaction.guild_id, interaction.channel_id,
                                    settings, instruction=source.instruction, app_permissions=interaction.app_permissions)
        try:  # the ticket holds this request's place from the check on; it is given back unless queued
            await interaction.response.defer(thinking=True)
            async with failures_told_privately(interaction, ticket):
                fields = {"seed": source.seed, "text_cfg": source.text_cfg, "image_cfg": source.image_cfg, **changes}
                reason = {"reroll": "re-roll: same settings, new seed",
                          "stronger": f"stronger edit: text CFG {source.text_cfg:g} → {fields['text_cfg']:g}",
                          "closer": f"closer to original: image CFG {source.image_cfg:g} → {fields['image_cfg']:g}",
                          }[kind]
                record = self.bot.jobs.new_record(
                    user_id=interaction.user.id, channel_id=interaction.channel_id, guild_id=interaction.guild_id,
                    instruction=source.instruction, steps=min(source.steps, settings.max_steps), preset="custom",
                    preset_reason=reason, kind=kind, parent_id=source.parent_id, input_image=source.input_image,
                    history_depth=source.history_depth, application_id=interaction.application_id,
                    interaction_token=interaction.token, token_created_at=interaction.created_at.timestamp(),
                    status_message_id=await status_message_id(interaction), **fields)
                await self.bot.jobs.submit(record, None, upload_limit=_upload_limit(interaction), ticket=ticket)
        finally:
            ticket.release()

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
                await refuse_reply(self.bot, reply_to, message)  # public: a reaction, a notice now and then

        settings = await self.bot.store.guild_settings(guild_id)
        try:
            instruction = normalize_instruction(text)
            if not source.output_image or await self.bot.store.read_image(source.output_image) is None:
                raise Refusal("The image of that edit is no longer stored, so I can't refine it. Start a new /edit.")
            ticket = await check_access(self.bot, user, guild_id, channel_id, settings, instruction=instruction,
                                        app_permissions=interaction.app_permissions if interaction is not None else None)
        except MgieError as err:
            await refuse(str(err))
            return

        async def new_record(**where):
            chain = await self.bot.store.chain(source.id, limit=settings.refine_depth)
            return self.bot.jobs.new_record(
                user_id=user.id, channel_id=channel_id, guild_id=guild_id, instruction=instruction,
                seed=source.seed, text_cfg=source.text_cfg, image_cfg=source.image_cfg,
                steps=min(source.steps, settings.max_steps), preset="custom",
                preset_reason=f"refinement of an earlier edit; {len(chain)} earlier turn(s) in the prompt",
                kind="refine", parent_id=source.id, input_image=source.output_image,
                history_depth=min(len(chain), settings.refine_depth), **where)

        try:  # the ticket holds this request's place from the check on; it is given back unless queued
            if interaction is not None:
                await interaction.response.defer(thinking=True)
                async with failures_told_privately(interaction, ticket):
                    record = await new_record(application_id=interaction.application_id,
                                              interaction_token=interaction.token,
                                              status_message_id=await status_message_id(interaction),
                                              token_created_at=interaction.created_at.timestamp())
                    await self.bot.jobs.submit(record, None, upload_limit=_upload_limit(interaction), ticket=ticket)
                return
            status = None
            try:
                status = await reply_to.reply("⏳ Queued", mention_author=False,
                                              allowed_mentions=discord.AllowedMentions.none())
                record = await new_record(reply_to_message_id=reply_to.id, status_message_id=status.id)
                await self.bot.jobs.submit(record, None, ticket=ticket)
            except Exception as err:  # noqa: BLE001 - the "Queued" line must not stay; the user hears why
                ticket.release()  # before telling them, so they may retry at once
                if status is not None:
                    try:
                        await status.delete()
                    except discord.HTTPException:
                        log.warning("could not remove the status line of a failed refine")
                try:
                    await refuse(describe_failure(err))
                except discord.HTTPException as http_err:
                    log.warning("could not tell %s that their refine failed: %s", user.id, http_err)
        finally:
            ticket.release()

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
            raise Refusal("This is the first edit of its chain, so there is nothing to undo; Delete removes it.")
        data = await self.bot.store.read_image(previous.output_image)
        if data is None:
            raise Refusal("The previous image is no longer stored.")
        filename = f"mgie-{previous.id[:8]}.png"
        # The message is about to show `previous`: replies and buttons on it act on that step.
        await self.bot.store.update_job(shown.id, result_message_id=None, status_message_id=None)
        await self.bot.store.update_job(previous.id, result_message_id=interaction.message.id)
        await interaction.response.edit_message(
            content="↩️ Back to the previous step.",
            embed=render.result_embed(previous, filename, self.bot.engine.random_weights),
            attachments=[discord.File(io.BytesIO(data), filename=filename)],
            view=result_view(previous.id, owner_job_id=source.id), allowed_mentions=discord.AllowedMentions.none())

    async def _on_delete(self, interaction: discord.Interaction, source: JobRecord) -> None:
        shown = await self._shown_on(interaction.message, source)
        await interaction.response.defer()
        await interaction.delete_original_response()
        for job in {shown.id: shown, source.id: source}.values():
            if job.result_message_id == interaction.message.id:
                await self.bot.store.update_job(job.id, result_message_id=None)

    async def _on_cancel(self, interaction: discord.Interaction, source: JobRecord) -> None:
        if source.state not in ("queued", "running") or not self.bot.queue.cancel(source.id):
            raise Refusal("That edit is no longer waiting or running.")
        await interaction.response.send_message("Cancelling your edit.", ephemeral=True)


def _upload_limit(interaction: discord.Interaction) -> int | None:
    return getattr(interaction, "filesize_limit", None) or None


async def setup(bot) -> None:
    await bot.add_cog(ResultsCog(bot))
