"""Command names, descriptions, options and choices in each shipped language (discord.py's Translator).

discord.py asks the tree's translator for every string of every command, for every Discord locale, when
it builds the payload it syncs. This one answers from catalogue area ``commands`` with keys derived from
where the string sits, so the cogs keep plain English decorators:

- a command or group ``mgie status``: ``commands.mgie.status.name`` / ``.description``
- its option ``user``: ``commands.mgie.status.options.user.name`` / ``.description``
- a choice shown as ``send behind a spoiler``: ``commands.choices.send_behind_a_spoiler``
- a context menu ``Edit image with MGIE``: ``commands.menus.edit_image_with_mgie``

A feature's own area file may hold its commands' strings too, under a ``commands`` table (``help.toml``:
``[commands.mgie.help]`` gives ``help.commands.mgie.help.name``), so features never share a file.
English locales get no localization (the decorators' text is English); a key with no entry gets none
either, so Discord shows the English. Localized command and option names must obey Discord's name rules
(:data:`NAME_RULE`; tests/bot/test_i18n_commands.py checks every shipped language).
"""

from __future__ import annotations

import functools
import re

import discord
from discord import app_commands

from . import REFERENCE, catalogue, language_of

NAME_RULE = re.compile(r"^[-_\w\u0900-\u097F\u0E00-\u0E7F]{1,32}$")
"""Discord's rule for chat-input command and option names (``^[-_\\p{L}\\p{N}\\p{sc=Deva}\\p{sc=Thai}]{1,32}$``,
lowercase where the script has case); Python's ``\\w`` is letters, digits and ``_``."""

_Location = app_commands.TranslationContextLocation


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _path(command: object) -> str:
    """``mgie status`` -> ``mgie.status``: a command's catalogue path."""
    return ".".join(getattr(command, "qualified_name", str(command)).split())


def catalogue_key(context: app_commands.TranslationContext) -> str | None:
    """The catalogue key of the string discord.py asks about, from where it sits (see the module doc)."""
    where, data = context.location, context.data
    if where in (_Location.command_name, _Location.group_name):
        if isinstance(data, app_commands.ContextMenu):
            return f"commands.menus.{_slug(data.name)}"
        return f"commands.{_path(data)}.name"
    if where in (_Location.command_description, _Location.group_description):
        return f"commands.{_path(data)}.description"
    if where in (_Location.parameter_name, _Location.parameter_description):
        part = "name" if where is _Location.parameter_name else "description"
        return f"commands.{_path(data.command)}.options.{data.name}.{part}"
    if where is _Location.choice_name:
        return f"commands.choices.{_slug(data.name)}"
    return None


@functools.cache
def command_strings(language: str) -> dict[str, str]:
    """Every command string of ``language`` keyed ``commands.<...>``: area ``commands`` and any area's own
    ``commands`` table (``<area>.commands.<...>``)."""
    strings: dict[str, str] = {}
    for key, value in catalogue(language).items():
        area, _, rest = key.partition(".")
        if area == "commands":
            strings[key] = value
        elif rest.startswith("commands."):
            strings.setdefault(rest, value)
    return strings


def localized(key: str, locale: discord.Locale | str) -> str | None:
    """``key``'s text for ``locale`` when a shipped non-English language has it, else None."""
    language = language_of(locale)
    return None if language == REFERENCE else command_strings(language).get(key)


class CatalogueTranslator(app_commands.Translator):
    """Answers discord.py's translation requests from the message catalogue (``bot.tree.set_translator``)."""

    async def translate(self, string: app_commands.locale_str, locale: discord.Locale,
                        context: app_commands.TranslationContext) -> str | None:
        key = catalogue_key(context)
        return localized(key, locale) if key is not None else None
