"""A loopback fake Discord that an unmodified discord.py 2.7 bot talks to over 127.0.0.1.

It serves the REST API (``/api/v10``), the gateway websocket and the attachment CDN from one
aiohttp app, so the bot is tested the way users use it: a person runs a slash command, clicks
a button, fills a modal or replies to the bot, and the test checks what Discord would show.
It is strict where Discord is (3 s to acknowledge, one initial response, 15-minute tokens,
message limits, permissions, intents) so bugs that would only show up live fail here first.

Quick start (the fixtures live in ``fakediscord.fixtures``; add
``pytest_plugins = ["fakediscord.fixtures"]`` to a test module or conftest)::

    async def test_edit(fake_endpoints):            # a started FakeDiscord + apply_endpoints()
        fake = fake_endpoints
        guild = fake.add_guild("Lab")
        channel = fake.add_channel(guild, "edits")
        alice = fake.add_user("alice")
        bot = make_my_bot()                           # commands.Bot(..., guild_ready_timeout=0.1)
        async with running_bot(bot, fake.token):      # from fakediscord.runner
            att = fake.upload_user_attachment(channel, "cat.png", png_bytes)
            inter = await fake.slash(alice, channel, "edit", {"image": att, "instruction": "make it blue"})
            msg = await fake.wait_for_original(inter)
            assert inter.ack_delay < 3 and msg.attachments[0].data.startswith(b"\\x89PNG")

Setting up (``FakeDiscord``)
    ``FakeDiscord(*, token="fake-bot-token", bot_name="FakeBot", heartbeat_interval=41.25,
    zombie_timeout=None, ack_deadline=3.0, token_lifetime=900.0,
    privileged_intents=intents.PRIVILEGED, host="127.0.0.1", clock=None)``;
    ``await fake.start(port=0) -> FakeDiscord`` / ``await fake.stop()`` or ``async with``.
    ``fake.api_base`` (``http://127.0.0.1:PORT/api/v10``), ``fake.gateway_url``
    (``ws://127.0.0.1:PORT/gateway``), ``fake.base_url``, ``fake.token``, ``fake.bot_user``,
    ``fake.application_id``, ``fake.clock`` (:class:`FakeClock`: ``now()``, ``advance(s)``).

Building the world (all synchronous; each dispatches the gateway event Discord would send)
    ``add_user(username, *, global_name=None, locale="en-US", bot=False) -> User``
    ``add_guild(name="Test Guild", *, owner=None, bot_permissions=perms.DEFAULT_BOT,
    everyone_permissions=perms.DEFAULT_EVERYONE, locale="en-US", upload_limit=10 MiB,
    with_bot=True) -> Guild`` (the bot joins with a managed role; GUILD_CREATE if connected;
    ``with_bot=False``: a server the app is not installed in, of which the bot sees nothing)
    ``install_for_user(user)`` — the user adds the app to their account (user install): its
    user-installable commands then work for them in servers without the bot and in DMs, with
    ``authorizing_integration_owners`` ``{"1": user id}``, ``app_permissions`` those of ``@everyone``
    in the channel, and every response ephemeral where they lack Use External Apps
    ``add_channel(guild, name, *, nsfw=False, topic=None) -> Channel``
    ``add_role(guild, name, permissions=0) -> Role``
    ``add_member(guild, user, *, roles=(), permissions=None, nick=None) -> Member`` —
    ``permissions=perms.MANAGE_MESSAGES | perms.MANAGE_GUILD`` adds a role granting them
    ``set_overwrite(channel, role_or_user, *, allow=0, deny=0)``;
    ``set_bot_permissions(guild, permissions)``; ``dm_channel(user) -> Channel``

What users do (async; each returns at once, the bot answers asynchronously)
    ``upload_user_attachment(channel, filename, data, content_type=None) -> Attachment``
    ``slash(user, channel, name, options=None, *, locale=None) -> InteractionRecord`` — name
    may be ``"group sub"``; values: str/int/float/bool, ``Attachment`` (goes into
    ``resolved.attachments``, marked ephemeral), ``User``, ``Role``, ``Channel``. Missing
    required options, bad choices, unknown options, hidden commands (``contexts``,
    ``default_member_permissions``, ``nsfw``, an app installed neither in the server nor for
    the user) raise, as the Discord client would not send them. Responses carrying files or
    embeds that the interaction's ``app_permissions`` lack are refused with 403/50013.
    ``autocomplete(user, channel, name, options, focused) -> InteractionRecord``
    ``context_menu(user, target_message_or_user, name, *, channel=None) -> InteractionRecord``
    ``click(user, message, custom_id) -> InteractionRecord`` (refuses disabled/link buttons)
    ``select(user, message, custom_id, values) -> InteractionRecord``
    ``submit_modal(user, modal_interaction, {custom_id: value}) -> InteractionRecord`` —
    mirrors the modal's layout (ActionRow-wrapped or Label-wrapped inputs)
    ``send_message(user, channel, content="", *, reply_to=None, mentions_bot=False,
    mention_reply=True, attachments=(), mentions=()) -> Message``

Faults
    ``await drop_gateway(code=4000)`` (``None``: cut TCP with no close frame) -> count;
    ``await invalidate_session(resumable=False)``; ``await request_reconnect()``;
    ``inject_429(route, *, retry_after=0.5, times=1, is_global=False)`` with a route key
    like ``"POST /channels/{channel_id}/messages"`` (fnmatch patterns allowed);
    ``set_rate_limit(route, limit, window)``; ``inject_error(route, error=None, *, times=1)``
    answers matching calls with one of ``fakediscord.errors``' ApiErrors (default a 500); ``clock.advance(seconds)`` ages interactions;
    ``gateway.enforce_heartbeats`` / ``zombie_timeout`` (close 4009 when heartbeats stop);
    ``rest.require_signed_cdn_urls``; ``state.privileged_intents`` (4014 when not enabled).

Looking at the result
    :class:`InteractionRecord`: ``callbacks`` (:class:`Callback` ``type``/``data``/``at``/
    ``files``), ``response_type``, ``ack_delay``, ``deferred``, ``ephemeral``, ``thinking``,
    ``original`` (the ``@original`` :class:`Message` as last edited), ``followups``,
    ``messages``, ``modal``, ``failed`` ("This interaction failed"), ``rejected``
    (:class:`~fakediscord.models.Rejection` with Discord's status/code), ``payload`` (what the
    bot received). :class:`Message`: ``content``, ``embeds``, ``components``, ``custom_ids``,
    ``find_component(id)``, ``attachments`` (:class:`Attachment` with ``data`` bytes,
    ``filename``, ``size``, ``content_type``, ``width``/``height``, ``url``), ``flags``,
    ``ephemeral``, ``loading``, ``allowed_mentions``, ``mentions``, ``message_reference``,
    ``referenced``, ``reactions``, ``deleted``, ``history`` (earlier versions).
    :class:`Channel`: ``messages`` (everything), ``visible_messages``, ``last_message``.
    ``fake.command(name, *, guild=None, type=1) -> AppCommand`` (``.id``, ``.options``),
    ``fake.commands``, ``fake.interactions``, ``fake.requests`` / ``requests_to(route)``,
    ``fake.unknown_routes`` (assert it stays empty), ``fake.rate_limit_hits``, ``fake.typing``,
    ``fake.heartbeats``, ``fake.max_heartbeat_gap()``, ``fake.gateway`` (``connections``,
    ``sessions``, ``events``, ``identify_count``, ``resume_count``).

Waiting
    ``await fake.wait_for(predicate, timeout=10.0, *, what=None)`` returns the first truthy
    ``predicate()`` (re-checked on every state change and every 50 ms) or raises TimeoutError;
    ``wait_connected()``, ``wait_for_ack(inter)``, ``wait_for_original(inter, predicate=None)``.

Not modelled: threads, forums, voice, stickers, polls' results, webhooks other than
interaction tokens, audit logs, presences beyond empty lists, sharding across sessions, ETF
encoding, and Discord's HTTP/2 or Cloudflare behaviour. Everything runs on the test's event
loop, so a bot that blocks the loop also stalls the fake (heartbeat gaps still show it).
"""

from .clock import FakeClock
from .models import (
    AppCommand,
    Attachment,
    Callback,
    Channel,
    Guild,
    InteractionRecord,
    Member,
    Message,
    Role,
    User,
)
from .runner import running_bot
from .server import FakeDiscord

__all__ = [
    "AppCommand",
    "Attachment",
    "Callback",
    "Channel",
    "FakeClock",
    "FakeDiscord",
    "Guild",
    "InteractionRecord",
    "Member",
    "Message",
    "Role",
    "User",
    "running_bot",
]
