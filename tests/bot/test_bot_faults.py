"""Faults while jobs run: the user always hears how their edit ended, and the bot keeps going."""

from __future__ import annotations

import asyncio
import errno
import threading
import time

import pytest
from botharness import basic_world, bot_running, make_config, png_bytes
from faults import inject_faults

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_endpoints):
    return basic_world(fake_endpoints)


async def edit(fake, user, channel, instruction="make it night", steps=3):
    att = fake.upload_user_attachment(channel, "cat.png", png_bytes())
    return await fake.slash(user, channel, "edit", {"image": att, "instruction": instruction, "steps": steps})


def slow_steps(seconds: float):
    def hook(stage, job_ids):
        if stage == "step":
            time.sleep(seconds)
    return hook


async def test_result_arrives_although_the_gateway_drops_and_the_session_is_invalidated(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        inject_faults(bot.engine.workers[0], slow_steps(0.1))
        inter = await edit(fake, alice, channel, steps=30)
        await fake.wait_for(lambda: inter.original and "Painting" in (inter.original.content or ""), timeout=30)
        await fake.drop_gateway(code=None)  # TCP cut, no close frame
        msg = await fake.wait_for_original(inter, lambda m: m.attachments, timeout=60)
        assert msg.attachments and fake.gateway.resume_count >= 1
        second = await edit(fake, alice, channel)
        await fake.invalidate_session(resumable=False)
        assert (await fake.wait_for_original(second, lambda m: m.attachments, timeout=60)).attachments


async def test_rate_limited_edits_are_retried_not_lost(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models):
        fake.inject_429("PATCH /webhooks/*", retry_after=0.3, times=3)
        inter = await edit(fake, alice, channel)
        msg = await fake.wait_for_original(inter, lambda m: m.attachments, timeout=60)
        assert msg.attachments and fake.rate_limit_hits


async def test_deleted_status_message_gets_the_result_as_a_new_message(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        inject_faults(bot.engine.workers[0], slow_steps(0.1))
        inter = await edit(fake, alice, channel, steps=20)
        await fake.wait_for(lambda: inter.original and "Painting" in (inter.original.content or ""), timeout=30)
        inter.original.deleted = True  # a moderator removed it (the fake now answers 404 Unknown Message)
        late = await fake.wait_for(lambda: next((m for m in channel.messages if m.attachments and not m.deleted),
                                                None), timeout=60)
        assert f"<@{alice.id}>" in late.content


async def test_disk_full_fails_the_job_cleanly_and_the_next_one_works(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        real_save = bot.store.save_image
        full = {"on": True}

        async def save_image(job_id, kind, data, ext="png"):
            if kind == "out" and full["on"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return await real_save(job_id, kind, data, ext)

        bot.store.save_image = save_image
        inter = await edit(fake, alice, channel)
        await fake.wait_for(lambda: inter.original and "couldn't finish" in (inter.original.content or ""),
                            timeout=60)
        assert "disk" in inter.original.content
        counts = await bot.store.counts_by_state()
        assert counts["failed"] == 1 and counts["running"] == 0
        full["on"] = False
        assert (await fake.wait_for_original(await edit(fake, alice, channel), lambda m: m.attachments,
                                             timeout=60)).attachments


async def test_out_of_memory_tells_the_user_and_the_queue_goes_on(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        def oom_for_first(stage, job_ids, seen=[]):  # noqa: B006 - remembers the first job across calls
            if stage in ("step", "retry"):
                seen.extend(j for j in job_ids if j not in seen)
                if seen[0] in job_ids:
                    raise RuntimeError("CUDA out of memory. Tried to allocate 4.00 GiB")

        inject_faults(bot.engine.workers[0], oom_for_first)
        first = await edit(fake, alice, channel, instruction="a huge edit")
        await fake.wait_for(lambda: first.original and "out of memory" in (first.original.content or ""), timeout=60)
        after = await edit(fake, alice, channel)
        assert (await fake.wait_for_original(after, lambda m: m.attachments, timeout=60)).attachments


async def test_a_hung_worker_is_replaced_and_the_user_is_told(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    release = threading.Event()
    config = make_config(fake, tmp_path / "data", [guild.id], stall_timeout=1.0)
    async with bot_running(fake, config, tiny_models) as bot:
        stuck = bot.engine.workers[0]

        def hang_mid_edit(stage, job_ids, steps=[]):  # noqa: B006
            if stage == "step":
                steps.append(1)
                if len(steps) == 2:
                    release.wait(60)

        inject_faults(stuck, hang_mid_edit)
        try:
            first = await edit(fake, alice, channel, instruction="this one hangs", steps=5)
            await fake.wait_for(lambda: first.original and "stopped responding" in (first.original.content or ""),
                                timeout=60)
            second = await edit(fake, alice, channel)
            assert (await fake.wait_for_original(second, lambda m: m.attachments, timeout=60)).attachments
            assert bot.engine.workers[0] is not stuck
        finally:
            release.set()


async def test_flagged_results_are_spoilered_or_withheld_outside_age_restricted_channels(fake_endpoints, tmp_path,
                                                                                         tiny_models):
    from fakediscord import permissions as perms

    fake = fake_endpoints
    guild = fake.add_guild("Lab")
    channel = fake.add_channel(guild, "edits")
    lounge = fake.add_channel(guild, "adults", nsfw=True)
    alice, owner = fake.add_user("alice"), fake.add_user("owner")
    fake.add_member(guild, alice)
    fake.add_member(guild, owner, permissions=perms.MANAGE_GUILD)
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        await bot.engine.workers[0].wait_ready()  # loading sets the check: replace it after
        bot.engine.workers[0].safety_check = lambda image: True  # flags everything

        spoiled = await fake.wait_for_original(await edit(fake, alice, channel), lambda m: m.attachments, timeout=60)
        assert spoiled.attachments[0].filename.startswith("SPOILER_") and "spoiler" in spoiled.content
        assert not spoiled.embeds[0].get("image")

        adult = await fake.wait_for_original(await edit(fake, alice, lounge), lambda m: m.attachments, timeout=60)
        assert not adult.attachments[0].filename.startswith("SPOILER_")

        changed = await fake.slash(owner, channel, "mgie-admin settings", {"flagged_outputs": "withhold"})
        await fake.wait_for(lambda: changed.callbacks)
        held = await edit(fake, alice, channel)
        await fake.wait_for(lambda: held.original and "withholds" in (held.original.content or ""), timeout=60)
        assert not held.original.attachments


async def test_missing_attach_permission_is_explained_in_text(world, tmp_path, tiny_models):
    from fakediscord import permissions as perms

    fake, guild, channel, alice = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        first = await fake.wait_for_original(await edit(fake, alice, channel), lambda m: m.attachments, timeout=60)
        fake.set_overwrite(channel, fake.bot_user, deny=perms.ATTACH_FILES | perms.EMBED_LINKS)
        await fake.send_message(alice, channel, "now make it snowy", reply_to=first)
        note = await fake.wait_for(lambda: next((m for m in channel.messages
                                                 if "Attach Files" in (m.content or "")), None), timeout=60)
        assert f"<@{alice.id}>" in note.content and not note.attachments
        for _ in range(100):  # the bot posts first, then records why
            jobs = await bot.store.recent_jobs(alice.id, 5)
            if jobs[0].error:
                break
            await asyncio.sleep(0.05)
        assert "missing Attach Files" in (jobs[0].error or "")
