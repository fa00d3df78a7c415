"""Moderation end to end over the fake Discord: quiet refusals of replies, the word filter's disguises, and
what a server's moderators control when members use the app installed to their own account.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from botharness import (
    bot_running,
    command,
    edit,
    finished,
    job_count,
    make_config,
    private_answer,
    team_world,
)
from fakediscord import permissions as perms

from bot.intake import BANNED_MESSAGE
from bot.quiet_refusals import NOTICE_WINDOW_S, REFUSED_REACTION

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_endpoints):
    return team_world(fake_endpoints, "owner", perms.MANAGE_GUILD)


async def refused_quietly(fake, channel, asked) -> list:
    """Wait until every message in ``asked`` has the refusal reaction and one notice went out; the notices."""
    await fake.wait_for(lambda: all(m.reactions.get(REFUSED_REACTION) for m in asked)
                        and answers_to(fake, channel, asked), timeout=30)
    await asyncio.sleep(0.5)  # the reaction lands before the bot decides on a notice: let the last ones finish
    return answers_to(fake, channel, asked)


def answers_to(fake, channel, asked) -> list:
    """Every message the bot posted in reply to one of ``asked`` (deleted ones too)."""
    ids = {m.id for m in asked}
    return [m for m in channel.messages if m.author is fake.bot_user and m.referenced and m.referenced.id in ids]


# --- item: refusals of replies are quiet ------------------------------------------------------------


async def test_twenty_refused_replies_give_one_public_notice(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, owner = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        first = await finished(fake, await edit(fake, alice, channel))
        await command(fake, owner, channel, "mgie-admin ban", {"user": bob})

        asked = [await fake.send_message(bob, channel, f"now make it red {i}", reply_to=first) for i in range(20)]
        notices = await refused_quietly(fake, channel, asked)
        assert len(notices) == 1 and BANNED_MESSAGE in notices[0].content
        # The notice answers one of the refused replies (whichever the bot handled first) and pings nobody.
        assert not notices[0].mentions and any(notices[0].referenced is m for m in asked)
        assert await job_count(bot) == 1

        # A channel moderators closed: the same, counted per user (alice's first refusal gets its notice).
        other = fake.add_channel(guild, "elsewhere")
        await command(fake, owner, channel, "mgie-admin settings", {"allowed_channels": other.mention})
        refused = [await fake.send_message(alice, channel, f"now make it blue {i}", reply_to=first)
                   for i in range(5)]
        notices = await refused_quietly(fake, channel, refused)
        assert len(notices) == 1 and "not enabled in this channel" in notices[0].content
        assert len(answers_to(fake, channel, asked)) == 1 and await job_count(bot) == 1

        # Once the window has passed, one more notice is allowed.
        throttle = bot.reply_notices
        throttle.clock = lambda: time.monotonic() + NOTICE_WINDOW_S + 1
        late = await fake.send_message(bob, channel, "now make it green", reply_to=first)
        await fake.wait_for(lambda: answers_to(fake, channel, [late]) and late.reactions.get(REFUSED_REACTION),
                            timeout=30)
        assert BANNED_MESSAGE in answers_to(fake, channel, [late])[0].content


# --- item: the server keeps control of the app --------------------------------------------------------


async def test_moderation_commands_are_shown_only_to_manage_server(world, tmp_path, tiny_models):
    fake, guild, channel, alice, _, owner = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        admin, everyone = fake.command("mgie-admin", guild=guild), fake.command("mgie", guild=guild)
        assert int(admin.payload()["default_member_permissions"]) == perms.MANAGE_GUILD
        assert admin.payload()["contexts"] == [0] and {o["name"] for o in admin.options} == {"settings", "ban",
                                                                                            "unban"}
        assert everyone.payload()["default_member_permissions"] is None
        with pytest.raises(PermissionError):  # the client does not offer it to members without Manage Server
            await fake.slash(alice, channel, "mgie-admin settings", {"max_steps": 10})
        assert "Max steps: 10" in await command(fake, owner, channel, "mgie-admin settings", {"max_steps": 10})
        assert "You have no edit waiting" in await command(fake, alice, channel, "mgie cancel")
        assert (await bot.store.guild_settings(guild.id)).max_steps == 10


async def test_user_installed_app_in_a_server_without_the_bot_stays_under_its_control(fake_endpoints, tmp_path,
                                                                                       tiny_models):
    fake = fake_endpoints
    guild = fake.add_guild("Club", with_bot=False)  # the app was never added to this server
    channel, other = fake.add_channel(guild, "art"), fake.add_channel(guild, "other")
    alice, bob, mod = fake.add_user("alice"), fake.add_user("bob"), fake.add_user("mod")
    fake.add_member(guild, alice)
    fake.add_member(guild, bob)
    fake.add_member(guild, mod, permissions=perms.MANAGE_GUILD)
    fake.install_for_user(alice)  # alice and the moderator added the app to their own accounts
    fake.install_for_user(mod)
    async with bot_running(fake, make_config(fake, tmp_path / "data"), tiny_models) as bot:  # global commands
        await fake.wait_for(lambda: fake.command("edit") and fake.command("mgie-admin"), timeout=10)
        assert bot.get_guild(guild.id) is None  # the bot sees nothing of this server
        with pytest.raises(PermissionError):  # bob has not installed the app: there is nothing to use
            await edit(fake, bob, channel)

        first_inter = await edit(fake, alice, channel)
        first = await finished(fake, first_inter)
        assert first_inter.payload["authorizing_integration_owners"] == {"1": str(alice.id)}
        assert not first.ephemeral

        # The moderator bans alice through their own install; it holds for her user-installed use here.
        assert "can no longer use MGIE" in await command(fake, mod, channel, "mgie-admin ban", {"user": alice})
        assert await private_answer(fake, await edit(fake, alice, channel)) == BANNED_MESSAGE
        reroll = next(c for c in first.custom_ids if c.startswith("mgie:reroll:"))
        assert await private_answer(fake, await fake.click(alice, first, reroll)) == BANNED_MESSAGE
        assert "again" in await command(fake, mod, channel, "mgie-admin unban", {"user": alice})

        # The server's word block-list (look-alike letters folded) and channel allow-list hold too.
        await command(fake, mod, channel, "mgie-admin settings", {"blocked_words": "badword"})
        answer = await private_answer(fake, await edit(fake, alice, channel, "add a b\u0430dword sign"))
        assert "blocked" in answer
        await command(fake, mod, channel, "mgie-admin settings", {"allowed_channels": other.mention})
        assert "not enabled in this channel" in await private_answer(fake, await edit(fake, alice, channel))
        await command(fake, mod, channel, "mgie-admin settings", {"allowed_channels": "all"})
        jobs = await job_count(bot)

        # No Attach Files for @everyone here: the app may not post images, so alice hears why, privately.
        fake.set_overwrite(channel, guild.everyone, deny=perms.ATTACH_FILES)
        refused = await edit(fake, alice, channel)
        assert "Attach Files" in await private_answer(fake, refused)
        assert refused.payload["app_permissions"] == str(perms.everyone_permissions(channel))
        assert await job_count(bot) == jobs and not refused.rejected

        # Use External Apps off: Discord keeps the app's answers private; the edit still works.
        fake.set_overwrite(channel, guild.everyone, deny=perms.USE_EXTERNAL_APPS)
        quiet = await edit(fake, alice, channel)
        result = await finished(fake, quiet)
        assert result.ephemeral and quiet.ephemeral and result not in channel.visible_messages
        assert not any(r.status == 403 for i in fake.interactions for r in i.rejected)


def test_notice_throttle_is_per_key_and_bounded():
    from bot.quiet_refusals import NoticeThrottle

    now = [0.0]
    throttle = NoticeThrottle(window=300.0, max_keys=100, clock=lambda: now[0])
    assert throttle.allow((1, 7)) and not throttle.allow((1, 7)) and throttle.allow((2, 7))
    now[0] = 299.0
    assert not throttle.allow((1, 7))
    now[0] = 301.0
    assert throttle.allow((1, 7))
    for user in range(1000):
        throttle.allow((1, user))
    assert len(throttle) == 100
