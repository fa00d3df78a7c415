"""Every message the bot writes, in the reader's language.

Messages live in one catalogue per language: ``bot/i18n/locales/<language>/<area>.toml``, one file per
feature area (so features add their messages without touching each other's files). A message's key is
``<area>.<name>``; placeholders are ``{name}`` (``str.format`` syntax). English is the reference: every
shipped language has every English key with the same placeholders (tests/bot/test_i18n_catalogue.py).

Use :func:`text` with the reader's Discord locale (``interaction.locale``; the guild's for public notices).
A job stores its requester's locale (``JobRecord.locale``), so its later status lines and result, written
with no interaction at hand, are in their language too. Errors (``MgieError`` and the bot's refusals) carry
a message key and params: :func:`error_text` shows them in the reader's language. Command names and
descriptions are localized from area ``commands`` by :mod:`bot.i18n.commands`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import string
import tomllib
from pathlib import Path

log = logging.getLogger(__name__)

LOCALES_DIR = Path(__file__).parent / "locales"
REFERENCE = "en"
# Shipped languages and their names in themselves. Keys are catalogue folder names.
LANGUAGES = {"en": "English", "de": "Deutsch", "es": "Español", "fr": "Français", "ja": "日本語",
             "pt-BR": "Português (Brasil)"}


def language_of(locale: object) -> str:
    """The shipped language for a Discord locale (a ``discord.Locale`` or its string, e.g. ``"es-419"``);
    English for anything else, ``None`` included."""
    value = str(getattr(locale, "value", locale) or "")
    if value in LANGUAGES:
        return value
    base = value.split("-")[0]
    return base if base in LANGUAGES and base != "pt" else REFERENCE


def _flatten(table: dict, prefix: str) -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


@functools.cache
def catalogue(language: str) -> dict[str, str]:
    """All messages of one shipped language, keyed ``<area>.<name>``."""
    messages: dict[str, str] = {}
    for path in sorted((LOCALES_DIR / language).glob("*.toml")):
        with path.open("rb") as f:
            messages.update(_flatten(tomllib.load(f), f"{path.stem}."))
    return messages


def placeholders(message: str) -> set[str]:
    """The ``{name}`` fields of a message (what a translation must keep)."""
    return {field for _, field, _, _ in string.Formatter().parse(message) if field is not None}


def text(key: str, locale: object = None, /, **params: object) -> str:
    """The message ``key`` in the language of ``locale``, with ``params`` filled in.

    A key missing in a language falls back to English (the catalogue test keeps that from shipping); a key
    missing in English is a bug and raises ``KeyError``.
    """
    language = language_of(locale)
    template = catalogue(language).get(key)
    if template is None:
        if language != REFERENCE:
            log.warning("message %r has no %s entry; using English", key, language)
        template = catalogue(REFERENCE)[key]
    return template.format(**params)


Message = tuple[str, dict[str, object]]
"""A message not yet in any language: its key and params, where a param may be a Message itself (a
sentence built of parts, each translated). :func:`render` writes it in a language; :func:`stored` keeps it
in a text column (a job's preset reason) so it is written in the reader's language when shown."""
STORED_PREFIX = "i18n:"


def message(key: str, **params: object) -> Message:
    """A :data:`Message` for ``key`` with ``params`` (values: text, numbers or Messages)."""
    return key, params


def _is_message(value: object) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], dict)


def render(msg: Message, locale: object = None) -> str:
    """``msg`` in the language of ``locale``, its nested messages first."""
    key, params = msg
    return text(key, locale, **{name: render(value, locale) if _is_message(value) else value
                                for name, value in params.items()})


def _to_json(value: object) -> object:
    if _is_message(value):
        return {"$m": value[0], "p": {name: _to_json(v) for name, v in value[1].items()}}
    return value


def _from_json(value: object) -> object:
    if isinstance(value, dict) and "$m" in value:
        return str(value["$m"]), {name: _from_json(v) for name, v in dict(value.get("p") or {}).items()}
    return value


def stored(msg: Message) -> str:
    """``msg`` as text for a database column; :func:`stored_text` shows it in a reader's language."""
    return STORED_PREFIX + json.dumps(_to_json(msg), ensure_ascii=False, separators=(",", ":"))


def stored_text(value: str, locale: object = None) -> str:
    """A column's text for the reader: a :func:`stored` message in their language, plain text as it is."""
    if not value.startswith(STORED_PREFIX):
        return value
    try:
        msg = _from_json(json.loads(value[len(STORED_PREFIX):]))
        return render(msg, locale) if _is_message(msg) else value
    except (ValueError, KeyError, IndexError, TypeError):  # a damaged or unknown message: show nothing wrong
        log.warning("could not show stored message %r", value[:200])
        return ""


def locale_value(locale: object) -> str | None:
    """A Discord locale as the string stored with a job (``"ja"``, ``"pt-BR"``); None when unknown."""
    value = str(getattr(locale, "value", locale) or "")
    return value or None


ENGLISH_MATCHED_AREAS = ("engine",)
"""Areas whose English text may reach the bot without its key (a worker of an older version sends its
failures over Redis as plain text; current ones send the key, bot/redis_engine.py): :func:`error_text`
recognizes such text and translates it all the same."""


@functools.cache
def _english_patterns(areas: tuple[str, ...]) -> tuple[tuple[str, re.Pattern[str]], ...]:
    patterns = []
    for key, template in catalogue(REFERENCE).items():
        if key.split(".", 1)[0] not in areas:
            continue
        regex, seen = "", set()
        for literal, field, _, _ in string.Formatter().parse(template):
            regex += re.escape(literal)
            if field is not None:  # a placeholder used twice must match the same text twice
                regex += f"(?P={field})" if field in seen else f"(?P<{field}>.+?)"
                seen.add(field)
        patterns.append((key, re.compile(regex + r"\Z", re.DOTALL)))
    return tuple(patterns)


def match_english(english: str, areas: tuple[str, ...] = ENGLISH_MATCHED_AREAS) -> tuple[str, dict[str, str]] | None:
    """The key and params of an English catalogue message of ``areas``, if ``english`` is one."""
    for key, pattern in _english_patterns(areas):
        found = pattern.match(english)
        if found is not None:
            return key, found.groupdict()
    return None


def error_text(err: BaseException, locale: object = None) -> str:
    """What to show the reader of ``err`` (an ``MgieError`` or a refusal): its keyed message in their
    language; English text of a known engine message translated; anything else as it is."""
    key, params = getattr(err, "key", None), getattr(err, "params", None) or {}
    if key and key in catalogue(REFERENCE):
        return text(key, locale, **params)
    return translate_english(str(err), locale)


def translate_english(english: str, locale: object = None,
                      areas: tuple[str, ...] = ENGLISH_MATCHED_AREAS) -> str:
    """``english`` in the reader's language when it is a known English message of ``areas`` (by default
    the engine's), else as it is."""
    matched = match_english(english, areas)
    return text(matched[0], locale, **matched[1]) if matched else english
