"""Server settings and bans kept in memory, so the checks made before an interaction is acknowledged
never wait on SQLite.

Discord drops an interaction that is not answered within 3 seconds. Every request reads its server's
settings and the ban list before its answer; under a burst on a loaded host, hundreds of such reads queued
on the one reader connection and some answers came late. Now a server's settings and bans are read once
(one load per server however many requests ask at once) and then answered from memory.

Never stale: every write of settings or bans goes through :class:`~bot.storage.Store`, which updates this
cache in the same task right after its commit, before the writer's caller hears back; a load that was
reading while such a write committed is not kept. This holds for one Store object: another process (or
Store) writing the same tables is not seen, and the bot writes them only through its own Store.
Bounded: at most ``capacity`` servers, the least recently used forgotten first (read again when needed).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .guilds import GuildSettings

GUILD_CACHE_SIZE = 4096
"""Servers kept in memory: each is its settings and its banned user ids (a few hundred bytes usually)."""


@dataclasses.dataclass
class GuildEntry:
    """One server as the checks need it: its settings and who is banned there."""

    settings: GuildSettings
    banned: set[int]


Loader = Callable[[int], Awaitable[GuildEntry]]


class GuildCache:
    """An LRU of :class:`GuildEntry` by server id, filled by ``load`` on first use, updated by the writes."""

    def __init__(self, load: Loader, capacity: int = GUILD_CACHE_SIZE) -> None:
        if capacity < 1:
            raise ValueError("the guild cache needs room for at least one server")
        self._load, self.capacity = load, capacity
        self._entries: collections.OrderedDict[int, GuildEntry] = collections.OrderedDict()
        self._loading: dict[int, asyncio.Future[GuildEntry]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    async def entry(self, guild_id: int) -> GuildEntry:
        """The server's entry: from memory, else loaded once for every caller asking meanwhile."""
        entry = self._entries.get(guild_id)
        if entry is not None:
            self._entries.move_to_end(guild_id)
            return entry
        loading = self._loading.get(guild_id)
        if loading is None:
            loading = asyncio.ensure_future(self._load(guild_id))  # a task: one caller's cancellation
            self._loading[guild_id] = loading  # does not fail the others waiting on it
            loading.add_done_callback(lambda done: self._loaded(guild_id, done))
        return await asyncio.shield(loading)

    def _loaded(self, guild_id: int, done: asyncio.Future[GuildEntry]) -> None:
        if self._loading.get(guild_id) is not done:  # a write committed while it read: may be stale
            if not done.cancelled():
                done.exception()  # retrieved, so an unawaited failure is not logged as lost
            return
        del self._loading[guild_id]
        if done.cancelled() or done.exception() is not None:
            return
        self._entries[guild_id] = done.result()
        self._entries.move_to_end(guild_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def _written(self, guild_id: int) -> GuildEntry | None:
        """Forget a load in flight for ``guild_id`` (it may have read before the write); its entry, if kept."""
        self._loading.pop(guild_id, None)
        return self._entries.get(guild_id)

    def settings_saved(self, settings: GuildSettings) -> None:
        """Settings of ``settings.guild_id`` were committed."""
        entry = self._written(settings.guild_id)
        if entry is not None:
            entry.settings = copy_settings(settings)

    def ban_saved(self, guild_id: int, user_id: int, banned: bool) -> None:
        """``user_id`` was banned (``banned``) or unbanned in ``guild_id``, committed."""
        entry = self._written(guild_id)
        if entry is None:
            return
        if banned:
            entry.banned.add(user_id)
        else:
            entry.banned.discard(user_id)


def copy_settings(settings: GuildSettings) -> GuildSettings:
    """A copy whose lists are its own: what callers get may be changed without touching the cache."""
    return dataclasses.replace(settings, allowed_channel_ids=list(settings.allowed_channel_ids),
                               blocked_words=list(settings.blocked_words))
