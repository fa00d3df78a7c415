"""End to end: users edit images through the real bot, over the loopback fake Discord.

Every action goes through the real protocol (slash commands, buttons, modals, replies) and each
test asserts what the user would see.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from botharness import bot_running, button, edit, finished, make_config, png_bytes, team_world
from fakediscord import permissions as perms

from bot import render
from mgie_engine.settings import EngineSettings

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_endpoints):
    return team_world(fake_endpoints, "mod", perms.MANAGE_MESSAGES)


def fields_of(message) -> dict[str, str]:
    return {f["name"]: f["value"] for f in message.embeds[0]["fields"]}


async def job_of(bot, message, timeout: float = 10.0):
    """The stored job a message shows, once the bot has recorded it (it posts first, then records)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (job := await bot.store.job_by_message(message.id)) is None:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"no job recorded for message {message.id}")
        await asyncio.sleep(0.05)
    return job


async def test_edit_shows_the_result_with_everything_used(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models):
        inter = await edit(fake, alice, channel, seed=42, preset="preserve")
        msg = await finished(fake, inter)
        assert inter.ack_delay < 3 and not inter.failed and not inter.rejected
        assert msg.attachments[0].data.startswith(b"\x89PNG")
        assert (msg.attachments[0].width, msg.attachments[0].height) == (64, 48)
        assert "The image will be more colorful." in msg.embeds[0]["description"]
        assert "make the sky a sunset" in msg.embeds[0]["title"]
        f = fields_of(msg)
        assert (f["Seed"], f["Text CFG"], f["Image CFG"], f["Steps"], f["Preset"]) == ("42", "7", "2", "3", "preserve")
        assert "RANDOM" in msg.embeds[0]["footer"]["text"]
        actions = {c.split(":")[1] for c in msg.custom_ids}
        assert actions == {"reroll", "stronger", "closer", "refine", "compare", "undo", "delete"}
        # Progress went through the same message before the result replaced it.
        assert any("queued" in (h.get("content") or "").lower() for h in msg.history)
        assert not fake.unknown_routes


async def test_auto_preset_explains_itself_and_seed_is_shown(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models):
        msg = await finished(fake, await edit(fake, alice, channel, instruction="make it red"))
        f = fields_of(msg)
        assert f["Preset"] == "auto" and f["Seed"].isdigit()
        assert "auto:" in f["Why these values"] and f["Text CFG"] in f["Why these values"]


async def test_buttons_reroll_stronger_closer_and_permissions(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, mod = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        first = await finished(fake, await edit(fake, alice, channel, seed=1, text_cfg=7.5, image_cfg=1.5))

        reroll = await fake.click(bob, first, button(first, "reroll"))  # anyone may re-roll, as their own job
        rerolled = await finished(fake, reroll)
        assert fields_of(rerolled)["Seed"] != "1" and "(cached LLM)" in fields_of(rerolled)["Time"]
        job = await job_of(bot, rerolled)
        assert job.user_id == bob.id and job.kind == "reroll"

        stronger = await finished(fake, await fake.click(alice, first, button(first, "stronger")))
        assert fields_of(stronger)["Text CFG"] == "8.5" and fields_of(stronger)["Seed"] == "1"
        closer = await finished(fake, await fake.click(alice, first, button(first, "closer")))
        assert fields_of(closer)["Image CFG"] == "2"

        refused = await fake.click(bob, first, button(first, "delete"))
        await fake.wait_for(lambda: refused.callbacks)
        assert refused.ephemeral and "Only" in refused.callbacks[0].data["content"]
        assert not first.deleted

        deleted = await fake.click(mod, rerolled, button(rerolled, "delete"))  # a moderator may delete
        await fake.wait_for(lambda: rerolled.deleted)
        assert not deleted.failed


async def test_refine_by_modal_and_by_reply_carries_history_and_undo_goes_back(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        first = await finished(fake, await edit(fake, alice, channel, seed=5))
        first_job = await job_of(bot, first)

        opened = await fake.click(alice, first, button(first, "refine"))
        await fake.wait_for(lambda: opened.modal)
        submitted = await fake.submit_modal(alice, opened, {"instruction": "now make it night"})
        second = await finished(fake, submitted)
        second_job = await job_of(bot, second)
        assert second_job.parent_id == first_job.id and second_job.input_image == first_job.output_image
        assert second_job.history_depth == 1 and "turn 2" in fields_of(second)["Refinement"]

        await fake.send_message(alice, channel, "add some stars", reply_to=second)
        reply = await fake.wait_for(lambda: next((m for m in channel.messages if m.attachments and
                                                  m.referenced and "stars" in (m.referenced.content or "")), None),
                                    timeout=60)
        third_job = await job_of(bot, reply)
        assert third_job.parent_id == second_job.id and third_job.history_depth == 2
        assert "add some stars" in reply.embeds[0]["title"]

        undo = await fake.click(alice, second, button(second, "undo"))
        await fake.wait_for(lambda: "Back to the previous step" in (second.content or ""))
        assert not undo.failed and (await bot.store.job_by_message(second.id)).id == first_job.id


async def test_context_menu_opens_a_modal_and_edits_that_image(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models):
        att = fake.upload_user_attachment(channel, "dog.webp", png_bytes(80, 40), content_type="image/png")
        post = await fake.send_message(alice, channel, "look at this", attachments=[att])
        opened = await fake.context_menu(alice, post, "Edit image with MGIE")
        await fake.wait_for(lambda: opened.modal)
        msg = await finished(fake, await fake.submit_modal(alice, opened, {"instruction": "give him a hat"}))
        assert (msg.attachments[0].width, msg.attachments[0].height) == (64, 32)

        text_only = await fake.send_message(alice, channel, "no image here")
        refused = await fake.context_menu(alice, text_only, "Edit image with MGIE")
        await fake.wait_for(lambda: refused.callbacks)
        assert refused.ephemeral and "no image" in refused.callbacks[0].data["content"]


@pytest.mark.parametrize("filename, data, content_type, expect", [
    ("notes.txt", b"hello", "text/plain", "not a PNG, JPEG, WEBP or GIF"),
    ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "image/png", "not an image I can read"),
    ("empty.png", b"", "image/png", "empty"),
])
async def test_bad_attachments_get_a_private_message(world, tmp_path, tiny_models, filename, data, content_type,
                                                      expect):
    fake, guild, channel, alice, *_ = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        att = fake.upload_user_attachment(channel, filename, data, content_type=content_type)
        inter = await fake.slash(alice, channel, "edit", {"image": att, "instruction": "make it red"})
        await fake.wait_for(lambda: any(m.ephemeral for m in inter.messages), timeout=20)
        private = [m for m in inter.messages if m.ephemeral]
        assert expect.lower() in private[0].content.lower()
        assert not inter.failed
        assert not [m for m in channel.visible_messages if m.attachments]  # nothing public was left behind
        assert not any((await bot.store.counts_by_state()).values())


@pytest.mark.parametrize("options, expect", [
    ({"instruction": "   "}, "describe the edit"),
    ({"steps": 150}, "at most 100 steps"),
])
async def test_bad_options_get_a_private_message(world, tmp_path, tiny_models, options, expect):
    fake, guild, channel, alice, *_ = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models):
        inter = await edit(fake, alice, channel, **options)
        await fake.wait_for(lambda: inter.callbacks)
        assert inter.ephemeral and expect in inter.callbacks[0].data["content"]


async def test_two_users_share_the_queue_fairly(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, _ = world
    hold = threading.Event()  # the model "warms up" until everyone has submitted
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models,
                           delay_ready=hold) as bot:
        alice_jobs = [await edit(fake, alice, channel, instruction=f"alice edit {i}") for i in range(3)]
        await fake.wait_for(lambda: all(i.original and "queued" in i.original.content.lower() for i in alice_jobs))
        bob_job = await edit(fake, bob, channel, instruction="bob edit")
        await fake.wait_for(lambda: bob_job.original and "position 2" in bob_job.original.content)
        assert "warming up" in alice_jobs[0].original.content
        hold.set()
        for inter in [*alice_jobs, bob_job]:
            await finished(fake, inter, timeout=90)
        jobs = {j.instruction: j for j in await bot.store.recent_jobs(alice.id, 10) + await bot.store.recent_jobs(bob.id, 10)}
        order = sorted(jobs, key=lambda k: jobs[k].started_at)
        # Round robin: bob's one job runs second, not behind all three of alice's.
        assert order[0].startswith("alice") and order[1] == "bob edit"
        assert fake.max_heartbeat_gap() < 2.0  # GPU work never blocked the event loop


async def test_queued_job_survives_a_restart(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    config = make_config(fake, tmp_path / "data", [guild.id])
    never = threading.Event()
    async with bot_running(fake, config, tiny_models, delay_ready=never):
        inter = await edit(fake, alice, channel, seed=9)
        await fake.wait_for(lambda: inter.original and "queued" in inter.original.content.lower())
    never.set()
    async with bot_running(fake, config, tiny_models) as bot:
        msg = await finished(fake, inter)
        assert fields_of(msg)["Seed"] == "9"
        assert (await job_of(bot, msg)).state == "done"


async def test_a_result_stored_but_not_delivered_before_a_stop_is_delivered_after_the_restart(world, tmp_path,
                                                                                                 tiny_models):
    """A stop can fall between storing a result and posting it (the soak test once hit this): the next
    start posts it, with the same treatment of a flagged output."""
    fake, guild, channel, alice, *_ = world
    config = make_config(fake, tmp_path / "data", [guild.id])
    async with bot_running(fake, config, tiny_models) as bot:
        inter = await edit(fake, alice, channel)
        job = await job_of(bot, await finished(fake, inter))
        # What the cut-off delivery leaves: stored as done, never shown (and here, flagged by the checker).
        await bot.store.update_job(job.id, result_message_id=None, flagged=True)
        inter.original.attachments = []
    async with bot_running(fake, config, tiny_models) as bot:
        msg = await finished(fake, inter)
        assert render.SPOILERED in msg.content and msg.attachments[0].filename.startswith("SPOILER_")
        assert (await job_of(bot, msg)).result_message_id == msg.id


async def test_late_result_is_posted_in_the_channel_mentioning_the_user(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    config = make_config(fake, tmp_path / "data", [guild.id])
    never = threading.Event()
    async with bot_running(fake, config, tiny_models, delay_ready=never):
        inter = await edit(fake, alice, channel)
        await fake.wait_for(lambda: inter.original and "queued" in inter.original.content.lower())
    never.set()
    fake.clock.advance(16 * 60)  # the interaction token is dead by the time the bot is back
    async with bot_running(fake, config, tiny_models):
        late = await fake.wait_for(lambda: next((m for m in channel.messages if m.attachments and
                                                 not m.deleted and m is not inter.original), None), timeout=60)
        assert f"<@{alice.id}>" in late.content
        assert late.allowed_mentions.get("users") == [str(alice.id)] or alice.id in [int(u) for u in
                                                                                      late.allowed_mentions.get("users", [])]
        assert late.message_reference and int(late.message_reference["message_id"]) == inter.original.id


async def test_dm_edit_works(fake_endpoints, tmp_path, tiny_models):
    fake = fake_endpoints
    carol = fake.add_user("carol")
    dm = fake.dm_channel(carol)
    async with bot_running(fake, make_config(fake, tmp_path / "data"), tiny_models):
        await fake.wait_for(lambda: fake.command("edit"), timeout=10)
        msg = await finished(fake, await edit(fake, carol, dm))
        assert msg.attachments


async def test_history_status_settings_and_cancel(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, mod = world
    owner = fake.add_user("owner")
    fake.add_member(guild, owner, permissions=perms.MANAGE_GUILD)
    hold = threading.Event()
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models,
                           delay_ready=hold) as bot:
        queued = await edit(fake, alice, channel, instruction="cancel me")
        await fake.wait_for(lambda: queued.original and "queued" in queued.original.content.lower())
        other = await fake.click(bob, queued.original, button(queued.original, "cancel"))
        await fake.wait_for(lambda: other.callbacks)
        assert other.ephemeral and "Only" in other.callbacks[0].data["content"]
        mine = await fake.click(alice, queued.original, button(queued.original, "cancel"))
        await fake.wait_for(lambda: "Cancelled" in (queued.original.content or ""))
        assert not mine.failed

        status = await fake.slash(alice, channel, "mgie status")
        await fake.wait_for(lambda: status.callbacks)
        names = {f["name"] for f in status.callbacks[0].data["embeds"][0]["fields"]}
        assert {"Model", "Queue", "Average edit"} <= names

        with pytest.raises(PermissionError):  # hidden from members without Manage Server
            await fake.slash(alice, channel, "mgie-admin settings", {"max_steps": 10})
        changed = await fake.slash(owner, channel, "mgie-admin settings", {"max_steps": 10, "refine_depth": 1,
                                                                     "allowed_channels": f"<#{channel.id}>"})
        await fake.wait_for(lambda: changed.callbacks)
        assert changed.ephemeral and "Max steps: 10" in changed.callbacks[0].data["content"]
        settings = await bot.store.guild_settings(guild.id)
        assert (settings.max_steps, settings.refine_depth, settings.allowed_channel_ids) == (10, 1, [channel.id])

        other = fake.add_channel(guild, "random")
        elsewhere = await edit(fake, alice, other)
        await fake.wait_for(lambda: elsewhere.callbacks)
        assert elsewhere.ephemeral and "not enabled in this channel" in elsewhere.callbacks[0].data["content"]

        hold.set()
        history = await fake.slash(alice, channel, "history")
        await fake.wait_for(lambda: history.callbacks)
        assert history.ephemeral and "cancel me" in history.callbacks[0].data["embeds"][0]["fields"][0]["name"]


async def test_buttons_keep_working_after_a_restart(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    config = make_config(fake, tmp_path / "data", [guild.id])
    async with bot_running(fake, config, tiny_models):
        first = await finished(fake, await edit(fake, alice, channel, seed=3))
    async with bot_running(fake, config, tiny_models):
        again = await finished(fake, await fake.click(alice, first, button(first, "reroll")))
        assert fields_of(again)["Seed"] != "3"


async def test_result_over_the_upload_limit_is_sent_smaller(fake_endpoints, tmp_path, tiny_models):
    fake = fake_endpoints
    guild = fake.add_guild("Small", upload_limit=20_000)
    channel = fake.add_channel(guild, "edits")
    alice = fake.add_user("alice")
    fake.add_member(guild, alice)
    config = make_config(fake, tmp_path / "data", [guild.id], engine=EngineSettings(device="cpu", max_side=128))
    async with bot_running(fake, config, tiny_models) as bot:
        msg = await finished(fake, await edit(fake, alice, channel, data=png_bytes(128, 128, 4)))
        job = await job_of(bot, msg)
        stored = await bot.store.read_image(job.output_image)
        assert len(stored) > 20_000  # the full PNG is kept on disk
        assert msg.attachments[0].size <= 20_000 and not msg.attachments[0].filename.endswith(".png")


async def test_reply_that_mentions_the_bot_works_without_the_content_intent(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    config = make_config(fake, tmp_path / "data", [guild.id], message_content=False)
    async with bot_running(fake, config, tiny_models) as bot:
        first = await finished(fake, await edit(fake, alice, channel))
        # A reply with the reply-ping switched off does not mention the bot, so without the intent it has no text.
        await fake.send_message(alice, channel, "make it snowy", reply_to=first, mention_reply=False)
        await fake.send_message(alice, channel, f"<@{fake.bot_user.id}> make it rainy", reply_to=first,
                                mentions_bot=True)
        reply = await fake.wait_for(lambda: next((m for m in channel.messages if m.attachments and m.embeds and
                                                  "rainy" in m.embeds[0]["title"]), None), timeout=60)
        assert (await job_of(bot, reply)).kind == "refine"
        assert not [m for m in channel.messages if m.embeds and "snowy" in m.embeds[0]["title"]]


async def test_full_run_never_logs_the_token_and_never_pings_everyone(world, tmp_path, tiny_models, caplog):
    import logging

    fake, guild, channel, alice, *_ = world
    caplog.set_level(logging.DEBUG)
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models):
        msg = await finished(fake, await edit(fake, alice, channel, instruction="@everyone make **it** <@&123> red"))
        assert msg.allowed_mentions.get("parse") == [] and not msg.allowed_mentions.get("roles")
        assert "@everyone" not in msg.embeds[0]["title"].replace("@\u200beveryone", "")
    assert caplog.records and fake.token not in caplog.text


async def test_refine_of_a_result_whose_image_is_gone_is_refused_politely(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        first = await finished(fake, await edit(fake, alice, channel))
        job = await job_of(bot, first)
        bot.store.image_path(job.output_image).unlink()  # pruned from disk, as an operator might
        opened = await fake.click(alice, first, button(first, "refine"))
        await fake.wait_for(lambda: opened.modal)
        submitted = await fake.submit_modal(alice, opened, {"instruction": "now make it night"})
        await fake.wait_for(lambda: submitted.callbacks, timeout=20)
        assert submitted.ephemeral and "no longer stored" in submitted.callbacks[0].data["content"]
        reroll = await fake.click(alice, first, button(first, "reroll"))  # its input is still there: works
        assert (await finished(fake, reroll)).attachments
