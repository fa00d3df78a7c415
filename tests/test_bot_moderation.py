"""Moderation end to end over the fake Discord: quiet refusals of replies, the word filter's disguises, and
what a server's moderators control when members use the app installed to their own account.
"""

from __future__ import annotations

import time

import pytest
from botharness import bot_running, make_config, png_bytes, team_world
from fakediscord import permissions as perms

from bot.intake import BANNED_MESSAGE
from bot.quiet_refusals import NOTICE_WINDOW_S, REFUSED_REACTION, reply_notices

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_endpoints):
    return team_world(fake_endpoints, "owner", perms.MANAGE_GUILD)


async def edit(fake, user, channel, instruction="make the sky a sunset"):
    att = fake.upload_user_attachment(channel, "cat.png", png_bytes())
    return await fake.slash(user, channel, "edit", {"image": att, "instruction": instruction, "steps": 3})


async def finished(fake, inter, timeout=60):
    return await fake.wait_for_original(inter, lambda m: m.attachments, timeout=timeout)


async def private_answer(fake, inter) -> str:
    await fake.wait_for(lambda: inter.callbacks)
    assert inter.ephemeral and not inter.failed and not inter.deferred
    return inter.callbacks[0].data["content"]


async def command(fake, user, channel, name, options=None) -> str:
    return await private_answer(fake, await fake.slash(user, channel, name, options))


async def job_count(bot) -> int:
    return sum((await bot.store.counts_by_state()).values())


def answers_to(fake, channel, asked) -> list:
    """Every message the bot posted in reply to one of ``asked`` (deleted ones too)."""
    ids = {m.id for m in asked}
    return [m for m in channel.messages if m.author is fake.bot_user and m.referenced and m.referenced.id in ids]


# --- item: refusals of replies are quiet ------------------------------------------------------------


async def test_twenty_refused_replies_give_one_public_notice(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, owner = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        first = await finished(fake, await edit(fake, alice, channel))
        await command(fake, owner, channel, "mgie ban", {"user": bob})

        asked = [await fake.send_message(bob, channel, f"now make it red {i}", reply_to=first) for i in range(20)]
        await fake.wait_for(lambda: all(m.reactions.get(REFUSED_REACTION) for m in asked), timeout=30)
        notices = answers_to(fake, channel, asked)
        assert len(notices) == 1 and BANNED_MESSAGE in notices[0].content
        assert not notices[0].mentions and notices[0].referenced is asked[0]
        assert await job_count(bot) == 1

        # A channel moderators closed: the same, counted per user (alice's first refusal gets its notice).
        other = fake.add_channel(guild, "elsewhere")
        await command(fake, owner, channel, "mgie settings", {"allowed_channels": other.mention})
        refused = [await fake.send_message(alice, channel, f"now make it blue {i}", reply_to=first)
                   for i in range(5)]
        await fake.wait_for(lambda: all(m.reactions.get(REFUSED_REACTION) for m in refused), timeout=30)
        assert len(answers_to(fake, channel, refused)) == 1
        assert "not enabled in this channel" in answers_to(fake, channel, refused)[0].content
        assert len(answers_to(fake, channel, asked)) == 1 and await job_count(bot) == 1

        # Once the window has passed, one more notice is allowed.
        throttle = reply_notices(bot)
        throttle.clock = lambda: time.monotonic() + NOTICE_WINDOW_S + 1
        late = await fake.send_message(bob, channel, "now make it green", reply_to=first)
        await fake.wait_for(lambda: answers_to(fake, channel, [late]) and late.reactions.get(REFUSED_REACTION),
                            timeout=30)
        assert BANNED_MESSAGE in answers_to(fake, channel, [late])[0].content
