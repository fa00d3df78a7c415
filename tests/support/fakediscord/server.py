"""``FakeDiscord``: the loopback server plus the high-level helpers tests drive it with."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from aiohttp import web

from . import intents
from . import permissions as perms
from .clock import FakeClock
from .errors import ApiError
from .gateway import Gateway, GatewayConnection
from .interactions import InteractionEngine
from .models import AppCommand, Attachment, Channel, Guild, InteractionRecord, Member, Message, Role, User
from .ratelimit import RateLimiter, RateLimitHit
from .rest import RequestRecord, Rest
from .state import State

T = TypeVar("T")


class FakeDiscord:
    """A Discord API + gateway + CDN on 127.0.0.1 that an unmodified discord.py bot can use.

    Start it with ``async with FakeDiscord() as fake`` (or ``await fake.start()``), point the
    bot at ``fake.api_base`` / ``fake.gateway_url`` and log in with ``fake.token``.
    """

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        bot_name: str = "FakeBot",
        heartbeat_interval: float = 41.25,
        zombie_timeout: float | None = None,
        ack_deadline: float = 3.0,
        token_lifetime: float = 15 * 60.0,
        privileged_intents: int = intents.PRIVILEGED,
        host: str = "127.0.0.1",
        clock: FakeClock | None = None,
    ) -> None:
        self.host = host
        self.port = 0
        self.clock = clock or FakeClock()
        self.state = State(self.clock, token=token, bot_name=bot_name, privileged_intents=privileged_intents)
        self.engine = InteractionEngine(self.state, ack_deadline=ack_deadline, token_lifetime=token_lifetime)
        self.limiter = RateLimiter()
        self.rest = Rest(self.state, self.engine, self.limiter)
        self.gateway = Gateway(self.state, heartbeat_interval=heartbeat_interval, zombie_timeout=zombie_timeout,
                               on_change=self._notify)
        self.state.sink = self.gateway
        self.state.on_change(self._notify)
        self.clock.on_advance(self._sweep)
        self._changed: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=512 * 1024 * 1024)
        app.router.add_route("*", r"/api/v{version:\d+}/{tail:.*}", self.rest.handle)
        app.router.add_get("/gateway", self.gateway.handle)
        app.router.add_get("/gateway/resume", self.gateway.handle)
        app.router.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self.rest.cdn)
        return app

    async def start(self, port: int = 0) -> FakeDiscord:
        """Listen on ``host:port`` (0 picks a free port) and return self."""
        self._changed = asyncio.Event()
        self._runner = web.AppRunner(self._app(), handle_signals=False, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.state.base_url = f"http://{self.host}:{self.port}"
        self.rest.gateway_url = self.gateway_url
        self.gateway.gateway_url = self.gateway_url
        self.gateway.resume_url = f"ws://{self.host}:{self.port}/gateway/resume"
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="fakediscord-deadlines")
        return self

    async def stop(self) -> None:
        """Close every websocket and stop serving."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.gateway.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        """What to give ``apply_endpoints`` / ``DISCORD_API_BASE``."""
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        """What to give ``apply_endpoints`` / ``DISCORD_GATEWAY_URL`` (also GET /gateway/bot's url)."""
        return f"ws://{self.host}:{self.port}/gateway"

    @property
    def cdn_base(self) -> str:
        return self.base_url

    @property
    def token(self) -> str:
        return self.state.token

    @property
    def bot_user(self) -> User:
        return self.state.bot_user

    @property
    def application_id(self) -> int:
        return self.state.application_id

    # -- change notification and waiting -----------------------------------------------------------

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _sweep(self) -> None:
        if self.engine.sweep():
            self._notify()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            self._sweep()

    async def wait_for(self, predicate: Callable[[], T], timeout: float = 10.0, *, what: str | None = None) -> T:
        """Wait until ``predicate()`` is truthy and return its value; TimeoutError after ``timeout``.

        Re-checked on every state change (REST call, gateway frame, clock advance) and at
        least every 50 ms, so predicates may look at anything.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what or getattr(predicate, '__name__', 'condition')}")
            event = self._changed
            if event is None:
                await asyncio.sleep(min(remaining, 0.05))
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), min(remaining, 0.05))

    async def wait_connected(self, timeout: float = 10.0) -> GatewayConnection:
        """Wait for an identified (or resumed) live gateway connection."""
        return await self.wait_for(lambda: next(iter(self.gateway.live_connections), None), timeout,
                                   what="a live gateway session")

    async def wait_for_ack(self, interaction: InteractionRecord, timeout: float = 10.0) -> InteractionRecord:
        """Wait until the bot sent the initial callback (or the interaction failed)."""
        await self.wait_for(lambda: interaction.callbacks or interaction.failed, timeout,
                            what=f"a callback to {interaction!r}")
        return interaction

    async def wait_for_original(self, interaction: InteractionRecord,
                                predicate: Callable[[Message], Any] | None = None,
                                timeout: float = 10.0) -> Message:
        """Wait for a non-placeholder ``@original`` response (optionally matching ``predicate``)."""
        def ready() -> Message | None:
            msg = interaction.original
            if msg is None or msg.loading or (predicate is not None and not predicate(msg)):
                return None
            return msg

        return await self.wait_for(ready, timeout, what=f"the original response of {interaction!r}")

    # -- building the world --------------------------------------------------------------------------

    def add_user(self, username: str, *, global_name: str | None = None, locale: str = "en-US",
                 bot: bool = False) -> User:
        return self.state.add_user(username, global_name=global_name, locale=locale, bot=bot)

    def add_guild(self, name: str = "Test Guild", *, owner: User | None = None,
                  bot_permissions: int = perms.DEFAULT_BOT, everyone_permissions: int = perms.DEFAULT_EVERYONE,
                  locale: str = "en-US", upload_limit: int = 10 * 1024 * 1024, with_bot: bool = True) -> Guild:
        """A guild the bot is in (with its managed role); dispatches GUILD_CREATE if connected.

        ``with_bot=False``: a server the app is not installed in. The bot sees nothing of it; members who
        installed the app to their account (``install_for_user``) can still use its user-installable
        commands there, and those interactions carry only the ``"1"`` (USER_INSTALL) integration owner.
        """
        return self.state.add_guild(name, owner=owner, bot_permissions=bot_permissions,
                                    everyone_permissions=everyone_permissions, locale=locale,
                                    upload_limit=upload_limit, with_bot=with_bot)

    def install_for_user(self, user: User) -> None:
        """``user`` adds the app to their account (a user install), so its user-installable commands
        follow them into servers the bot is not in, and into DMs."""
        self.state.install_for_user(user)

    def add_channel(self, guild: Guild, name: str, *, nsfw: bool = False, topic: str | None = None) -> Channel:
        return self.state.add_channel(guild, name, nsfw=nsfw, topic=topic)

    def add_role(self, guild: Guild, name: str, permissions: int = 0) -> Role:
        return self.state.add_role(guild, name, permissions)

    def add_member(self, guild: Guild, user: User, *, roles: Iterable[Role] = (), permissions: int | None = None,
                   nick: str | None = None) -> Member:
        """Join ``user``; ``permissions`` (e.g. ``perms.MANAGE_MESSAGES``) adds a role granting them."""
        return self.state.add_member(guild, user, roles=roles, permissions=permissions, nick=nick)

    def set_overwrite(self, channel: Channel, target: User | Role | Member, *, allow: int = 0, deny: int = 0) -> None:
        self.state.set_overwrite(channel, target, allow=allow, deny=deny)

    def set_bot_permissions(self, guild: Guild, permissions: int) -> None:
        """Change what the bot's managed role grants (e.g. drop ATTACH_FILES)."""
        role = next(r for r in guild.roles.values() if r.bot_id == self.bot_user.id)
        self.state.set_role_permissions(role, permissions)

    def dm_channel(self, user: User) -> Channel:
        return self.state.dm_channel(user)

    # -- user actions --------------------------------------------------------------------------------

    def _require_bot(self) -> None:
        if not self.gateway.has_session():
            raise RuntimeError("no bot session on the fake gateway: start the bot and wait for it first")

    def upload_user_attachment(self, channel: Channel, filename: str, data: bytes,
                               content_type: str | None = None) -> Attachment:
        """Put a user's file on the CDN, ready to pass as a slash option or message attachment."""
        return self.state.store_attachment(channel.id, filename, data, content_type)

    async def slash(self, user: User, channel: Channel, name: str, options: Mapping[str, Any] | None = None, *,
                    locale: str | None = None) -> InteractionRecord:
        """Run ``/name`` as ``user``; option values are str/int/float/bool/Attachment/User/Role/Channel."""
        self._require_bot()
        rec = self.engine.slash(user, channel, name, options, locale=locale)
        await asyncio.sleep(0)
        return rec

    async def autocomplete(self, user: User, channel: Channel, name: str, options: Mapping[str, Any],
                           focused: str) -> InteractionRecord:
        """Type into option ``focused``; the bot's choices arrive as callback type 8."""
        self._require_bot()
        rec = self.engine.slash(user, channel, name, options, focused=focused)
        await asyncio.sleep(0)
        return rec

    async def context_menu(self, user: User, target: Message | User, name: str, *,
                           channel: Channel | None = None) -> InteractionRecord:
        """Use a message (``target`` is a Message) or user context-menu command."""
        self._require_bot()
        rec = self.engine.context_menu(user, target, name, channel=channel)
        await asyncio.sleep(0)
        return rec

    async def click(self, user: User, message: Message, custom_id: str) -> InteractionRecord:
        """Press the button ``custom_id`` on ``message`` (the interaction carries the message)."""
        self._require_bot()
        rec = self.engine.component(user, message, custom_id)
        await asyncio.sleep(0)
        return rec

    async def select(self, user: User, message: Message, custom_id: str, values: Sequence[Any]) -> InteractionRecord:
        """Choose ``values`` in the select menu ``custom_id`` on ``message``."""
        self._require_bot()
        rec = self.engine.component(user, message, custom_id, values)
        await asyncio.sleep(0)
        return rec

    async def submit_modal(self, user: User, modal_interaction: InteractionRecord,
                           values: Mapping[str, Any]) -> InteractionRecord:
        """Fill and submit the modal the bot opened in answer to ``modal_interaction``."""
        self._require_bot()
        rec = self.engine.submit_modal(user, modal_interaction, values)
        await asyncio.sleep(0)
        return rec

    async def send_message(self, user: User, channel: Channel, content: str = "", *,
                           reply_to: Message | None = None, mentions_bot: bool = False, mention_reply: bool = True,
                           attachments: Sequence[Attachment] = (), mentions: Sequence[User] = ()) -> Message:
        """Post a user's message (MESSAGE_CREATE); ``mentions_bot`` prefixes ``<@bot>`` to the text."""
        self._require_bot()
        if mentions_bot and self.bot_user.mention not in content:
            content = f"{self.bot_user.mention} {content}".rstrip()
        msg = self.state.user_message(user, channel, content, reply_to=reply_to, mention_reply=mention_reply,
                                      mentions=mentions, attachments=attachments)
        await asyncio.sleep(0)
        return msg

    # -- faults --------------------------------------------------------------------------------------

    async def drop_gateway(self, code: int | None = 4000) -> int:
        """Close the bot's websocket(s) with ``code`` (None: cut TCP abruptly); returns how many."""
        return await self.gateway.drop(code)

    async def invalidate_session(self, *, resumable: bool = False) -> None:
        await self.gateway.invalidate(resumable=resumable)

    async def request_reconnect(self) -> None:
        await self.gateway.request_reconnect()

    def inject_429(self, route: str, *, retry_after: float = 0.5, times: int = 1, is_global: bool = False) -> None:
        """Answer the next ``times`` calls to ``route`` (e.g. ``"PATCH /webhooks/*"``) with 429."""
        self.limiter.inject_429(route, retry_after=retry_after, times=times, is_global=is_global)

    def inject_error(self, route: str, error: ApiError | None = None, *, times: int = 1) -> None:
        """Answer the next ``times`` calls to ``route`` (e.g. ``"GET /webhooks/*"``) with ``error``.

        ``error`` is one of :mod:`fakediscord.errors`' ApiErrors (default: 500 Internal Server Error,
        which discord.py retries); the call is logged in ``requests`` with that status and code.
        """
        self.rest.inject_error(route, error or ApiError(500, 0, "500: Internal Server Error"), times)

    def set_rate_limit(self, route: str, limit: int, window: float) -> None:
        self.limiter.set_limit(route, limit, window)

    # -- views ---------------------------------------------------------------------------------------

    def command(self, name: str, *, guild: Guild | None = None, type: int = 1) -> AppCommand:
        return self.state.find_command(name, guild=guild, type=type)

    @property
    def commands(self) -> list[AppCommand]:
        return list(self.state.commands.values())

    @property
    def interactions(self) -> list[InteractionRecord]:
        return list(self.state.interactions.values())

    @property
    def requests(self) -> list[RequestRecord]:
        return self.rest.requests

    @property
    def unknown_routes(self) -> list[tuple[str, str]]:
        return self.rest.unknown_routes

    @property
    def rate_limit_hits(self) -> list[RateLimitHit]:
        return self.limiter.hits

    @property
    def heartbeats(self) -> list[float]:
        """Monotonic arrival times of every heartbeat, all connections."""
        return self.gateway.heartbeat_times()

    def max_heartbeat_gap(self) -> float:
        return self.gateway.max_heartbeat_gap()

    @property
    def typing(self) -> list[tuple[int, float]]:
        return self.rest.typing

    def requests_to(self, route: str) -> list[RequestRecord]:
        """Logged calls whose route key equals ``route`` (e.g. ``"POST /channels/{channel_id}/messages"``)."""
        return [r for r in self.rest.requests if r.route == route]
