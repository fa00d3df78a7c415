"""The fake Discord, exercised by a small unmodified discord.py bot over 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands
from discord.webhook.async_ import async_context, interaction_response_params
from fakediscord import FakeDiscord, errors
from fakediscord import permissions as perms
from fakediscord.runner import TEST_HEARTBEAT_INTERVAL, running_bot
from PIL import Image, ImageOps

from bot.discord_endpoints import apply_endpoints

pytest_plugins = ["fakediscord.fixtures"]


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def inverted(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        out = ImageOps.invert(img.convert("RGB"))
    buf = io.BytesIO()
    out.save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Probe:
    """What the throwaway bot saw or suffered, for the tests to check."""

    errors: list[BaseException] = field(default_factory=list)
    filesize_limit: int | None = None
    permissions: dict[str, bool] = field(default_factory=dict)
    modal_values: tuple[str, str] | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)


def make_bot(probe: Probe) -> commands.Bot:
    """A throwaway bot: defer+edit with a file, a button, a modal, a context menu and replies."""
    intents = discord.Intents.default()
    intents.message_content = True
    bot = commands.Bot(command_prefix="!", intents=intents, guild_ready_timeout=0.1)

    class InvertView(discord.ui.View):
        @discord.ui.button(label="Invert", custom_id="invert", style=discord.ButtonStyle.primary)
        async def invert(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
            button.disabled = True
            await interaction.response.edit_message(content=f"inverted by {interaction.user.name}", view=self)

        @discord.ui.select(custom_id="strength", options=[discord.SelectOption(label="Low", value="low"),
                                                         discord.SelectOption(label="High", value="high")])
        async def strength(self, interaction: discord.Interaction, select: discord.ui.Select) -> None:
            await interaction.response.defer()  # DEFERRED_UPDATE_MESSAGE: @original is this message
            await interaction.edit_original_response(content=f"strength: {select.values[0]}")

    class FeedbackModal(discord.ui.Modal, title="Feedback"):
        comment: discord.ui.TextInput = discord.ui.TextInput(label="Comment", custom_id="comment")
        rating: discord.ui.Label = discord.ui.Label(
            text="Rating", component=discord.ui.TextInput(custom_id="rating", max_length=2))

        async def on_submit(self, interaction: discord.Interaction) -> None:
            rating = self.rating.component
            assert isinstance(rating, discord.ui.TextInput)
            probe.modal_values = (self.comment.value, rating.value)
            await interaction.response.send_message(f"thanks: {self.comment.value} ({rating.value})", ephemeral=True)

    @bot.tree.command(name="edit", description="Edit an image")
    async def edit(interaction: discord.Interaction, image: discord.Attachment, instruction: str) -> None:
        probe.filesize_limit = interaction.filesize_limit
        await interaction.response.defer(thinking=True)
        data = await image.read()
        await interaction.edit_original_response(
            content=f"Edited: {instruction}",
            attachments=[discord.File(io.BytesIO(inverted(data)), filename="edited image.png")],
            view=InvertView(),
        )

    async def style_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        styles = ["watercolor", "wax", "oil", "pencil"]
        return [app_commands.Choice(name=s, value=s) for s in styles if s.startswith(current)]

    @bot.tree.command(name="style", description="Pick a style")
    @app_commands.autocomplete(style=style_choices)
    async def style(interaction: discord.Interaction, style: str) -> None:
        await interaction.response.send_message(style)

    @bot.tree.command(name="feedback", description="Tell us what you think")
    async def feedback(interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(FeedbackModal())

    @bot.tree.command(name="twice", description="Answers twice (a bug)")
    async def twice(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("first")
        adapter = async_context.get()
        try:  # go around discord.py's own InteractionResponded guard, as a second code path would
            await adapter.create_interaction_response(
                interaction.id, interaction.token, session=interaction._session,
                params=interaction_response_params(4, {"content": "second"}))
        except discord.HTTPException as exc:
            probe.errors.append(exc)

    @bot.tree.command(name="slow", description="Waits before answering")
    async def slow(interaction: discord.Interaction) -> None:
        await probe.release.wait()
        try:
            await interaction.response.send_message("finally")
        except discord.HTTPException as exc:
            probe.errors.append(exc)

    @bot.tree.command(name="long", description="Defers, then answers much later")
    async def long(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        await probe.release.wait()
        try:
            await interaction.edit_original_response(content="done at last")
        except discord.HTTPException as exc:
            probe.errors.append(exc)

    @bot.tree.command(name="steps", description="Thinks privately, then follows up")
    async def steps(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await interaction.followup.send("step 1")
        await interaction.followup.send("step 2", ephemeral=False)
        await interaction.delete_original_response()

    @bot.tree.command(name="perm", description="Reports the caller's permissions")
    async def perm(interaction: discord.Interaction) -> None:
        probe.permissions = {"manage_messages": interaction.permissions.manage_messages,
                             "manage_guild": interaction.permissions.manage_guild}
        await interaction.response.send_message("noted", ephemeral=True)

    @bot.tree.context_menu(name="Invert image")
    async def invert_menu(interaction: discord.Interaction, message: discord.Message) -> None:
        data = await message.attachments[0].read()
        await interaction.response.send_message(file=discord.File(io.BytesIO(inverted(data)), "inverted.png"))

    @bot.listen("on_message")
    async def replies(message: discord.Message) -> None:
        ref = message.reference
        if message.author.bot or ref is None or not isinstance(ref.resolved, discord.Message):
            return
        if ref.resolved.author == bot.user:
            await message.reply(f"you said: {message.content}", mention_author=False)

    async def setup_hook() -> None:
        await bot.tree.sync()

    bot.setup_hook = setup_hook  # type: ignore[method-assign]
    return bot


@dataclass
class World:
    fake: FakeDiscord
    bot: commands.Bot
    probe: Probe
    guild: Any
    channel: Any
    alice: Any


@pytest.fixture
async def world(fake_endpoints: FakeDiscord) -> Any:
    fake = fake_endpoints
    guild = fake.add_guild("Image Lab")
    channel = fake.add_channel(guild, "edits")
    alice = fake.add_user("alice")
    fake.add_member(guild, alice)
    probe = Probe()
    bot = make_bot(probe)
    async with running_bot(bot, fake.token):
        yield World(fake, bot, probe, guild, channel, alice)
    assert fake.unknown_routes == []


async def test_login_ready_and_command_sync(world: World) -> None:
    fake, bot = world.fake, world.bot
    assert bot.user is not None and bot.user.id == fake.bot_user.id
    assert [g.id for g in bot.guilds] == [world.guild.id]
    assert bot.get_channel(world.channel.id) is not None
    names = {c.name for c in fake.commands}
    assert {"edit", "feedback", "twice", "slow", "long", "perm", "steps", "style", "Invert image"} <= names
    edit = fake.command("edit")
    assert [o["name"] for o in edit.options] == ["image", "instruction"]
    assert fake.command("Invert image", type=3).id
    conn = fake.gateway.connections[0]
    # zlib-stream normally; zstd-stream when zstandard (or Python 3.14's compression.zstd) is importable
    assert conn.compression == discord.utils._ActiveDecompressionContext.COMPRESSION_TYPE
    assert conn._encoder is not None  # frames really were compressed the way discord.py asked
    assert [r.route for r in fake.requests[:3]] == [
        "GET /users/@me", "GET /oauth2/applications/@me", "PUT /applications/{application_id}/commands"]


async def test_slash_defer_then_edit_with_uploaded_png(world: World) -> None:
    fake = world.fake
    source = png_bytes()
    att = fake.upload_user_attachment(world.channel, "cat.png", source)
    inter = await fake.slash(world.alice, world.channel, "edit", {"image": att, "instruction": "make it blue"})
    msg = await fake.wait_for_original(inter)

    assert [c.type for c in inter.callbacks] == [5]
    assert inter.ack_delay is not None and inter.ack_delay < 3
    assert not inter.ephemeral and not inter.failed
    assert msg.content == "Edited: make it blue"
    [out] = msg.attachments
    assert out.filename == "edited_image.png"  # Discord's filename sanitising
    assert out.content_type == "image/png" and (out.width, out.height) == (12, 8)
    assert out.data == inverted(source)
    assert world.probe.filesize_limit == 10 * 1024 * 1024
    assert msg.custom_ids == ["invert", "strength"]
    assert msg in world.channel.visible_messages
    async with aiohttp.ClientSession() as http:  # the CDN serves the stored bytes at the signed URL
        async with http.get(out.url) as resp:
            assert resp.status == 200 and await resp.read() == out.data
        async with http.get(out.url.split("?")[0]) as resp:
            assert resp.status == 404  # unsigned links are refused, as on Discord's CDN


async def test_button_click_updates_message(world: World) -> None:
    fake = world.fake
    att = fake.upload_user_attachment(world.channel, "cat.png", png_bytes())
    inter = await fake.slash(world.alice, world.channel, "edit", {"image": att, "instruction": "x"})
    msg = await fake.wait_for_original(inter)

    click = await fake.click(world.alice, msg, "invert")
    await fake.wait_for(lambda: msg.content.startswith("inverted"))
    assert [c.type for c in click.callbacks] == [7]
    assert click.payload["message"]["id"] == str(msg.id)
    assert click.original is msg and msg.content == "inverted by alice"
    assert msg.find_component("invert")["disabled"] is True
    with pytest.raises(ValueError, match="disabled"):
        await fake.click(world.alice, msg, "invert")

    picked = await fake.select(world.alice, msg, "strength", ["high"])
    await fake.wait_for(lambda: msg.content == "strength: high")
    assert [c.type for c in picked.callbacks] == [6] and picked.original is msg
    assert picked.payload["data"]["values"] == ["high"]


async def test_autocomplete(world: World) -> None:
    fake = world.fake
    inter = await fake.autocomplete(world.alice, world.channel, "style", {"style": "wa"}, focused="style")
    await fake.wait_for_ack(inter)
    assert inter.response_type == 8
    assert [c["name"] for c in inter.callbacks[0].data["choices"]] == ["watercolor", "wax"]


async def test_modal_submit(world: World) -> None:
    fake = world.fake
    opened = await fake.slash(world.alice, world.channel, "feedback")
    await fake.wait_for_ack(opened)
    assert opened.response_type == 9 and opened.modal is not None
    rows = opened.modal["components"]
    assert [r["type"] for r in rows] == [1, 18]  # a bare TextInput is wrapped in an ActionRow; Label stays

    with pytest.raises(ValueError, match="longer"):  # the Discord client would not let this through
        await fake.submit_modal(world.alice, opened, {"comment": "x", "rating": "100"})
    submitted = await fake.submit_modal(world.alice, opened, {"comment": "lovely", "rating": "5"})
    reply = await fake.wait_for_original(submitted)
    assert world.probe.modal_values == ("lovely", "5")
    assert reply.content == "thanks: lovely (5)" and reply.ephemeral and submitted.ephemeral
    assert reply not in world.channel.visible_messages
    with pytest.raises(ValueError, match="already submitted"):
        await fake.submit_modal(world.alice, opened, {"comment": "again", "rating": "4"})


async def test_reply_to_bot_message_gets_reply(world: World) -> None:
    fake = world.fake
    att = fake.upload_user_attachment(world.channel, "cat.png", png_bytes())
    inter = await fake.slash(world.alice, world.channel, "edit", {"image": att, "instruction": "x"})
    bot_msg = await fake.wait_for_original(inter)

    mine = await fake.send_message(world.alice, world.channel, "now bluer", reply_to=bot_msg)
    answer = await fake.wait_for(lambda: next((m for m in world.channel.messages
                                                if m.referenced is mine and m.author is fake.bot_user), None))
    assert answer.content == "you said: now bluer"
    assert answer.message_reference is not None and answer.message_reference["message_id"] == str(mine.id)
    assert answer.allowed_mentions is not None and answer.allowed_mentions["replied_user"] is False
    assert world.alice not in answer.mentions  # mention_author=False means no ping


async def test_message_context_menu(world: World) -> None:
    fake = world.fake
    att = fake.upload_user_attachment(world.channel, "dog.png", png_bytes((10, 20, 30)))
    posted = await fake.send_message(world.alice, world.channel, "look", attachments=[att])
    inter = await fake.context_menu(world.alice, posted, "Invert image")
    msg = await fake.wait_for_original(inter)
    assert inter.payload["data"]["resolved"]["messages"][str(posted.id)]["id"] == str(posted.id)
    assert msg.attachments[0].data == inverted(att.data)


async def test_followups_after_ephemeral_thinking_defer(world: World) -> None:
    fake = world.fake
    inter = await fake.slash(world.alice, world.channel, "steps")
    await fake.wait_for(lambda: inter.original_deleted)
    original = inter.original
    assert original is not None and original.content == "step 1"  # first follow-up filled the placeholder
    assert original.ephemeral and not original.loading and original.deleted
    [second] = inter.followups
    assert second.content == "step 2" and not second.ephemeral
    assert world.channel.visible_messages == [second]
    assert second.interaction is inter


async def test_second_initial_callback_is_rejected_40060(world: World) -> None:
    fake = world.fake
    inter = await fake.slash(world.alice, world.channel, "twice")
    await fake.wait_for(lambda: world.probe.errors)
    [exc] = world.probe.errors
    assert isinstance(exc, discord.HTTPException) and exc.status == 400 and exc.code == 40060
    assert [c.type for c in inter.callbacks] == [4] and inter.original is not None
    assert inter.original.content == "first"
    assert [(r.status, r.code) for r in inter.rejected] == [(400, 40060)]


async def test_no_callback_within_3s_fails(world: World) -> None:
    fake = world.fake
    inter = await fake.slash(world.alice, world.channel, "slow")
    fake.clock.advance(3.1)
    assert inter.failed and not inter.acknowledged
    world.probe.release.set()
    await fake.wait_for(lambda: world.probe.errors)
    [exc] = world.probe.errors
    assert isinstance(exc, discord.NotFound) and exc.code == 10062
    assert inter.rejected[0].code == 10062


async def test_interaction_token_expires_after_15_minutes(world: World) -> None:
    fake = world.fake
    inter = await fake.slash(world.alice, world.channel, "long")
    await fake.wait_for_ack(inter)
    assert inter.thinking
    fake.clock.advance(15 * 60 + 1)
    world.probe.release.set()
    await fake.wait_for(lambda: world.probe.errors)
    [exc] = world.probe.errors
    assert isinstance(exc, discord.HTTPException) and (exc.status, exc.code) == (401, 50027)
    assert inter.thinking  # the user is left with "thinking..."


@pytest.mark.parametrize("code", [4000, None], ids=["close-4000", "abrupt"])
async def test_gateway_drop_resumes_and_replays(world: World, code: int | None) -> None:
    fake = world.fake
    resumed = asyncio.Event()

    async def on_resumed() -> None:
        resumed.set()

    world.bot.add_listener(on_resumed)
    assert await fake.drop_gateway(code) == 1
    # Created while the bot is disconnected: must arrive through RESUME's replay.
    inter = await fake.slash(world.alice, world.channel, "perm")
    await asyncio.wait_for(resumed.wait(), 10)
    await fake.wait_for_original(inter)
    assert fake.gateway.resume_count == 1 and fake.gateway.identify_count == 1
    assert fake.gateway.live_connections[0].via_resume_url
    after = await fake.slash(world.alice, world.channel, "perm")
    assert (await fake.wait_for_original(after)).content == "noted"


async def test_invalidated_session_reidentifies(world: World) -> None:
    fake = world.fake

    async def no_identify_delay(shard_id: int | None, *, initial: bool = False) -> None:
        return None  # discord.py's default waits 5 s before every non-initial IDENTIFY

    world.bot.before_identify_hook = no_identify_delay  # type: ignore[method-assign]
    await fake.invalidate_session(resumable=False)
    await fake.wait_for(lambda: fake.gateway.identify_count == 2 and fake.gateway.connected)
    inter = await fake.slash(world.alice, world.channel, "perm")
    assert (await fake.wait_for_original(inter)).content == "noted"


async def test_member_permissions_and_dm(world: World) -> None:
    fake = world.fake
    mod = fake.add_user("mod")
    fake.add_member(world.guild, mod, permissions=perms.MANAGE_MESSAGES)
    inter = await fake.slash(mod, world.channel, "perm")
    await fake.wait_for_original(inter)
    assert world.probe.permissions == {"manage_messages": True, "manage_guild": False}
    await fake.wait_for_original(await fake.slash(world.alice, world.channel, "perm"))
    assert world.probe.permissions == {"manage_messages": False, "manage_guild": False}

    dm = fake.dm_channel(world.alice)
    in_dm = await fake.slash(world.alice, dm, "perm")
    await fake.wait_for_original(in_dm)
    assert "guild_id" not in in_dm.payload and in_dm.payload["user"]["id"] == str(world.alice.id)
    assert in_dm.payload["context"] == 1


async def test_user_install_in_a_server_without_the_bot(world: World) -> None:
    fake, alice = world.fake, world.alice
    club = fake.add_guild("Club", with_bot=False)
    art, bob = fake.add_channel(club, "art"), fake.add_user("bob")
    fake.add_member(club, alice)
    fake.add_member(club, bob)
    fake.set_overwrite(art, club.everyone, deny=perms.MENTION_EVERYONE)
    assert [g.id for g in world.bot.guilds] == [world.guild.id]
    assert not [e for e in fake.gateway.events if isinstance(e[3], dict) and e[3].get("guild_id") == str(club.id)]
    with pytest.raises(PermissionError):  # installed neither in Club nor for alice: no command to offer
        await fake.slash(alice, art, "perm")

    fake.install_for_user(alice)
    inter = await fake.slash(alice, art, "edit", {"image": fake.upload_user_attachment(art, "a.png", png_bytes()),
                                                  "instruction": "x"})
    msg = await fake.wait_for_original(inter, lambda m: m.attachments)
    assert inter.payload["authorizing_integration_owners"] == {"1": str(alice.id)}
    assert int(inter.payload["app_permissions"]) == perms.everyone_permissions(art) == (
        perms.DEFAULT_EVERYONE & ~perms.MENTION_EVERYONE)
    assert not msg.ephemeral and msg in art.visible_messages
    click = await fake.click(bob, msg, "invert")  # components carry the owners of the message's interaction
    await fake.wait_for(lambda: click.callbacks)
    assert click.payload["authorizing_integration_owners"] == {"1": str(alice.id)}
    both = await fake.slash(alice, world.channel, "perm")  # in the bot's server both installs apply
    assert both.payload["authorizing_integration_owners"] == {"0": str(world.guild.id), "1": str(alice.id)}
    assert int(both.payload["app_permissions"]) == fake.state.bot_permissions(world.channel)

    fake.set_overwrite(art, club.everyone, deny=perms.ATTACH_FILES)  # responses are held to app_permissions
    denied = await fake.slash(alice, art, "edit", {"image": fake.upload_user_attachment(art, "a.png", png_bytes()),
                                                   "instruction": "x"})
    await fake.wait_for(lambda: denied.rejected)
    assert (denied.rejected[0].status, denied.rejected[0].code) == (403, 50013)

    fake.set_overwrite(art, club.everyone, deny=perms.USE_EXTERNAL_APPS)  # only alice sees the answers now
    quiet = await fake.slash(alice, art, "edit", {"image": fake.upload_user_attachment(art, "a.png", png_bytes()),
                                                  "instruction": "x"})
    private = await fake.wait_for_original(quiet, lambda m: m.attachments)
    assert quiet.ephemeral and private.ephemeral and private not in art.visible_messages


async def test_message_content_intent_is_enforced(fake_endpoints: FakeDiscord) -> None:
    fake = fake_endpoints
    guild = fake.add_guild()
    channel = fake.add_channel(guild, "chat")
    bob = fake.add_user("bob")
    seen: list[str] = []
    client = discord.Client(intents=discord.Intents.default(), guild_ready_timeout=0.1)

    @client.event
    async def on_message(message: discord.Message) -> None:
        seen.append(message.content)

    async with running_bot(client, fake.token):
        await fake.send_message(bob, channel, "private chatter")
        await fake.send_message(bob, channel, "hey bot", mentions_bot=True)
        await fake.send_message(bob, fake.dm_channel(bob), "in a DM")
        await fake.wait_for(lambda: len(seen) == 3)
    assert seen == ["", f"{fake.bot_user.mention} hey bot", "in a DM"]


async def test_privileged_intent_not_enabled_closes_4014(fake_endpoints: FakeDiscord) -> None:
    fake_endpoints.state.privileged_intents = 0  # as if the portal toggle were off
    bot = make_bot(Probe())  # asks for message_content
    with pytest.raises(discord.PrivilegedIntentsRequired):
        await asyncio.wait_for(bot.start(fake_endpoints.token), 10)
    await bot.close()


async def test_rate_limit_429_is_retried(world: World) -> None:
    fake = world.fake
    fake.inject_429("POST /channels/{channel_id}/messages", retry_after=0.2)
    channel = world.bot.get_channel(world.channel.id)
    assert isinstance(channel, discord.TextChannel)
    sent = await channel.send("hello")
    assert [h.injected for h in fake.rate_limit_hits] == [True]
    assert world.channel.last_message is not None and world.channel.last_message.id == sent.id
    statuses = [r.status for r in fake.requests_to("POST /channels/{channel_id}/messages")]
    assert statuses == [429, 200]


async def test_injected_rest_error_fails_the_next_matching_call_only(world: World) -> None:
    fake = world.fake
    route = "POST /channels/{channel_id}/messages"
    fake.inject_error(route, errors.missing_permissions())
    channel = world.bot.get_channel(world.channel.id)
    assert isinstance(channel, discord.TextChannel)
    with pytest.raises(discord.Forbidden):
        await channel.send("refused")
    sent = await channel.send("hello")
    assert world.channel.last_message is not None and world.channel.last_message.id == sent.id
    assert [(r.status, r.code) for r in fake.requests_to(route)] == [(403, 50013), (200, None)]


async def test_heartbeats_are_recorded(world: World) -> None:
    fake = world.fake
    await fake.wait_for(lambda: len(fake.heartbeats) >= 4, timeout=5)
    assert fake.max_heartbeat_gap() < TEST_HEARTBEAT_INTERVAL * 1.5
    conn = fake.gateway.live_connections[0]
    assert all(s is not None for s in conn.heartbeat_seqs[1:])  # heartbeats carry the last sequence


async def test_rest_basics_content_type_and_unknown_routes(fake_discord: FakeDiscord) -> None:
    fake = fake_discord
    auth = {"Authorization": f"Bot {fake.token}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{fake.api_base}/users/@me", headers=auth) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/json"
            for header in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
                           "X-RateLimit-Reset-After", "X-RateLimit-Bucket"):
                assert header in resp.headers
        async with http.get(f"{fake.api_base}/users/@me", headers={"Authorization": "Bot nope"}) as resp:
            assert resp.status == 401 and await resp.json() == {"message": "401: Unauthorized", "code": 0}
        async with http.get(f"{fake.api_base}/no/such/route", headers=auth) as resp:
            assert resp.status == 404
    assert fake.unknown_routes == [("GET", "/no/such/route")]
    fake.unknown_routes.clear()


async def test_wrong_token_is_login_failure(fake_endpoints: FakeDiscord) -> None:
    bot = make_bot(Probe())
    with pytest.raises(discord.LoginFailure):
        await bot.login("not-the-token")
    await bot.close()
    assert fake_endpoints.requests[-1].status == 401


def test_apply_endpoints_round_trip() -> None:
    from discord.gateway import DiscordWebSocket
    from discord.http import Route

    apply_endpoints("http://127.0.0.1:1/api/v10/", "ws://127.0.0.1:1/gateway")
    try:
        assert Route.BASE == "http://127.0.0.1:1/api/v10"
        assert Route("GET", "/users/@me").url == "http://127.0.0.1:1/api/v10/users/@me"
        assert str(DiscordWebSocket.DEFAULT_GATEWAY) == "ws://127.0.0.1:1/gateway"
    finally:
        apply_endpoints(None, None)
    assert Route.BASE == "https://discord.com/api/v10"
    assert str(DiscordWebSocket.DEFAULT_GATEWAY) == "wss://gateway.discord.gg/"


def test_command_localizations_are_checked_like_discord_does() -> None:
    """Localized names follow the name rules, keys are Discord's locales, descriptions stay <= 100."""
    from fakediscord.validation import check_command

    good = {"name": "edit", "description": "Edit", "type": 1,
            "name_localizations": {"de": "bearbeiten", "ja": "編集"}, "description_localizations": {"fr": "Modifie"},
            "options": [{"name": "image", "description": "The image", "type": 11, "required": True,
                         "name_localizations": {"es-ES": "imagen"}}]}
    check_command(good)
    for key, value in (("name_localizations", {"de": "Bild Bearbeiten"}),  # a space and capitals
                         ("name_localizations", {"german": "bearbeiten"}),  # not a Discord locale
                         ("description_localizations", {"fr": "x" * 101})):
        with pytest.raises(errors.ApiError) as caught:
            check_command(dict(good, **{key: value}))
        assert caught.value.status == 400
    bad_option = dict(good, options=[dict(good["options"][0], name_localizations={"ja": "画 像"})])
    with pytest.raises(errors.ApiError):
        check_command(bad_option)
