"""Abuse controls end to end over the fake Discord: per-user rate limit, server bans, word block-list.

Each refusal must be private (ephemeral, or a reply when the request was a reply), say what to do, and
start no job. Unit tests of the limiter and the word matcher sit at the bottom.
"""

from __future__ import annotations

import re
import time

import pytest
from botharness import (
    bot_running,
    button,
    command,
    edit,
    finished,
    job_count,
    make_config,
    private_answer,
    team_world,
)
from fakediscord import permissions as perms

from bot.config import DEFAULT_USER_JOBS_PER_MINUTE, BotConfig, ConfigError
from bot.intake import BANNED_MESSAGE, JobRateLimiter, contains_blocked_word
from bot.moderation_text import fold_text

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_endpoints):
    return team_world(fake_endpoints, "owner", perms.MANAGE_GUILD)


# --- rate limit -------------------------------------------------------------------------------------


async def test_rate_limit_refuses_the_extra_job_until_the_window_moves(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, _ = world
    config = make_config(fake, tmp_path / "data", [guild.id], user_jobs_per_minute=2)
    async with bot_running(fake, config, tiny_models) as bot:
        limiter = bot.rate_limiter
        skew = [0.0]
        limiter.clock = lambda: time.monotonic() + skew[0]
        first = await finished(fake, await edit(fake, alice, channel))
        await finished(fake, await edit(fake, alice, channel, "make it red"))

        text = await private_answer(fake, await edit(fake, alice, channel, "make it blue"))
        wait = int(re.search(r"try again in (\d+) s", text).group(1))
        assert 0 < wait <= 60 and "2 edit(s) in the last minute" in text
        # Buttons are new jobs too: re-roll is refused the same way.
        assert "try again in" in await private_answer(fake, await fake.click(alice, first, button(first, "reroll")))
        assert await job_count(bot) == 2

        await finished(fake, await edit(fake, bob, channel))  # someone else's limit is untouched
        skew[0] = 61.0
        await finished(fake, await fake.click(alice, first, button(first, "reroll")))
        assert await job_count(bot) == 4


# --- bans -------------------------------------------------------------------------------------------


async def test_ban_and_unban_flow(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, owner = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        first = await finished(fake, await edit(fake, alice, channel))

        with pytest.raises(PermissionError):  # Discord shows moderation commands only to Manage Server
            await fake.slash(alice, channel, "mgie-admin ban", {"user": bob})
        assert not await bot.store.is_blocked(guild.id, bob.id)
        assert "can no longer use MGIE" in await command(fake, owner, channel, "mgie-admin ban",
                                                         {"user": bob, "reason": "spamming edits"})
        assert await bot.store.block_reason(guild.id, bob.id) == "spamming edits"
        assert "already banned" in await command(fake, owner, channel, "mgie-admin ban", {"user": bob})
        assert "yourself" in await command(fake, owner, channel, "mgie-admin ban", {"user": owner})

        assert await private_answer(fake, await edit(fake, bob, channel)) == BANNED_MESSAGE
        assert await private_answer(fake, await fake.click(bob, first, button(first, "reroll"))) == BANNED_MESSAGE
        assert await job_count(bot) == 1

        with pytest.raises(PermissionError):
            await fake.slash(bob, channel, "mgie-admin unban", {"user": bob})
        assert "again" in await command(fake, owner, channel, "mgie-admin unban", {"user": bob})
        assert "was not banned" in await command(fake, owner, channel, "mgie-admin unban", {"user": bob})
        await finished(fake, await edit(fake, bob, channel))
        await finished(fake, await fake.click(bob, first, button(first, "reroll")))


async def test_a_server_ban_does_not_reach_dms(world, tmp_path, tiny_models):
    fake, guild, channel, alice, _, owner = world
    async with bot_running(fake, make_config(fake, tmp_path / "data"), tiny_models) as bot:  # global commands
        await fake.wait_for(lambda: fake.command("edit"), timeout=10)
        await command(fake, owner, channel, "mgie-admin ban", {"user": alice})
        assert await private_answer(fake, await edit(fake, alice, channel)) == BANNED_MESSAGE
        await finished(fake, await edit(fake, alice, fake.dm_channel(alice)))
        assert (await bot.store.recent_jobs(alice.id))[0].guild_id is None


# --- word block-list --------------------------------------------------------------------------------


async def test_blocked_words_are_refused_without_echo_everywhere_until_cleared(world, tmp_path, tiny_models):
    fake, guild, channel, alice, _, owner = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        first = await finished(fake, await edit(fake, alice, channel, "add a badword sign"))  # before the list
        text = await command(fake, owner, channel, "mgie-admin settings", {"blocked_words": "Badword, evil  plan,"})
        assert "Blocked words: 2" in text
        assert (await bot.store.guild_settings(guild.id)).blocked_words == ["badword", "evil plan"]

        def no_echo(answer: str) -> str:
            assert "badword" not in fold_text(answer) and "evil plan" not in fold_text(answer)
            return answer

        # Fullwidth and styled letters fold to the plain word.
        assert "blocked" in no_echo(await private_answer(fake, await edit(fake, alice, channel, "make it ＢＡＤＷＯＲＤ")))
        assert "blocked" in no_echo(await private_answer(fake, await edit(fake, alice, channel, "an 𝐄𝐯𝐢𝐥 plan")))

        # A re-roll re-uses the stored instruction, so it is checked against today's list too.
        assert "blocked" in no_echo(await private_answer(fake, await fake.click(alice, first, button(first, "reroll"))))

        opened = await fake.click(alice, first, button(first, "refine"))
        await fake.wait_for(lambda: opened.modal)
        refined = await fake.submit_modal(alice, opened, {"instruction": "now make the BadWord red"})
        assert "blocked" in no_echo(await private_answer(fake, refined))

        asked = await fake.send_message(alice, channel, "now show the Evil Plan", reply_to=first)
        answer = await fake.wait_for(lambda: next((m for m in channel.messages
                                                   if m.referenced and m.referenced.id == asked.id), None))
        assert "blocked" in no_echo(answer.content) and not answer.attachments
        assert await job_count(bot) == 1

        assert "Blocked words: none" in await command(fake, owner, channel, "mgie-admin settings",
                                                      {"blocked_words": "none"})
        await finished(fake, await edit(fake, alice, channel, "make it ＢＡＤＷＯＲＤ"))


# --- units: limiter, matcher, config ----------------------------------------------------------------


def test_limiter_is_a_sliding_window_per_user():
    now = [1000.0]
    limiter = JobRateLimiter(3, window=60.0, clock=lambda: now[0])
    for step in (0.0, 10.0, 20.0):
        now[0] = 1000.0 + step
        assert limiter.retry_after(1) == 0
        limiter.record(1)
    assert limiter.retry_after(1) == pytest.approx(40.0) and limiter.retry_after(2) == 0
    now[0] = 1060.5  # the first start left the window; the other two are still in it
    assert limiter.retry_after(1) == 0
    limiter.record(1)
    assert limiter.retry_after(1) == pytest.approx(9.5)


def test_limiter_memory_is_bounded_and_zero_means_off():
    limiter = JobRateLimiter(1, max_users=100, clock=lambda: 0.0)
    for user in range(1000):
        limiter.record(user)
    assert len(limiter) == 100 and limiter.retry_after(999) > 0 and limiter.retry_after(0) == 0
    off = JobRateLimiter(0, clock=lambda: 0.0)
    for _ in range(50):
        off.record(7)
    assert off.retry_after(7) == 0 and len(off) == 0


@pytest.mark.parametrize("instruction, blocked", [
    ("add a badword here", True),
    ("BADWORD!", True),
    ("ｂａｄｗｏｒｄ", True),  # fullwidth
    ("𝒷𝒶𝒹𝓌ℴ𝓇𝒹", True),  # script letters
    ("ⓑⓐⓓⓦⓞⓡⓓ", True),  # circled
    ("bad\u200bword", True),  # zero-width space
    ("b\u0336a\u0336d\u0336word", True),  # strike-through marks
    ("bádword", True),  # accents
    ("(badword)", True),
    ("badwords", False),  # whole words only
    ("notbadword", False),
    ("an evil\n  plan", True),  # phrases, across any whitespace
    ("an evil planet", False),
    ("die Straße", True),  # casefold: ß == ss
    ("make the sky a sunset", False),
])
def test_blocked_word_matching(instruction, blocked):
    words = ["badword", "evil plan", fold_text("STRASSE")]
    assert contains_blocked_word(instruction, words) is blocked


def test_no_blocked_words_matches_nothing():
    assert not contains_blocked_word("anything", []) and not contains_blocked_word("anything", ["", " "])


def test_jobs_per_minute_setting():
    base = {"DISCORD_TOKEN": "t"}
    assert BotConfig.from_env(base).user_jobs_per_minute == DEFAULT_USER_JOBS_PER_MINUTE == 6
    assert BotConfig.from_env({**base, "MGIE_USER_JOBS_PER_MINUTE": "0"}).user_jobs_per_minute == 0
    with pytest.raises(ConfigError, match="MGIE_USER_JOBS_PER_MINUTE"):
        BotConfig.from_env({**base, "MGIE_USER_JOBS_PER_MINUTE": "lots"})
