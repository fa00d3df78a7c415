"""Before / after through the fake Discord: the Compare button, the /history picker and /mgie help.

Each comparison is checked pixel by pixel: the left picture is the turn's own input, the right one its
result, side by side under a label band, in a private answer to whoever asked.
"""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from botharness import bot_running, button, edit, finished, make_config, private_answer, team_world
from fakediscord import permissions as perms
from PIL import Image

from bot import i18n

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_endpoints):
    return team_world(fake_endpoints, "mod", perms.MANAGE_MESSAGES)


async def _job_by_message(bot, message, timeout: float = 10.0):
    """The stored job a message shows, once the bot has recorded it (it posts first, then records)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (job := await bot.store.job_by_message(message.id)) is None:
        assert loop.time() < deadline, f"no job recorded for message {message.id}"
        await asyncio.sleep(0.05)
    return job


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


async def comparison(fake, inter) -> np.ndarray:
    """The private comparison an interaction got: one image attachment, only the presser sees it."""
    msg = await fake.wait_for_original(inter, lambda m: m.attachments, timeout=20)
    assert inter.ephemeral and msg.ephemeral and not inter.failed
    assert len(msg.attachments) == 1
    return pixels(msg.attachments[0].data)


def assert_side_by_side(image: np.ndarray, before: bytes, after: bytes) -> None:
    """``image`` is ``before`` then ``after`` at one height, under a label band, a small gap between."""
    left, right = pixels(before), pixels(after)
    height, width = left.shape[:2]
    assert right.shape[:2] == (height, width)
    gap = image.shape[1] - 2 * width
    assert 0 < gap <= 8, image.shape  # about the width of both pictures side by side
    band = image.shape[0] - height
    assert band > 10  # room for the labels
    assert np.array_equal(image[band:, :width], left)
    assert np.array_equal(image[band:, width + gap:], right)
    assert image[:band].std() > 0  # something (the labels) is drawn in the band


async def test_compare_shows_the_input_and_the_result_privately_to_whoever_presses(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, _mod = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        result = await finished(fake, await edit(fake, alice, channel, seed=7))
        job = await _job_by_message(bot, result)
        before, after = await bot.store.read_image(job.input_image), await bot.store.read_image(job.output_image)
        public = len(channel.visible_messages)

        for presser in (alice, bob):  # the requester, and someone else: both get it, privately
            pressed = await fake.click(presser, result, button(result, "compare"))
            assert_side_by_side(await comparison(fake, pressed), before, after)
            assert "make the sky a sunset" in pressed.original.content
        assert len(channel.visible_messages) == public  # nothing public was posted or changed
        assert result.attachments[0].data == after


async def test_a_refine_turn_compares_with_its_own_input(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, _mod = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        first = await finished(fake, await edit(fake, alice, channel, seed=5))
        opened = await fake.click(bob, first, button(first, "refine"))
        await fake.wait_for(lambda: opened.modal)
        second = await finished(fake, await fake.submit_modal(bob, opened, {"instruction": "now make it night"}))
        first_job, second_job = await _job_by_message(bot, first), await _job_by_message(bot, second)
        turn_input = await bot.store.read_image(first_job.output_image)  # turn 2 started from turn 1's result

        pressed = await fake.click(alice, second, button(second, "compare"))
        assert_side_by_side(await comparison(fake, pressed), turn_input,
                            await bot.store.read_image(second_job.output_image))
        # The first turn still compares with the upload it started from.
        pressed = await fake.click(alice, first, button(first, "compare"))
        assert_side_by_side(await comparison(fake, pressed), await bot.store.read_image(first_job.input_image),
                            turn_input)


async def test_compare_of_an_edit_whose_input_is_gone_says_so_privately(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, _mod = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        result = await finished(fake, await edit(fake, alice, channel))
        job = await _job_by_message(bot, result)
        bot.store.image_path(job.input_image).unlink()  # pruned by retention, or forgotten on request

        answer = await private_answer(fake, await fake.click(bob, result, button(result, "compare")))
        assert answer == i18n.text("compare.input_gone")
        history = await fake.slash(alice, channel, "history")
        await fake.wait_for(lambda: history.callbacks)
        picked = await fake.select(alice, history.original, "mgie:history-compare", [job.id])
        assert await private_answer(fake, picked) == i18n.text("compare.input_gone")


async def test_compare_and_the_history_picker_work_after_a_restart(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    config = make_config(fake, tmp_path / "data", [guild.id])
    async with bot_running(fake, config, tiny_models):
        result = await finished(fake, await edit(fake, alice, channel, instruction="turn the leaves green"))
        history = await fake.slash(alice, channel, "history")
        await fake.wait_for(lambda: history.callbacks)
    async with bot_running(fake, config, tiny_models) as bot:
        job = await _job_by_message(bot, result)
        before, after = await bot.store.read_image(job.input_image), await bot.store.read_image(job.output_image)
        pressed = await fake.click(alice, result, button(result, "compare"))
        assert_side_by_side(await comparison(fake, pressed), before, after)

        # The /history answer from before the restart: its picker lists the edit and shows its comparison.
        picker = history.original.find_component("mgie:history-compare")
        assert [o["value"] for o in picker["options"]] == [job.id]
        assert "turn the leaves green" in picker["options"][0]["label"]
        picked = await fake.select(alice, history.original, "mgie:history-compare", [job.id])
        assert_side_by_side(await comparison(fake, picked), before, after)


async def test_mgie_help_answers_privately_in_the_users_language(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    claire = fake.add_user("claire", locale="fr")
    fake.add_member(guild, claire)
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models):
        answers = {}
        for user in (alice, claire):
            inter = await fake.slash(user, channel, "mgie help")
            await fake.wait_for(lambda inter=inter: inter.callbacks)
            assert inter.ephemeral and not inter.failed
            answers[user.username] = inter.callbacks[0].data["embeds"][0]
    english, french = answers["alice"], answers["claire"]
    assert english["title"] == i18n.text("help.title", "en-US") and french["title"] == i18n.text("help.title", "fr")
    assert french["title"] != english["title"] and french["description"] == i18n.text("help.about", "fr")
    fields = {f["name"]: f["value"] for f in french["fields"]}
    assert "```" in fields["Préréglages"] and "preserve" in fields["Préréglages"]  # the one table
    assert "CFG image" in fields["CFG texte et CFG image"]


async def test_a_flagged_result_compares_behind_a_spoiler_or_not_at_all_as_the_server_says(world, tmp_path,
                                                                                           tiny_models):
    fake, guild, channel, alice, bob, _mod = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        await bot.engine.workers[0].wait_ready()  # loading sets the check: replace it after
        bot.engine.workers[0].safety_check = lambda image: True  # flags everything
        result = await fake.wait_for_original(await edit(fake, alice, channel), lambda m: m.attachments, timeout=60)
        assert result.attachments[0].filename.startswith("SPOILER_")

        pressed = await fake.click(bob, result, button(result, "compare"))
        shown = await fake.wait_for_original(pressed, lambda m: m.attachments, timeout=20)
        assert pressed.ephemeral and shown.attachments[0].filename.startswith("SPOILER_")

        await bot.store.update_guild_settings(guild.id, flagged_outputs="withhold")
        withheld = await private_answer(fake, await fake.click(bob, result, button(result, "compare")))
        assert withheld == i18n.text("compare.withheld")


async def test_after_forget_me_a_refine_of_that_persons_image_says_its_original_is_gone(world, tmp_path,
                                                                                         tiny_models):
    fake, guild, channel, alice, bob, _mod = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        first = await finished(fake, await edit(fake, alice, channel))
        opened = await fake.click(bob, first, button(first, "refine"))  # bob builds on alice's result
        await fake.wait_for(lambda: opened.modal)
        refined = await finished(fake, await fake.submit_modal(bob, opened, {"instruction": "add snow"}))
        refine_job = await _job_by_message(bot, refined)

        asked = await fake.slash(alice, channel, "mgie forget-me")
        await fake.wait_for(lambda: asked.callbacks)
        await fake.click(alice, asked.original, f"mgie-forget:yes:{alice.id}")
        await fake.wait_for(lambda: "Done" in (asked.original.content or ""), timeout=60)
        assert (await bot.store.get_job(refine_job.id)).input_image == ""  # alice's image is gone

        answer = await private_answer(fake, await fake.click(bob, refined, button(refined, "compare")))
        assert answer == i18n.text("compare.input_gone")
