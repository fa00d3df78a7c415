"""The previews setting in guild_settings (migration 006): on by default, on in DMs, a bool or refused."""

from __future__ import annotations

import sqlite3

import pytest

from bot.storage import Store


async def test_previews_default_on_and_a_server_can_turn_them_off(tmp_path):
    async with await Store.open(tmp_path / "data") as store:
        assert (await store.guild_settings(1)).previews and (await store.guild_settings(None)).previews
        await store.update_guild_settings(1, max_steps=50)  # a row saved before previews were set: still on
        assert (await store.guild_settings(1)).previews
        assert not (await store.update_guild_settings(1, previews=False)).previews
        assert not (await store.guild_settings(1)).previews and (await store.guild_settings(1)).max_steps == 50
        assert (await store.guild_settings(2)).previews  # another server is untouched
        for bad in ("off", 0, None):
            with pytest.raises(ValueError, match="Previews"):
                await store.update_guild_settings(1, previews=bad)
        assert (await store.update_guild_settings(1, previews=True)).previews
    with sqlite3.connect(tmp_path / "data" / "mgie.sqlite3") as conn:
        assert conn.execute("SELECT previews FROM guild_settings WHERE guild_id = 1").fetchone() == (1,)
