"""Commands are synced when they change or when asked (`mgie-bot sync`), not on every start."""

from __future__ import annotations

import asyncio
import os
import sys

import discord
import pytest
from botharness import basic_world, bot_running, make_config

from bot.command_sync import DIGEST_FILENAME, sync_now

pytest_plugins = ["fakediscord.fixtures"]

GLOBAL_SYNC = "PUT /applications/{application_id}/commands"
GUILD_SYNC = "PUT /applications/{application_id}/guilds/{guild_id}/commands"


@pytest.fixture()
def world(fake_endpoints):
    return basic_world(fake_endpoints)


def syncs(fake) -> list[str]:
    """Every bulk command write the bot made, as the paths it wrote to."""
    return [r.path for r in fake.requests if r.route in (GLOBAL_SYNC, GUILD_SYNC) and r.status == 200]


async def test_first_start_syncs_and_a_restart_with_the_same_commands_does_not(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    config = make_config(fake, tmp_path / "data", [guild.id])
    async with bot_running(fake, config, tiny_models):
        pass
    assert len(syncs(fake)) == 1 and str(guild.id) in syncs(fake)[0]
    assert fake.command("edit", guild=guild) is not None
    async with bot_running(fake, config, tiny_models):
        pass
    assert len(syncs(fake)) == 1  # nothing changed: no second sync
    # The commands registered by the first start still work after the restart without a sync.
    async with bot_running(fake, config, tiny_models):
        inter = await fake.slash(alice, channel, "history")
        await fake.wait_for(lambda: inter.callbacks)
        assert inter.ephemeral and not inter.failed
    assert len(syncs(fake)) == 1


def add_ping(bot) -> None:
    """The same bot, one release later: it has one command more."""

    @discord.app_commands.command(name="ping", description="Answers pong")
    async def ping(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pong", ephemeral=True)

    bot.tree.add_command(ping)


async def test_changed_commands_or_servers_sync_again(world, tmp_path, tiny_models, monkeypatch):
    fake, guild, channel, alice = world
    config = make_config(fake, tmp_path / "data", [guild.id])
    async with bot_running(fake, config, tiny_models):
        pass
    assert len(syncs(fake)) == 1

    from bot.bot import MgieBot

    real_setup_hook = MgieBot.setup_hook

    async def setup_hook_with_ping(self) -> None:
        add_ping(self)
        await real_setup_hook(self)

    with monkeypatch.context() as patch:
        patch.setattr(MgieBot, "setup_hook", setup_hook_with_ping)
        async with bot_running(fake, config, tiny_models):
            pass
    assert len(syncs(fake)) == 2 and fake.command("ping", guild=guild) is not None

    # Back to the old commands: that is a change too, and /ping goes away again.
    async with bot_running(fake, config, tiny_models):
        pass
    assert len(syncs(fake)) == 3
    assert not any(c.name == "ping" for c in fake.commands)

    # Global commands instead of one server's (DISCORD_GUILD_IDS emptied): synced globally.
    async with bot_running(fake, make_config(fake, tmp_path / "data"), tiny_models):
        pass
    assert len(syncs(fake)) == 4 and fake.requests_to(GLOBAL_SYNC)


async def test_an_unknown_record_of_the_last_sync_syncs_again(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    config = make_config(fake, tmp_path / "data", [guild.id])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / DIGEST_FILENAME).write_text("not a digest\n")  # hand-edited or from another version
    async with bot_running(fake, config, tiny_models):
        pass
    assert len(syncs(fake)) == 1
    assert (tmp_path / "data" / DIGEST_FILENAME).read_text().strip() != "not a digest"


async def test_mgie_bot_sync_syncs_even_when_nothing_changed(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    config = make_config(fake, tmp_path / "data", [guild.id])
    async with bot_running(fake, config, tiny_models):
        pass
    assert len(syncs(fake)) == 1
    await sync_now(config)
    assert len(syncs(fake)) == 2
    # What `mgie-bot sync` sent is what the bot would send: the next start has nothing to do.
    async with bot_running(fake, config, tiny_models):
        pass
    assert len(syncs(fake)) == 2


async def test_mgie_bot_sync_as_a_command_registers_the_commands_and_exits(fake_discord, tmp_path):
    fake, guild = fake_discord, fake_discord.add_guild("Lab")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "MGIE_"))}
    env.update(DISCORD_TOKEN=fake.token, DISCORD_API_BASE=fake.api_base, DISCORD_GATEWAY_URL=fake.gateway_url,
               DISCORD_GUILD_IDS=str(guild.id), MGIE_DATA_DIR=str(tmp_path / "data"), MGIE_DEVICE="cpu",
               HF_HUB_OFFLINE="1")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "sync", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, out.decode()[-2000:]
    assert len(syncs(fake)) == 1 and fake.command("edit", guild=guild) is not None
    assert not fake.gateway.identify_count  # no gateway session, no models: only the sync
    assert (tmp_path / "data" / DIGEST_FILENAME).is_file() and fake.token not in out.decode()
