"""End to end: users edit images through the real bot, over the loopback fake Discord."""

from __future__ import annotations

import pytest
from botharness import bot_running, make_config, png_bytes

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_endpoints):
    fake = fake_endpoints
    guild = fake.add_guild("Lab")
    channel = fake.add_channel(guild, "edits")
    alice = fake.add_user("alice")
    fake.add_member(guild, alice)
    return fake, guild, channel, alice


async def test_edit_happy_path(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models):
        att = fake.upload_user_attachment(channel, "cat.png", png_bytes())
        inter = await fake.slash(alice, channel, "edit", {"image": att, "instruction": "make the sky a sunset",
                                                          "steps": 3, "seed": 42})
        msg = await fake.wait_for_original(inter, lambda m: m.attachments, timeout=60)
        assert inter.ack_delay < 3 and not inter.failed
        assert msg.attachments[0].data.startswith(b"\x89PNG")
        embed = msg.embeds[0]
        assert "The image will be more colorful." in embed["description"]
        fields = {f["name"]: f["value"] for f in embed["fields"]}
        assert fields["Seed"] == "42" and fields["Steps"] == "3"
        assert {"mgie:reroll", "mgie:refine", "mgie:delete"} <= {c.rsplit(":", 1)[0] for c in msg.custom_ids}
        assert not fake.unknown_routes
