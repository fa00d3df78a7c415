"""/edit, the "Edit image with MGIE" message command, and refining by replying to a result."""

from __future__ import annotations

import logging
import re

import discord
from discord import app_commands
from discord.ext import commands

from bot import presets
from bot.deferred import answer_failure, failures_told_privately, status_message_id
from bot.intake import Refusal, check_access, fetch_image, first_image
from bot.jobs import new_seed
from bot.quiet_refusals import refuse_reply
from mgie_engine.errors import MgieError
from mgie_engine.instructions import MAX_INSTRUCTION_CHARS, normalize_instruction
from mgie_engine.options import DEFAULT_STEPS, IMAGE_CFG_RANGE, TEXT_CFG_RANGE, check_options

log = logging.getLogger(__name__)

EVERYWHERE = {"allowed_installs": app_commands.AppInstallationType(guild=True, user=True),
              "allowed_contexts": app_commands.AppCommandContext(guild=True, dm_channel=True, private_channel=True)}


class InstructionModal(discord.ui.Modal, title="Edit image with MGIE"):
    instruction = discord.ui.TextInput(label="What should change?", placeholder="make the sky a sunset",
                                       max_length=MAX_INSTRUCTION_CHARS, style=discord.TextStyle.short,
                                       custom_id="instruction")

    def __init__(self, cog: EditCog, attachment: discord.Attachment) -> None:
        super().__init__()
        self.cog, self.attachment = cog, attachment

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await self.cog.start_edit(interaction, self.attachment, self.instruction.value)

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:
        await answer_failure(interaction, error)


class EditCog(commands.Cog, name="Edit"):
    def __init__(self, bot) -> None:
        self.bot = bot
        self.menu = app_commands.ContextMenu(name="Edit image with MGIE", callback=self.edit_message_image,
                                             **EVERYWHERE)
        bot.tree.add_command(self.menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.menu.name, type=self.menu.type)

    @app_commands.command(name="edit", description="Edit an image with an instruction (MGIE)")
    @app_commands.describe(
        image="The image to edit (PNG, JPEG, WEBP or GIF)",
        instruction="What to change, e.g. 'make the sky a sunset'",
        text_cfg="How strongly to follow the text (1-20, default 7.5)",
        image_cfg="How closely to keep the original (0-10, default 1.5)",
        seed="Random seed (random when left out; always shown)",
        steps="Denoising steps (more is slower; capped by the server)",
        preset="auto picks values from the image and instruction",
    )
    @app_commands.choices(preset=[app_commands.Choice(name=n, value=n) for n in presets.PRESET_CHOICES])
    @app_commands.allowed_installs(guilds=True, users=True)
    @app_commands.allowed_contexts(guilds=True, dms=True, private_channels=True)
    async def edit(self, interaction: discord.Interaction, image: discord.Attachment,
                   instruction: app_commands.Range[str, 1, MAX_INSTRUCTION_CHARS],
                   text_cfg: app_commands.Range[float, TEXT_CFG_RANGE[0], TEXT_CFG_RANGE[1]] | None = None,
                   image_cfg: app_commands.Range[float, IMAGE_CFG_RANGE[0], IMAGE_CFG_RANGE[1]] | None = None,
                   seed: app_commands.Range[int, 0, 2**53] | None = None,
                   steps: app_commands.Range[int, 1, 200] | None = None,
                   preset: str = "auto") -> None:
        await self.start_edit(interaction, image, instruction, text_cfg=text_cfg, image_cfg=image_cfg, seed=seed,
                              steps=steps, preset=preset)

    async def edit_message_image(self, interaction: discord.Interaction, message: discord.Message) -> None:
        attachment = first_image(message.attachments)
        if attachment is None:
            await interaction.response.send_message("That message has no image attached.", ephemeral=True)
            return
        await interaction.response.send_modal(InstructionModal(self, attachment))

    async def start_edit(self, interaction: discord.Interaction, attachment: discord.Attachment, instruction: str,
                         *, text_cfg: float | None = None, image_cfg: float | None = None, seed: int | None = None,
                         steps: int | None = None, preset: str = "auto") -> None:
        """Validate cheaply, answer within Discord's 3 seconds (defer), then fetch, decode and queue."""
        settings = await self.bot.store.guild_settings(interaction.guild_id)
        try:
            instruction = normalize_instruction(instruction)
            steps = steps if steps is not None else min(DEFAULT_STEPS, settings.max_steps)
            if steps > settings.max_steps:
                raise Refusal(f"This server allows at most {settings.max_steps} steps.")
            seed = new_seed() if seed is None else seed
            check_options(text_cfg if text_cfg is not None else 7.5, image_cfg if image_cfg is not None else 1.5,
                          steps, seed)
            if preset not in presets.PRESET_CHOICES:
                raise Refusal(f"Unknown preset {preset!r}; choose one of {', '.join(presets.PRESET_CHOICES)}.")
            ticket = await check_access(self.bot, interaction.user, interaction.guild_id, interaction.channel_id,
                                        settings, instruction=instruction, app_permissions=interaction.app_permissions)
        except MgieError as err:
            await interaction.response.send_message(str(err), ephemeral=True)
            return
        try:  # the ticket holds this request's place from the check on; it is given back unless queued
            await interaction.response.defer(thinking=True)
            async with failures_told_privately(interaction, ticket):
                # Decoded once, off the event loop; 'auto' looks at the picture in the same worker thread.
                data, guidance = await fetch_image(self.bot, attachment, lambda picture: presets.choose_guidance(
                    preset, picture, instruction, text_cfg, image_cfg))
                record = self.bot.jobs.new_record(
                    user_id=interaction.user.id, channel_id=interaction.channel_id, guild_id=interaction.guild_id,
                    instruction=instruction, seed=seed, text_cfg=guidance.text_cfg, image_cfg=guidance.image_cfg,
                    steps=steps, preset=guidance.preset, preset_reason=guidance.reason, kind="edit",
                    application_id=interaction.application_id, interaction_token=interaction.token,
                    token_created_at=interaction.created_at.timestamp(),
                    status_message_id=await status_message_id(interaction))
                await self.bot.jobs.submit(record, data, upload_limit=_upload_limit(interaction), ticket=ticket)
        finally:
            ticket.release()

    # -- refining by replying to a result ---------------------------------------------------------------
    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        if message.author.bot or message.reference is None or message.reference.message_id is None:
            return
        if self.bot.user is None:
            return
        source = await self.bot.store.job_by_message(message.reference.message_id)
        if source is None or source.state != "done":
            return
        text = re.sub(rf"<@!?{self.bot.user.id}>", " ", message.content or "")
        if not text.strip():
            if self.bot.user in message.mentions:
                await refuse_reply(self.bot, message, "Tell me what to change, e.g. `make it night`.",
                                   reaction="\N{BLACK QUESTION MARK ORNAMENT}")
            return  # without the message content intent, only mentions carry text
        await self.bot.get_cog("Results").refine(source, text, message.author, message.guild and message.guild.id,
                                                 message.channel.id, reply_to=message)


def _upload_limit(interaction: discord.Interaction) -> int | None:
    return getattr(interaction, "filesize_limit", None) or None


async def setup(bot) -> None:
    await bot.add_cog(EditCog(bot))
