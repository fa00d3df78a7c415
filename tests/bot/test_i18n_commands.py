"""Commands in every shipped language: the translator's payload obeys Discord's rules, covers every command,
and the fake Discord receives the localizations when the bot syncs (a changed translation resyncs)."""

from __future__ import annotations

import shutil

import discord
import pytest
from botharness import basic_world, bot_running, make_config
from discord import app_commands
from discord.ext import commands

from bot import i18n
from bot.bot import COGS
from bot.command_sync import DIGEST_FILENAME
from bot.i18n.commands import NAME_RULE, CatalogueTranslator, catalogue_key, command_strings, localized

pytest_plugins = ["fakediscord.fixtures"]

SHIPPED_LOCALES = {"de": "de", "es-ES": "es", "es-419": "es", "fr": "fr", "ja": "ja", "pt-BR": "pt-BR"}


async def _payloads(translator: app_commands.Translator) -> list[dict]:
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.default())
    async with bot:
        for name in COGS:
            await bot.load_extension(name)
        await bot.tree.set_translator(translator)
        return [await command.get_translated_payload(bot.tree, translator) for command in bot.tree.get_commands()]


class _Recorder(app_commands.Translator):
    """Notes the key and English text of every string discord.py asks to translate."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    async def translate(self, string, locale, context):
        self.seen[catalogue_key(context)] = string.message
        return None


def _walk(payload: dict, chat: bool):
    """(item, is_chat_input_name) for a command, its subcommands and options; choices separately."""
    yield payload, chat
    for option in payload.get("options") or []:
        yield from _walk(option, True)


async def test_every_command_string_has_its_english_entry_in_the_catalogue() -> None:
    recorder = _Recorder()
    await _payloads(recorder)
    english = command_strings(i18n.REFERENCE)
    assert len(recorder.seen) > 40
    missing = {key: text for key, text in recorder.seen.items() if key not in english}
    assert not missing, f"add these to commands.toml (or a [commands] table of the feature's area): {missing}"
    differs = {key: (text, english[key]) for key, text in recorder.seen.items() if english[key] != text}
    assert not differs, f"commands.toml's English differs from the cogs' decorators: {differs}"


async def test_localized_names_and_descriptions_obey_discords_rules_in_every_shipped_language() -> None:
    payloads = await _payloads(CatalogueTranslator())
    for payload in payloads:
        chat_input = payload.get("type", 1) == 1
        for item, chat in _walk(payload, chat_input):
            names, descriptions = item.get("name_localizations") or {}, item.get("description_localizations") or {}
            for locale in SHIPPED_LOCALES:  # every shipped language localizes every name (and description)
                assert locale in names, (item["name"], locale)
                if chat:
                    assert locale in descriptions, (item["name"], locale)
            assert not set(names) - set(SHIPPED_LOCALES)  # English locales keep the English
            for locale, name in names.items():
                if chat:
                    assert NAME_RULE.match(name) and name == name.lower(), (locale, name)
                else:
                    assert 1 <= len(name) <= 32, (locale, name)
            for locale, text in descriptions.items():
                assert 1 <= len(text) <= 100, (locale, text)
            for choice in item.get("choices") or []:
                assert set(choice["name_localizations"]) == set(SHIPPED_LOCALES)
                assert all(1 <= len(name) <= 100 for name in choice["name_localizations"].values())
            # Names unique among siblings in each language, as Discord requires.
            for locale in SHIPPED_LOCALES:
                siblings = [o.get("name_localizations", {}).get(locale, o["name"]) for o in item.get("options") or []]
                assert len(siblings) == len(set(siblings)), (item["name"], locale, siblings)


def test_the_name_rule_is_discords() -> None:
    assert NAME_RULE.match("bearbeiten") and NAME_RULE.match("編集") and NAME_RULE.match("olvídame")
    assert NAME_RULE.match("हिन्दी") and NAME_RULE.match("ภาษาไทย")  # Devanagari and Thai marks are allowed
    assert not NAME_RULE.match("two words") and not NAME_RULE.match("x" * 33) and not NAME_RULE.match("a/b")


@pytest.fixture()
def world(fake_endpoints):
    return basic_world(fake_endpoints)


async def test_synced_commands_carry_localizations_and_a_changed_translation_resyncs(world, tmp_path, tiny_models,
                                                                                     monkeypatch):
    fake, guild, channel, alice = world
    config = make_config(fake, tmp_path / "data", [guild.id])
    async with bot_running(fake, config, tiny_models):
        edit = next(c for c in fake.commands if c.name == "edit")
        assert edit.raw["name_localizations"]["de"] == "bearbeiten"
        assert edit.raw["name_localizations"]["ja"] == "編集"
        assert edit.raw["description_localizations"]["pt-BR"].startswith("Edita uma imagem")
        for command in fake.commands:
            assert set(command.raw["name_localizations"]) == set(SHIPPED_LOCALES), command.name
        options = {o["name"]: o for o in edit.raw["options"]}
        assert options["instruction"]["name_localizations"]["fr"] == "instruction"
        assert options["image"]["name_localizations"]["es-419"] == "imagen"
        choices = {c["value"]: c for c in options["preset"]["choices"]}
        assert choices["balanced"]["name_localizations"]["de"] == "ausgewogen"
        menu = next(c for c in fake.commands if c.type == 3)
        assert menu.raw["name_localizations"]["ja"] == "MGIE で画像を編集"
    digest = (config.data_dir / DIGEST_FILENAME).read_text()
    assert len(syncs(fake)) == 1

    # A new release changes one German description and nothing else: the next start syncs again.
    locales = tmp_path / "locales"
    shutil.copytree(i18n.LOCALES_DIR, locales)
    german = locales / "de" / "commands.toml"
    german.write_text(german.read_text(encoding="utf-8").replace(
        "Deine letzten MGIE-Bearbeitungen", "Deine neuesten MGIE-Bearbeitungen"), encoding="utf-8")
    monkeypatch.setattr(i18n, "LOCALES_DIR", locales)
    i18n.catalogue.cache_clear()
    command_strings.cache_clear()
    try:
        async with bot_running(fake, config, tiny_models):
            history = next(c for c in fake.commands if c.name == "history")
            assert history.raw["description_localizations"]["de"] == "Deine neuesten MGIE-Bearbeitungen"
    finally:
        i18n.catalogue.cache_clear()
        command_strings.cache_clear()
    assert len(syncs(fake)) == 2 and (config.data_dir / DIGEST_FILENAME).read_text() != digest


def syncs(fake) -> list[str]:
    """Every bulk command write the bot made."""
    return [r.path for r in fake.requests if r.route.startswith("PUT /applications/") and r.status == 200]


def test_a_features_own_area_may_hold_its_commands_strings(tmp_path, monkeypatch) -> None:
    """A feature adds its command's strings in its own file (a [commands] table), not in commands.toml."""
    for language, body in (("en", '[commands.mgie.ping]\nname = "ping"\ndescription = "Answers pong"'),
                           ("de", '[commands.mgie.ping]\nname = "ping"\ndescription = "Antwortet pong"')):
        (tmp_path / language).mkdir()
        (tmp_path / language / "ping.toml").write_text(body, encoding="utf-8")
    monkeypatch.setattr(i18n, "LOCALES_DIR", tmp_path)
    i18n.catalogue.cache_clear()
    command_strings.cache_clear()
    try:
        assert command_strings("de")["commands.mgie.ping.description"] == "Antwortet pong"
        assert localized("commands.mgie.ping.description", discord.Locale.german) == "Antwortet pong"
        assert localized("commands.mgie.ping.description", discord.Locale.american_english) is None
    finally:
        i18n.catalogue.cache_clear()
        command_strings.cache_clear()
