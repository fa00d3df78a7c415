"""What each server's moderators set: :class:`GuildSettings` (limits, channels, blocked words) and bans.

The checks before an interaction's answer read them from memory (:mod:`.guild_cache`); the writes here
keep that copy current.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable
from typing import Any

from ..moderation_text import fold_text
from .database import Database, runs_to_completion
from .guild_cache import GuildCache, GuildEntry, copy_settings


@dataclasses.dataclass
class GuildSettings:
    """Per-server limits set by its moderators; DMs (guild_id None) always get the defaults."""

    guild_id: int | None
    allowed_channel_ids: list[int]  # empty = every channel
    max_steps: int = 100
    user_pending_cap: int = 3
    refine_depth: int = 3
    blocked_words: list[str] = dataclasses.field(default_factory=list)  # folded with moderation_text.fold_text; [] = none
    flagged_outputs: str = "spoiler"  # flagged results outside age-restricted channels: spoiler | withhold
    previews: bool = True  # live previews on the progress message of this server's edits


# name -> (lowest, highest, how moderators see it)
_SETTING_LIMITS = {
    "max_steps": (1, 200, "Max steps"),
    "user_pending_cap": (1, 20, "Pending jobs per user"),
    "refine_depth": (0, 10, "Refine depth"),
}
_SETTING_FIELDS = frozenset(_SETTING_LIMITS) | {"allowed_channel_ids", "blocked_words", "flagged_outputs",
                                                 "previews"}
FLAGGED_OUTPUT_CHOICES = ("spoiler", "withhold")
MAX_BLOCKED_WORDS = 100  # one compiled pattern per server; keeps matching cheap and the settings reply short
MAX_BLOCKED_WORD_CHARS = 60
MAX_BAN_REASON_CHARS = 500


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate_settings(changes: dict[str, Any]) -> dict[str, Any]:
    """Check moderator input; messages are shown to them as-is."""
    unknown = sorted(set(changes) - _SETTING_FIELDS)
    if unknown:
        raise ValueError(f"Unknown setting(s): {', '.join(unknown)}.")
    clean: dict[str, Any] = {}
    for name, value in changes.items():
        if name == "allowed_channel_ids":
            clean[name] = _validate_channels(value)
            continue
        if name == "blocked_words":
            clean[name] = _validate_blocked_words(value)
            continue
        if name == "flagged_outputs":
            if value not in FLAGGED_OUTPUT_CHOICES:
                raise ValueError(f"Flagged outputs must be one of {', '.join(FLAGGED_OUTPUT_CHOICES)}.")
            clean[name] = value
            continue
        if name == "previews":
            if not isinstance(value, bool):
                raise ValueError("Previews must be on or off.")
            clean[name] = value
            continue
        low, high, label = _SETTING_LIMITS[name]
        if not _is_int(value) or not low <= value <= high:
            raise ValueError(f"{label} must be a whole number from {low} to {high} (got {value!r}).")
        clean[name] = value
    return clean


def _validate_blocked_words(value: object) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError("Blocked words must be a list of words or phrases.")
    words: list[str] = []
    for entry in value:
        if not isinstance(entry, str):
            raise ValueError(f"Blocked words must be text (got {entry!r}).")
        word = fold_text(entry)
        if len(word) > MAX_BLOCKED_WORD_CHARS:
            raise ValueError(f"Each blocked word or phrase can be at most {MAX_BLOCKED_WORD_CHARS} characters.")
        if word and word not in words:
            words.append(word)
    if len(words) > MAX_BLOCKED_WORDS:
        raise ValueError(f"At most {MAX_BLOCKED_WORDS} blocked words or phrases (got {len(words)}).")
    return words


def _validate_channels(value: object) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError("Allowed channels must be a list of channel IDs.")
    channels: list[int] = []
    for channel in value:
        if not _is_int(channel) or channel <= 0:
            raise ValueError(f"Allowed channels must be channel IDs (got {channel!r}).")
        if channel not in channels:
            channels.append(channel)
    return channels


def _settings_from_row(guild_id: int | None, row: Any) -> GuildSettings:
    if row is None:
        return GuildSettings(guild_id=guild_id, allowed_channel_ids=[])
    return GuildSettings(
        guild_id=guild_id,
        allowed_channel_ids=[int(c) for c in json.loads(row["allowed_channel_ids"])],
        max_steps=row["max_steps"],
        user_pending_cap=row["user_pending_cap"],
        refine_depth=row["refine_depth"],
        blocked_words=[str(w) for w in json.loads(row["blocked_words"])],
        flagged_outputs=row["flagged_outputs"],
        previews=bool(row["previews"]),
    )


class GuildQueries:
    """The ``guild_settings`` and ``blocked_users`` tables, for :class:`~bot.storage.Store`."""

    db: Database
    guild_cache: GuildCache  # made with load_guild_entry as its loader

    async def load_guild_entry(self, guild_id: int) -> GuildEntry:
        """A server's settings and bans as stored (what :class:`GuildCache` keeps)."""
        row = await self.db.fetchone("SELECT * FROM guild_settings WHERE guild_id = ?", (guild_id,))
        banned = await self.db.fetchall("SELECT user_id FROM blocked_users WHERE guild_id = ?", (guild_id,))
        return GuildEntry(_settings_from_row(guild_id, row), {int(r[0]) for r in banned})

    # --- settings -----------------------------------------------------------------------------------

    async def guild_settings(self, guild_id: int | None) -> GuildSettings:
        """The guild's settings, or the defaults when none were saved (always for DMs: ``guild_id`` None).

        From memory once the server was read (see :mod:`.guild_cache`); the copy is the caller's own.
        """
        if guild_id is None:
            return _settings_from_row(None, None)
        return copy_settings((await self.guild_cache.entry(guild_id)).settings)

    @runs_to_completion
    async def update_guild_settings(self, guild_id: int, **changes: Any) -> GuildSettings:
        """Validate and save ``changes``; ValueError messages are written for the moderator who sent them.

        Limits: max_steps 1..200, user_pending_cap 1..20, refine_depth 0..10, allowed_channel_ids a list of
        channel IDs (duplicates dropped; empty = every channel), blocked_words a list of at most
        MAX_BLOCKED_WORDS words or phrases (stored folded by fold_text, blanks and duplicates dropped).
        """
        if not _is_int(guild_id):
            raise ValueError("Settings can only be changed in a server.")
        clean = _validate_settings(changes)
        async with self.db.transaction() as conn:
            rows = await conn.execute_fetchall("SELECT * FROM guild_settings WHERE guild_id = ?", (guild_id,))
            settings = dataclasses.replace(_settings_from_row(guild_id, rows[0] if rows else None), **clean)
            await conn.execute(
                "INSERT INTO guild_settings"
                " (guild_id, allowed_channel_ids, max_steps, user_pending_cap, refine_depth, blocked_words,"
                " flagged_outputs, previews) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (guild_id) DO UPDATE SET allowed_channel_ids = excluded.allowed_channel_ids,"
                " max_steps = excluded.max_steps, user_pending_cap = excluded.user_pending_cap,"
                " refine_depth = excluded.refine_depth, blocked_words = excluded.blocked_words,"
                " flagged_outputs = excluded.flagged_outputs, previews = excluded.previews",
                (
                    guild_id,
                    json.dumps(settings.allowed_channel_ids),
                    settings.max_steps,
                    settings.user_pending_cap,
                    settings.refine_depth,
                    json.dumps(settings.blocked_words),
                    settings.flagged_outputs,
                    int(settings.previews),
                ),
            )
        self.guild_cache.settings_saved(settings)
        return settings

    # --- bans ---------------------------------------------------------------------------------------

    async def blocked_users(self, guild_id: int | None) -> list[int]:
        """Users blocked in ``guild_id``, ascending; DMs have no moderators, so always []."""
        if guild_id is None:
            return []
        rows = await self.db.fetchall("SELECT user_id FROM blocked_users WHERE guild_id = ? ORDER BY user_id",
                                      (guild_id,))
        return [int(r[0]) for r in rows]

    async def is_blocked(self, guild_id: int | None, user_id: int) -> bool:
        """Whether ``user_id`` is banned from the bot in ``guild_id`` (never in DMs); from memory once read."""
        if guild_id is None:
            return False
        return user_id in (await self.guild_cache.entry(guild_id)).banned

    @runs_to_completion
    async def block_user(self, guild_id: int, user_id: int, *, reason: str = "",
                         blocked_by: int | None = None) -> bool:
        """Block ``user_id`` in ``guild_id``; False when they already were (the first reason is kept).

        ``reason`` (cut to MAX_BAN_REASON_CHARS) and ``blocked_by`` are kept for moderators to look back on.
        """
        reason = reason.strip()[:MAX_BAN_REASON_CHARS]
        async with self.db.transaction() as conn:
            cursor = await conn.execute(
                "INSERT OR IGNORE INTO blocked_users (guild_id, user_id, blocked_at, reason, blocked_by)"
                " VALUES (?, ?, ?, ?, ?)",
                (guild_id, user_id, time.time(), reason, blocked_by),
            )
        self.guild_cache.ban_saved(guild_id, user_id, banned=True)
        return cursor.rowcount == 1

    async def block_reason(self, guild_id: int | None, user_id: int) -> str | None:
        """Why ``user_id`` is blocked in ``guild_id`` ('' when no reason was given); None when not blocked."""
        if guild_id is None:
            return None
        row = await self.db.fetchone("SELECT reason FROM blocked_users WHERE guild_id = ? AND user_id = ?",
                                     (guild_id, user_id))
        return None if row is None else str(row[0])

    @runs_to_completion
    async def unblock_user(self, guild_id: int, user_id: int) -> bool:
        """Unblock ``user_id`` in ``guild_id``; False when they were not blocked."""
        async with self.db.transaction() as conn:
            cursor = await conn.execute("DELETE FROM blocked_users WHERE guild_id = ? AND user_id = ?",
                                        (guild_id, user_id))
        self.guild_cache.ban_saved(guild_id, user_id, banned=False)
        return cursor.rowcount == 1
