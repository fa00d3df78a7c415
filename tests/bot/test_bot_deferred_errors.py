"""Failures after the bot said "thinking...": the user hears why privately, nothing public is left
loading, and a job never depends on Discord handing back the deferred message.
"""

from __future__ import annotations

import errno
import sqlite3

import pytest
from botharness import basic_world, bot_running, button, make_config, png_bytes
from fakediscord import errors as api_errors

from bot.deferred import STORAGE_TROUBLE

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_endpoints):
    return basic_world(fake_endpoints)


async def edit(fake, user, channel, instruction="make it night"):
    att = fake.upload_user_attachment(channel, "cat.png", png_bytes())
    return await fake.slash(user, channel, "edit", {"image": att, "instruction": instruction, "steps": 3,
                                                    "preset": "balanced"})


def private_texts(inter) -> list[str]:
    return [m.content for m in inter.messages if m.ephemeral and not m.deleted]


def nothing_public_left_loading(channel) -> bool:
    return not [m for m in channel.visible_messages if m.loading]


async def test_a_full_disk_is_told_privately_on_every_path(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        first = await fake.wait_for_original(await edit(fake, alice, channel), lambda m: m.attachments, timeout=60)
        att = fake.upload_user_attachment(channel, "dog.png", png_bytes(48, 48, 3))
        post = await fake.send_message(alice, channel, "look at this", attachments=[att])
        refine = await fake.click(alice, first, button(first, "refine"))
        menu = await fake.context_menu(alice, post, "Edit image with MGIE")
        await fake.wait_for(lambda: refine.modal and menu.modal)
        await bot.store.update_guild_settings(guild.id, user_pending_cap=10)  # five attempts at once

        real_save, real_create = bot.store.save_image, bot.store.create_job
        full = {"on": True}

        async def save_image(*args, **kwargs):
            if full["on"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return await real_save(*args, **kwargs)

        async def create_job(*args, **kwargs):
            if full["on"]:
                raise sqlite3.OperationalError("database or disk is full")
            return await real_create(*args, **kwargs)

        bot.store.save_image, bot.store.create_job = save_image, create_job
        attempts = {
            "slash": await edit(fake, alice, channel, "make it red"),
            "context menu": await fake.submit_modal(alice, menu, {"instruction": "give him a hat"}),
            "refine modal": await fake.submit_modal(alice, refine, {"instruction": "now make it snowy"}),
            "re-roll": await fake.click(alice, first, button(first, "reroll")),
        }
        asked = await fake.send_message(alice, channel, "now add stars", reply_to=first)
        for name, inter in attempts.items():
            await fake.wait_for(lambda inter=inter: private_texts(inter), timeout=30, what=name)
            assert private_texts(inter) == [STORAGE_TROUBLE], name
            assert inter.deferred and not inter.thinking and not inter.failed, name
            assert inter.original is None or inter.original.deleted or inter.original.ephemeral, name

        def reply_answer():
            return next((m for m in channel.visible_messages
                         if m.referenced and m.referenced.id == asked.id and STORAGE_TROUBLE in m.content), None)

        await fake.wait_for(reply_answer, timeout=30, what="the reply's answer")
        assert not [m for m in channel.visible_messages if "Queued" in (m.content or "")]  # no stale status line
        assert nothing_public_left_loading(channel)
        assert not [m for m in channel.visible_messages if "went wrong" in (m.content or "")]
        assert bot.queue.pending_for(alice.id) == 0

        full["on"] = False
        again = await fake.wait_for_original(await edit(fake, alice, channel), lambda m: m.attachments, timeout=60)
        assert again.attachments


async def test_a_job_runs_although_the_deferred_response_cannot_be_fetched(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        get_original = "GET /webhooks/{webhook_id}/{webhook_token}/messages/{message_id}"
        fake.inject_error(get_original, api_errors.unknown_message())
        inter = await edit(fake, alice, channel)
        done = await fake.wait_for_original(inter, lambda m: m.attachments, timeout=60)
        assert done.attachments and not private_texts(inter)
        assert (await bot.store.job_by_message(done.id)).state == "done"  # replies and buttons find it

        fake.inject_error(get_original, api_errors.unknown_message())  # a button's job too
        rerolled = await fake.wait_for_original(await fake.click(alice, done, button(done, "reroll")),
                                                lambda m: m.attachments, timeout=60)
        assert rerolled.attachments

        # Neither fetched nor editable: the placeholder goes, and the result is posted in the channel.
        fake.inject_error(get_original, api_errors.unknown_message())
        fake.inject_error("PATCH /webhooks/*", api_errors.unknown_message())
        blind = await edit(fake, alice, channel, "make it foggy")
        posted = await fake.wait_for(lambda: next((m for m in channel.visible_messages if m.attachments
                                                   and "foggy" in m.embeds[0]["title"]), None), timeout=60)
        assert f"<@{alice.id}>" in posted.content and blind.original.deleted
        assert nothing_public_left_loading(channel)
        assert fake.requests_to(get_original)[0].status == 404  # the injected failures did happen
