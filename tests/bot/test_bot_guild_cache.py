"""Server settings and bans from memory (bot/storage/guild_cache.py): a burst of interactions is answered in
time however slow SQLite is, and a moderator's change still applies to the very next interaction.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from botharness import bot_running, button, command, edit, finished, make_config, private_answer, team_world
from fakediscord import permissions as perms

from bot.intake import BANNED_MESSAGE
from bot.storage import GuildSettings, Store
from bot.storage.guild_cache import GuildCache, GuildEntry

pytest_plugins = ["fakediscord.fixtures"]

READ_DELAY_S = 0.02  # per statement, one at a time: a host whose disk is busy


class SlowReads:
    """The store's reader connection, one statement at a time and each ``delay`` seconds late; counts them."""

    def __init__(self, conn, delay: float) -> None:
        self._conn, self.delay = conn, delay
        self._one_at_a_time = asyncio.Lock()
        self.statements: list[str] = []

    async def execute_fetchall(self, sql: str, params=()):
        async with self._one_at_a_time:
            self.statements.append(sql)
            await asyncio.sleep(self.delay)
            return await self._conn.execute_fetchall(sql, params)

    def __getattr__(self, name: str):
        return getattr(self._conn, name)

    def of_guilds(self) -> list[str]:
        """Statements that read server settings or bans."""
        return [s for s in self.statements if "guild_settings" in s or "blocked_users" in s]


def slow_down_reads(store: Store, delay: float = READ_DELAY_S) -> SlowReads:
    slow = SlowReads(store.db._reader, delay)  # noqa: SLF001 - the test stands in for a slow disk
    store.db._reader = slow  # noqa: SLF001
    return slow


def answered(inter) -> bool:
    return bool(inter.failed or inter.callbacks)


@pytest.fixture()
def world(fake_endpoints):
    return team_world(fake_endpoints, "owner", perms.MANAGE_GUILD)


# --- a burst is acknowledged in time ----------------------------------------------------------------------


async def test_five_hundred_interactions_at_once_are_acknowledged_in_time_with_slow_sqlite(fake_endpoints,
                                                                                          tmp_path, tiny_models):
    fake = fake_endpoints
    guilds = [fake.add_guild(f"Crowd {n}") for n in range(2)]
    channels = [fake.add_channel(guild, "edits") for guild in guilds]
    users = [fake.add_user(f"user{i}") for i in range(100)]
    for i, user in enumerate(users):
        fake.add_member(guilds[i % 2], user)
    hold = threading.Event()  # the model "warms up" all along: accepted jobs wait in the queue
    config = make_config(fake, tmp_path / "data", [g.id for g in guilds], max_queue=100)
    try:
        async with bot_running(fake, config, tiny_models, delay_ready=hold) as bot:
            await bot.store.block_user(guilds[0].id, users[0].id)  # one banned user: bans are checked too
            slow = slow_down_reads(bot.store)
            burst = []
            for i, user in enumerate(users):  # five each, all sent before the bot has answered any
                burst += [await edit(fake, user, channels[i % 2], f"edit {n}") for n in range(5)]
            await fake.wait_for(lambda: all(answered(i) for i in burst), timeout=120)

            assert len(burst) == 500 and not any(i.failed for i in burst)
            assert max(i.ack_delay for i in burst) < 3.0
            # One read of each server's settings and bans, whatever the number of requests.
            assert len(slow.of_guilds()) <= 2 * len(guilds), slow.of_guilds()
            banned = [i for i in burst if i.user.id == users[0].id]
            assert all(i.ephemeral and BANNED_MESSAGE in i.callbacks[0].data["content"] for i in banned)
            hold.set()  # before closing, or closing waits for the worker's load to give up
    finally:
        hold.set()


# --- a moderator's change applies at once ---------------------------------------------------------------


async def test_ban_unban_and_settings_apply_to_the_very_next_interaction(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, owner = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        first = await finished(fake, await edit(fake, alice, channel))  # the server is in memory from here on
        assert len(bot.store.guild_cache) == 1

        await command(fake, owner, channel, "mgie-admin ban", {"user": alice})
        assert BANNED_MESSAGE in await private_answer(fake, await fake.click(alice, first, button(first, "reroll")))
        assert BANNED_MESSAGE in await private_answer(fake, await edit(fake, alice, channel))
        bob_edit = await edit(fake, bob, channel)  # a ban is one user's
        await finished(fake, bob_edit)

        await command(fake, owner, channel, "mgie-admin unban", {"user": alice})
        again = await edit(fake, alice, channel, "make it night")
        assert not again.ephemeral and (await finished(fake, again)).attachments

        await command(fake, owner, channel, "mgie-admin settings", {"max_steps": 2})
        assert "at most 2 steps" in await private_answer(fake, await edit(fake, alice, channel))
        await command(fake, owner, channel, "mgie-admin settings", {"blocked_words": "sunset"})
        assert "blocked" in await private_answer(fake, await edit(fake, alice, channel, steps=2))
        other = fake.add_channel(guild, "elsewhere")
        await command(fake, owner, channel, "mgie-admin settings", {"allowed_channels": other.mention})
        assert "not enabled in this channel" in await private_answer(
            fake, await edit(fake, alice, channel, "make it red", steps=2))
        await command(fake, owner, channel, "mgie-admin settings", {"allowed_channels": "all"})
        await finished(fake, await edit(fake, alice, channel, "make it red", steps=2))


# --- the cache itself ---------------------------------------------------------------------------------


def entry(guild_id: int, max_steps: int = 100, banned=()) -> GuildEntry:
    return GuildEntry(GuildSettings(guild_id, [], max_steps=max_steps), set(banned))


async def test_requests_arriving_together_share_one_load():
    loads: list[int] = []
    gate = asyncio.Event()

    async def load(guild_id: int) -> GuildEntry:
        loads.append(guild_id)
        await gate.wait()
        return entry(guild_id)

    cache = GuildCache(load)
    waiting = [asyncio.ensure_future(cache.entry(7)) for _ in range(50)]
    await asyncio.sleep(0)
    gate.set()
    assert len({id(e) for e in await asyncio.gather(*waiting)}) == 1 and loads == [7]
    await cache.entry(7)
    assert loads == [7]


async def test_a_load_that_read_before_a_write_committed_is_not_kept():
    stored = {"max_steps": 100}
    read, gate = asyncio.Event(), asyncio.Event()

    async def load(guild_id: int) -> GuildEntry:
        seen = stored["max_steps"]  # read before the write below commits...
        read.set()
        await gate.wait()  # ...and handed back after it
        return entry(guild_id, seen)

    cache = GuildCache(load)
    early = asyncio.ensure_future(cache.entry(7))
    await read.wait()
    stored["max_steps"] = 5
    cache.settings_saved(GuildSettings(7, [], max_steps=5))
    gate.set()
    assert (await early).settings.max_steps == 100  # asked before the write: either answer is fair
    assert (await cache.entry(7)).settings.max_steps == 5  # asked after it: never the old one


async def test_the_cache_forgets_the_least_recently_used_server():
    loads: list[int] = []

    async def load(guild_id: int) -> GuildEntry:
        loads.append(guild_id)
        return entry(guild_id)

    cache = GuildCache(load, capacity=2)
    for guild_id in (1, 2, 1, 3):  # 2 is now the least recently used
        await cache.entry(guild_id)
    assert len(cache) == 2 and loads == [1, 2, 3]
    await cache.entry(1)
    await cache.entry(2)
    assert loads == [1, 2, 3, 2]


async def test_writes_update_what_is_in_memory(tmp_path):
    async with await Store.open(tmp_path / "data") as store:
        assert not await store.is_blocked(1, 50) and (await store.guild_settings(1)).max_steps == 100
        slow = slow_down_reads(store, 0)
        await store.block_user(1, 50)
        await store.update_guild_settings(1, max_steps=7, allowed_channel_ids=[3])
        assert await store.is_blocked(1, 50) and (await store.guild_settings(1)).max_steps == 7
        (await store.guild_settings(1)).allowed_channel_ids.append(4)  # the caller's own copy
        assert (await store.guild_settings(1)).allowed_channel_ids == [3]
        await store.unblock_user(1, 50)
        assert not await store.is_blocked(1, 50)
        assert slow.of_guilds() == []  # all from memory
    async with await Store.open(tmp_path / "data") as reopened:  # and all of it was stored
        assert (await reopened.guild_settings(1)).max_steps == 7 and not await reopened.is_blocked(1, 50)
