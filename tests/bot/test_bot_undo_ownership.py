"""Who owns a result message: the job that made it, even after Undo makes it show someone else's step."""

from __future__ import annotations

import pytest
from botharness import bot_running, button, make_config, png_bytes, team_world
from fakediscord import permissions as perms

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_endpoints):
    return team_world(fake_endpoints, "mod", perms.MANAGE_MESSAGES)


async def private_answer(fake, inter) -> str:
    await fake.wait_for(lambda: inter.callbacks)
    assert inter.ephemeral and not inter.failed
    return inter.callbacks[0].data["content"]


async def test_undo_keeps_the_message_its_makers(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, mod = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        att = fake.upload_user_attachment(channel, "cat.png", png_bytes())
        made = await fake.slash(alice, channel, "edit", {"image": att, "instruction": "make it red", "steps": 3})
        first = await fake.wait_for_original(made, lambda m: m.attachments, timeout=60)
        alice_job = await bot.store.job_by_message(first.id)

        opened = await fake.click(bob, first, button(first, "refine"))  # bob refines alice's result
        await fake.wait_for(lambda: opened.modal)
        refined = await fake.submit_modal(bob, opened, {"instruction": "now make it night"})
        bobs = await fake.wait_for_original(refined, lambda m: m.attachments, timeout=60)

        undo = await fake.click(bob, bobs, button(bobs, "undo"))
        await fake.wait_for(lambda: "Back to the previous step" in (bobs.content or ""))
        assert not undo.failed and (await bot.store.job_by_message(bobs.id)).id == alice_job.id

        # Bob's message now shows alice's step, but it is still bob's: not alice's to delete or undo.
        assert f"<@{bob.id}>" in await private_answer(fake, await fake.click(alice, bobs, button(bobs, "delete")))
        assert f"<@{bob.id}>" in await private_answer(fake, await fake.click(alice, bobs, button(bobs, "undo")))
        assert not bobs.deleted
        # Bob may still undo (there is nothing before alice's first step) and delete his message.
        assert "nothing to undo" in await private_answer(fake, await fake.click(bob, bobs, button(bobs, "undo")))
        deleted = await fake.click(bob, bobs, button(bobs, "delete"))
        await fake.wait_for(lambda: bobs.deleted)
        assert not deleted.failed and not first.deleted
        assert (await bot.store.get_job(alice_job.id)).result_message_id is None  # not pointing at a deleted message
        assert (await bot.store.job_by_message(first.id)).id == alice_job.id  # alice's own message still works
