"""What /mgie help shows: the bot in a few lines, good instructions, the presets and the two CFG values.

The advice on text and image CFG is the project's CFG study (Taser, section 6 and figures 3-7; the same
study bot/presets.py follows) said for users: a picture that changed too much wants more image CFG and a
little less text CFG, an edit that is too weak wants a more detailed instruction and more text CFG.
"""

from __future__ import annotations

import discord

from . import i18n, render


def help_embed(locale: object) -> discord.Embed:
    """The /mgie help embed in the language of ``locale`` (one table, in a code block for phones)."""
    def t(name: str) -> str:
        return i18n.text(f"help.{name}", locale)

    embed = discord.Embed(title=t("title"), description=t("about"), color=render.COLOR_OK)
    embed.add_field(name=t("examples_title"), value=t("examples"), inline=False)
    embed.add_field(name=t("presets_title"), value=t("presets_table"), inline=False)
    embed.add_field(name=t("cfg_title"), value=t("cfg"), inline=False)
    embed.set_footer(text=t("footer"))
    return embed
