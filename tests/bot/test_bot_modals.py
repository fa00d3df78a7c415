"""The instruction modals (the message command's and Refine's) name their input with a Label (component
type 18) in the reader's language, the non-deprecated way, and their submissions still make edits."""

from __future__ import annotations

import warnings

import pytest
from botharness import basic_world, bot_running, button, finished, make_config, png_bytes

from bot import i18n

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_endpoints):
    fake, guild, channel, alice = basic_world(fake_endpoints)
    yuki = fake.add_user("yuki", locale="ja")
    fake.add_member(guild, yuki)
    return fake, guild, channel, alice, yuki


def labelled_input(modal: dict) -> tuple[str, dict]:
    """The modal's one row: a Label (type 18) and the text input it holds."""
    (row,) = modal["components"]
    assert row["type"] == 18, row
    assert row["component"]["type"] == 4 and row["component"]["custom_id"] == "instruction"
    return row["label"], row["component"]


async def test_edit_and_refine_modals_use_labels_in_the_readers_language(world, tmp_path, tiny_models):
    fake, guild, channel, alice, yuki = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models):
        att = fake.upload_user_attachment(channel, "cat.png", png_bytes())
        post = await fake.send_message(alice, channel, "look at this", attachments=[att])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            menu = await fake.context_menu(yuki, post, "Edit image with MGIE")
            await fake.wait_for(lambda: menu.modal)
            label, field = labelled_input(menu.modal)
            assert label == i18n.text("edit.modal_label", "ja") and menu.modal["title"] == i18n.text(
                "edit.modal_title", "ja")
            assert field["placeholder"] == i18n.text("edit.modal_placeholder", "ja")
            result = await finished(fake, await fake.submit_modal(yuki, menu, {"instruction": "帽子をかぶせて"}))

            refine = await fake.click(alice, result, button(result, "refine"))  # alice reads English
            await fake.wait_for(lambda: refine.modal)
            label, field = labelled_input(refine.modal)
            assert label == i18n.text("results.refine_label", "en-US") == "What should change next?"
            assert field["placeholder"] == i18n.text("results.refine_placeholder", "en-US")
            refined = await finished(fake, await fake.submit_modal(alice, refine, {"instruction": "now make it night"}))
        assert "now make it night" in refined.embeds[0]["title"]
        # discord.py's "label is deprecated, use discord.ui.Label instead." (the engine's torch ones aside)
        assert not [str(w.message) for w in caught if "discord.ui" in str(w.message)]
