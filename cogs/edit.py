"""/edit, the "Edit image with MGIE" message command, and refining by replying to a result."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import i18n, job_requests, presets
from bot.deferred import answer_failure
from bot.intake import first_image
from bot.quiet_refusals import refuse_reply
from mgie_engine.instructions import MAX_INSTRUCTION_CHARS
from mgie_engine.options import IMAGE_CFG_RANGE, TEXT_CFG_RANGE

if TYPE_CHECKING:
    from bot.bot import MgieBot

EVERYWHERE = {"allowed_installs": app_commands.AppInstallationType(guild=True, user=True),
              "allowed_contexts": app_commands.AppCommandContext(guild=True, dm_channel=True, private_channel=True)}


class InstructionModal(discord.ui.Modal, title="Edit image with MGIE"):
    # A Label (component type 18) names the input: TextInput's own label is deprecated since discord.py 2.6.
    instruction = discord.ui.Label(text="What should change?", component=discord.ui.TextInput(
        placeholder="make the sky a sunset", max_length=MAX_INSTRUCTION_CHARS, style=discord.TextStyle.short,
        custom_id="instruction"))

    def __init__(self, bot: MgieBot, attachment: discord.Attachment, locale: object = None) -> None:
        super().__init__(title=i18n.text("edit.modal_title", locale))
        self.text_input: discord.ui.TextInput = self.instruction.component  # this modal's own copy
        self.instruction.text = i18n.text("edit.modal_label", locale)
        self.text_input.placeholder = i18n.text("edit.modal_placeholder", locale)
        self.bot, self.attachment = bot, attachment

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await job_requests.start_edit(self.bot, interaction, self.attachment, self.text_input.value)

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:
        await answer_failure(interaction, error)


class EditCog(commands.Cog, name="Edit"):
    def __init__(self, bot: MgieBot) -> None:
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
        await job_requests.start_edit(self.bot, interaction, image, instruction, text_cfg=text_cfg,
                                      image_cfg=image_cfg, seed=seed, steps=steps, preset=preset)

    async def edit_message_image(self, interaction: discord.Interaction, message: discord.Message) -> None:
        """The "Edit image with MGIE" message command: ask for the instruction in a modal."""
        attachment = first_image(message.attachments)
        if attachment is None:
            await interaction.response.send_message(i18n.text("edit.no_image", interaction.locale), ephemeral=True)
            return
        await interaction.response.send_modal(InstructionModal(self.bot, attachment, interaction.locale))

    # -- refining by replying to a result ---------------------------------------------------------------
    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """A reply to a result is a refinement of it (with a mention when the bot cannot read content)."""
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
                locale = message.guild.preferred_locale if message.guild is not None else None  # public
                await refuse_reply(self.bot, message, i18n.text("edit.tell_me_what", locale),
                                   reaction="\N{BLACK QUESTION MARK ORNAMENT}", locale=locale)
            return  # without the message content intent, only mentions carry text
        await job_requests.start_refine(self.bot, source, text, message.author, message.guild and message.guild.id,
                                        message.channel.id, reply_to=message)


async def setup(bot: MgieBot) -> None:
    """discord.py extension entry point."""
    await bot.add_cog(EditCog(bot))
