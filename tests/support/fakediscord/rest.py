"""The REST API under ``/api/v10`` and the attachment CDN.

A small router of ``"METHOD /template/{param}"`` routes (the same keys discord.py uses for
rate-limit buckets) so every request is logged with its route, unknown routes are recorded
for assertions, and rate-limit headers are computed per bucket and major parameter.
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from . import errors, intents
from . import permissions as perms
from .interactions import InteractionEngine, Uploads
from .models import DM, FLAG_EPHEMERAL, MSG_DEFAULT, MSG_REPLY, Channel, Guild, Message
from .ratelimit import RateLimiter
from .state import State

_CHANNEL_MESSAGE_FLAGS = (1 << 2) | (1 << 12) | (1 << 15)


@dataclass
class RequestRecord:
    """One REST call the bot made, for assertions (``fake.requests``)."""

    method: str
    path: str
    route: str | None
    status: int
    code: int | None
    at: float
    query: dict[str, str]
    body: Any = None
    files: list[str] = field(default_factory=list)


@dataclass
class Ctx:
    request: web.Request
    route: str
    params: dict[str, str]
    body: Any
    uploads: Uploads

    @property
    def query(self) -> Any:
        return self.request.query

    def int(self, name: str) -> int:
        try:
            return int(self.params[name])
        except ValueError:
            raise errors.not_found() from None


@dataclass
class Reply:
    status: int
    data: Any = None


@dataclass
class ErrorInjection:
    """Answer the next ``remaining`` calls whose route key matches ``route`` with ``error``."""

    route: str
    error: errors.ApiError
    remaining: int


Handler = Callable[[Ctx], Awaitable[Any]]


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """JSON with ``Content-Type: application/json`` exactly, as discord.py compares it literally."""
    resp = web.Response(body=json.dumps(data).encode(), status=status, headers=headers)
    resp.headers["Content-Type"] = "application/json"
    return resp


class Rest:
    """Routes REST calls to handlers that read and mutate :class:`State`."""

    def __init__(self, state: State, engine: InteractionEngine, limiter: RateLimiter) -> None:
        self.state = state
        self.engine = engine
        self.limiter = limiter
        self.requests: list[RequestRecord] = []
        self.unknown_routes: list[tuple[str, str]] = []
        self.typing: list[tuple[int, float]] = []
        self.cdn_requests: list[tuple[str, int]] = []
        self.require_signed_cdn_urls = True
        self.gateway_url = ""
        self.error_injections: list[ErrorInjection] = []
        self._routes: list[tuple[str, list[str], str, Handler, bool]] = []
        self._register()

    # -- routing ---------------------------------------------------------------------------

    def add(self, method: str, template: str, handler: Handler, *, auth: bool = True) -> None:
        self._routes.append((method, template.strip("/").split("/"), template, handler, auth))

    def _match(self, method: str, path: str) -> tuple[tuple[str, str, Handler, bool, dict[str, str]] | None, bool]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        best = None
        best_literals = -1
        path_known = False
        for m, segs, template, handler, auth in self._routes:
            if len(segs) != len(parts):
                continue
            params: dict[str, str] = {}
            literals = 0
            for seg, part in zip(segs, parts, strict=True):
                if seg.startswith("{"):
                    params[seg[1:-1]] = part
                elif seg == part:
                    literals += 1
                else:
                    break
            else:
                path_known = True
                if m == method and literals > best_literals:
                    best, best_literals = (template, m, handler, auth, params), literals
        if best is None:
            return None, path_known
        template, m, handler, auth, params = best
        return (f"{m} {template}", template, handler, auth, params), path_known

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # Use the raw path: discord.py percent-encodes tokens and emoji, and decoding before
        # splitting would let an encoded "/" break the segments apart.
        raw = request.raw_path.split("?", 1)[0]
        path = "/" + raw.split("/", 3)[3] if raw.count("/") >= 3 else "/"
        method = request.method
        matched, path_known = self._match(method, path)
        record = RequestRecord(method=method, path=path, route=None, status=0, code=None,
                               at=self.state.clock.now(), query=dict(request.query))
        self.requests.append(record)
        headers = {"Via": "1.1 google"}
        try:
            if matched is None:
                self.unknown_routes.append((method, path))
                raise errors.method_not_allowed() if path_known else errors.not_found()
            route, _template, handler, auth, params = matched
            record.route = route
            if auth:
                self._check_auth(request)
            self._injected_error(route)
            major = "+".join(params[k] for k in ("channel_id", "guild_id", "webhook_id", "webhook_token") if k in params)
            decision = self.limiter.check(route, major)
            headers.update(decision.headers)
            if decision.body is not None:
                record.status = 429
                return json_response(decision.body, 429, headers)
            body, uploads = await self._read_body(request)
            record.body = body
            record.files = [name for name, _, _ in uploads.values()]
            ctx = Ctx(request=request, route=route, params=params, body=body, uploads=uploads)
            try:
                result = await handler(ctx)
            except errors.ApiError as err:
                if "webhook_token" in params:
                    rec = self.engine.find(token=params["webhook_token"])
                    self.engine.reject(rec, method, path, err)
                raise
        except errors.ApiError as err:
            record.status, record.code = err.status, err.code
            self.state.changed()
            return json_response(err.body(), err.status, headers)
        if isinstance(result, Reply):
            status, data = result.status, result.data
        elif result is None:
            status, data = 204, None
        else:
            status, data = 200, result
        record.status = status
        self.state.changed()
        if status == 204:
            return web.Response(status=204, headers=headers)
        return json_response(data, status, headers)

    def inject_error(self, route: str, error: errors.ApiError, times: int = 1) -> None:
        """Fail the next ``times`` calls matching ``route`` (fnmatch on the route key) with ``error``."""
        self.error_injections.append(ErrorInjection(route, error, times))

    def _injected_error(self, route: str) -> None:
        for injection in self.error_injections:
            if injection.remaining > 0 and fnmatch.fnmatchcase(route, injection.route):
                injection.remaining -= 1
                raise injection.error

    def _check_auth(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bot {self.state.token}":
            raise errors.unauthorized()

    async def _read_body(self, request: web.Request) -> tuple[Any, Uploads]:
        uploads: Uploads = {}
        if not request.can_read_body:
            return None, uploads
        ctype = request.content_type
        if ctype == "multipart/form-data":
            payload: Any = {}
            reader = await request.multipart()
            order = 0
            async for part in reader:
                name = getattr(part, "name", None) or ""
                if name == "payload_json":
                    try:
                        payload = json.loads(await part.text())  # type: ignore[union-attr]
                    except ValueError:
                        raise errors.invalid_json() from None
                    continue
                data = await part.read()  # type: ignore[union-attr]
                filename = getattr(part, "filename", None) or name
                if name.startswith("files[") and name.endswith("]"):
                    index = int(name[6:-1])
                else:
                    index = order
                order += 1
                part_type = part.headers.get("Content-Type")
                # discord.py labels every file application/octet-stream; Discord sniffs instead.
                if part_type == "application/octet-stream":
                    part_type = None
                uploads[index] = (filename, bytes(data), part_type)
            return payload, uploads
        raw = await request.read()
        if not raw:
            return None, uploads
        try:
            return json.loads(raw), uploads
        except ValueError:
            raise errors.invalid_json() from None

    # -- lookups -------------------------------------------------------------------------------

    def _channel(self, ctx: Ctx) -> Channel:
        channel = self.state.channels.get(ctx.int("channel_id"))
        if channel is None:
            raise errors.unknown_channel()
        if channel.type != DM and not self.state.bot_permissions(channel) & perms.VIEW_CHANNEL:
            raise errors.missing_access()
        return channel

    def _message(self, ctx: Ctx, channel: Channel) -> Message:
        msg = self.state.messages.get(ctx.int("message_id"))
        if msg is None or msg.deleted or msg.ephemeral or msg.channel is not channel:
            raise errors.unknown_message()
        return msg

    def _guild(self, ctx: Ctx) -> Guild:
        guild = self.state.guilds.get(ctx.int("guild_id"))
        if guild is None or self.state.bot_user.id not in guild.members:
            raise errors.unknown_guild()
        return guild

    def _app(self, ctx: Ctx) -> None:
        if ctx.params["application_id"] != str(self.state.application_id):
            raise errors.missing_access()

    def _dict_body(self, ctx: Ctx) -> dict[str, Any]:
        if ctx.body is None:
            return {}
        if not isinstance(ctx.body, dict):
            raise errors.invalid_form({"_": ("DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType")})
        return ctx.body

    # -- route table ------------------------------------------------------------------------------

    def _register(self) -> None:
        a = self.add
        a("GET", "/users/@me", self.get_me)
        a("GET", "/users/{user_id}", self.get_user)
        a("POST", "/users/@me/channels", self.create_dm)
        a("GET", "/gateway", self.get_gateway, auth=False)
        a("GET", "/gateway/bot", self.get_gateway_bot)
        a("GET", "/oauth2/applications/@me", self.get_application)
        a("GET", "/applications/@me", self.get_application)
        a("GET", "/applications/{application_id}/emojis", self.list_app_emojis)
        for prefix in ("/applications/{application_id}", "/applications/{application_id}/guilds/{guild_id}"):
            a("GET", prefix + "/commands", self.list_commands)
            a("PUT", prefix + "/commands", self.put_commands)
            a("POST", prefix + "/commands", self.post_command)
            a("GET", prefix + "/commands/{command_id}", self.get_command)
            a("PATCH", prefix + "/commands/{command_id}", self.patch_command)
            a("DELETE", prefix + "/commands/{command_id}", self.delete_command)
        a("GET", "/guilds/{guild_id}", self.get_guild)
        a("GET", "/guilds/{guild_id}/channels", self.get_guild_channels)
        a("GET", "/guilds/{guild_id}/roles", self.get_guild_roles)
        a("GET", "/guilds/{guild_id}/members/{user_id}", self.get_member)
        a("GET", "/channels/{channel_id}", self.get_channel)
        a("GET", "/channels/{channel_id}/messages", self.list_messages)
        a("POST", "/channels/{channel_id}/messages", self.create_message)
        a("GET", "/channels/{channel_id}/messages/{message_id}", self.get_message)
        a("PATCH", "/channels/{channel_id}/messages/{message_id}", self.edit_message)
        a("DELETE", "/channels/{channel_id}/messages/{message_id}", self.delete_message)
        a("POST", "/channels/{channel_id}/typing", self.typing_indicator)
        a("PUT", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self.add_reaction)
        a("DELETE", "/channels/{channel_id}/messages/{message_id}/reactions/{emoji}/@me", self.remove_reaction)
        a("POST", "/interactions/{webhook_id}/{webhook_token}/callback", self.interaction_callback, auth=False)
        a("POST", "/webhooks/{webhook_id}/{webhook_token}", self.webhook_execute, auth=False)
        for verb, fn in (("GET", self.webhook_get), ("PATCH", self.webhook_edit), ("DELETE", self.webhook_delete)):
            a(verb, "/webhooks/{webhook_id}/{webhook_token}/messages/{message_id}", fn, auth=False)

    # -- users, app, gateway --------------------------------------------------------------------

    async def get_me(self, ctx: Ctx) -> Any:
        data = self.state.bot_user.payload()
        data.update({"verified": True, "mfa_enabled": False, "email": None, "flags": 0, "locale": "en-US",
                     "premium_type": 0, "bot": True})
        return data

    async def get_user(self, ctx: Ctx) -> Any:
        user = self.state.users.get(ctx.int("user_id"))
        if user is None:
            raise errors.unknown_user()
        return user.payload()

    async def create_dm(self, ctx: Ctx) -> Any:
        body = self._dict_body(ctx)
        try:
            user = self.state.users[int(body.get("recipient_id", 0))]
        except (KeyError, ValueError, TypeError):
            raise errors.invalid_form({"recipient_id": ("BASE_TYPE_REQUIRED", "This field is required")}) from None
        if user.bot:
            raise errors.ApiError(400, 50007, "Cannot send messages to this user")
        return self.state.dm_channel(user).payload()

    async def get_gateway(self, ctx: Ctx) -> Any:
        return {"url": self.gateway_url}

    async def get_gateway_bot(self, ctx: Ctx) -> Any:
        return {"url": self.gateway_url, "shards": 1,
                "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 86_400_000,
                                        "max_concurrency": 1}}

    async def get_application(self, ctx: Ctx) -> Any:
        st = self.state
        bot = st.bot_user.payload()
        bot["bot"] = True
        return {
            "id": str(st.application_id),
            "name": st.app_name,
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "hook": True,
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": st.verify_key,
            "owner": st.owner.payload(),
            "team": None,
            "flags": intents.application_flags(st.privileged_intents),
            "bot": bot,
            "redirect_uris": [],
            "interactions_endpoint_url": None,
            "role_connections_verification_url": None,
            "tags": [],
            "install_params": {"scopes": ["bot", "applications.commands"], "permissions": str(perms.DEFAULT_BOT)},
            "integration_types_config": {str(t): {} for t in sorted(st.app_integration_types)},
            "approximate_guild_count": sum(st.bot_in(g) for g in st.guilds.values()),
            "approximate_user_install_count": len(st.user_installs),
        }

    async def list_app_emojis(self, ctx: Ctx) -> Any:
        self._app(ctx)
        return {"items": []}

    # -- application commands -------------------------------------------------------------------

    def _cmd_scope(self, ctx: Ctx) -> int | None:
        self._app(ctx)
        return self._guild(ctx).id if "guild_id" in ctx.params else None

    def _cmd(self, ctx: Ctx, scope: int | None) -> Any:
        cmd = self.state.commands.get(ctx.int("command_id"))
        if cmd is None or cmd.guild_id != scope:
            raise errors.unknown_command()
        return cmd

    async def list_commands(self, ctx: Ctx) -> Any:
        scope = self._cmd_scope(ctx)
        return [c.payload() for c in self.state.commands.values() if c.guild_id == scope]

    async def put_commands(self, ctx: Ctx) -> Any:
        scope = self._cmd_scope(ctx)
        return [c.payload() for c in self.state.overwrite_commands(scope, ctx.body if ctx.body is not None else [])]

    async def post_command(self, ctx: Ctx) -> Any:
        scope = self._cmd_scope(ctx)
        cmd, created = self.state.upsert_command(scope, self._dict_body(ctx))
        return Reply(201 if created else 200, cmd.payload())

    async def get_command(self, ctx: Ctx) -> Any:
        return self._cmd(ctx, self._cmd_scope(ctx)).payload()

    async def patch_command(self, ctx: Ctx) -> Any:
        scope = self._cmd_scope(ctx)
        cmd = self._cmd(ctx, scope)
        merged = dict(cmd.raw, **self._dict_body(ctx))
        merged.setdefault("name", cmd.name)
        merged.setdefault("type", cmd.type)
        updated, _ = self.state.upsert_command(scope, merged)
        return updated.payload()

    async def delete_command(self, ctx: Ctx) -> Any:
        cmd = self._cmd(ctx, self._cmd_scope(ctx))
        del self.state.commands[cmd.id]
        return None

    # -- guilds and channels ----------------------------------------------------------------------

    async def get_guild(self, ctx: Ctx) -> Any:
        guild = self._guild(ctx)
        data = guild.payload()
        for key in ("joined_at", "large", "unavailable", "member_count", "voice_states", "members", "channels",
                    "threads", "presences", "stage_instances", "guild_scheduled_events", "soundboard_sounds"):
            data.pop(key, None)
        if ctx.query.get("with_counts") in ("true", "1", "True"):
            data["approximate_member_count"] = len(guild.members)
            data["approximate_presence_count"] = 0
        return data

    async def get_guild_channels(self, ctx: Ctx) -> Any:
        guild = self._guild(ctx)
        return [c.payload() for c in guild.channels.values()]

    async def get_guild_roles(self, ctx: Ctx) -> Any:
        return [r.payload() for r in self._guild(ctx).roles.values()]

    async def get_member(self, ctx: Ctx) -> Any:
        guild = self._guild(ctx)
        member = guild.members.get(ctx.int("user_id"))
        if member is None:
            raise errors.unknown_member()
        return member.payload()

    async def get_channel(self, ctx: Ctx) -> Any:
        return self._channel(ctx).payload()

    # -- channel messages ----------------------------------------------------------------------------

    async def list_messages(self, ctx: Ctx) -> Any:
        channel = self._channel(ctx)
        if channel.type != DM:
            self.state.require(channel, perms.READ_MESSAGE_HISTORY)
        try:
            limit = int(ctx.query.get("limit", 50))
        except ValueError:
            limit = 50
        if not 1 <= limit <= 100:
            raise errors.invalid_form({"limit": ("NUMBER_TYPE_MAX", "int value should be less than or equal to 100.")})
        msgs = [m for m in channel.messages if not m.deleted and not m.ephemeral]
        if "before" in ctx.query:
            msgs = [m for m in msgs if m.id < int(ctx.query["before"])]
        if "after" in ctx.query:
            msgs = [m for m in msgs if m.id > int(ctx.query["after"])]
            return [m.payload() for m in reversed(msgs[:limit])]
        if "around" in ctx.query:
            around = int(ctx.query["around"])
            older = [m for m in msgs if m.id <= around][-(limit // 2 + limit % 2):]
            newer = [m for m in msgs if m.id > around][:limit // 2]
            msgs = older + newer
        return [m.payload() for m in reversed(msgs[-limit:])]

    async def create_message(self, ctx: Ctx) -> Any:
        st = self.state
        channel = self._channel(ctx)
        body = self._dict_body(ctx)
        needed = perms.SEND_MESSAGES
        if ctx.uploads:
            needed |= perms.ATTACH_FILES
        if body.get("message_reference"):
            needed |= perms.READ_MESSAGE_HISTORY
        if channel.type != DM:
            st.require(channel, needed)
        flags = int(body.get("flags") or 0)
        if flags & ~_CHANNEL_MESSAGE_FLAGS:
            raise errors.invalid_form({"flags": ("MESSAGE_FLAGS_INVALID", "Invalid message flags")
                                       if not flags & FLAG_EPHEMERAL else
                                       ("MESSAGE_FLAGS_INVALID", "Ephemeral messages can only be sent by interactions")})
        target = st.bot_reference(channel, body.get("message_reference"))
        reference = None
        if target is not None:
            reference = {"type": 0, "channel_id": str(target.channel.id), "message_id": str(target.id)}
            if target.channel.guild is not None:
                reference["guild_id"] = str(target.channel.guild.id)
        msg = st.make_message(channel, st.bot_user, type=MSG_REPLY if target else MSG_DEFAULT,
                              message_reference=reference, referenced=target)
        st.apply_body(msg, body, ctx.uploads, creating=True)
        st.post_message(msg)
        st.emit_message("MESSAGE_CREATE", msg)
        return msg.payload()

    async def get_message(self, ctx: Ctx) -> Any:
        channel = self._channel(ctx)
        if channel.type != DM:
            self.state.require(channel, perms.READ_MESSAGE_HISTORY)
        return self._message(ctx, channel).payload()

    async def edit_message(self, ctx: Ctx) -> Any:
        st = self.state
        channel = self._channel(ctx)
        msg = self._message(ctx, channel)
        if msg.author is not st.bot_user:
            raise errors.edit_other_author()
        if ctx.uploads and channel.type != DM:
            st.require(channel, perms.ATTACH_FILES)
        st.apply_body(msg, self._dict_body(ctx), ctx.uploads, creating=False)
        st.emit_message("MESSAGE_UPDATE", msg)
        return msg.payload()

    async def delete_message(self, ctx: Ctx) -> Any:
        st = self.state
        channel = self._channel(ctx)
        msg = self._message(ctx, channel)
        if msg.author is not st.bot_user:
            if channel.type == DM:
                raise errors.dm_action()
            st.require(channel, perms.MANAGE_MESSAGES)
        st.delete_message(msg)
        return None

    async def typing_indicator(self, ctx: Ctx) -> Any:
        channel = self._channel(ctx)
        if channel.type != DM:
            self.state.require(channel, perms.SEND_MESSAGES)
        self.typing.append((channel.id, time.monotonic()))
        return None

    def _emoji(self, ctx: Ctx) -> str:
        emoji = unquote(ctx.params["emoji"])
        if not emoji or (":" in emoji and not emoji.rsplit(":", 1)[-1].isdigit()):
            raise errors.unknown_emoji()
        return emoji

    async def add_reaction(self, ctx: Ctx) -> Any:
        st = self.state
        channel = self._channel(ctx)
        msg = self._message(ctx, channel)
        if channel.type != DM:
            st.require(channel, perms.ADD_REACTIONS | perms.READ_MESSAGE_HISTORY)
        emoji = self._emoji(ctx)
        users = msg.reactions.setdefault(emoji, [])
        if st.bot_user.id not in users:
            users.append(st.bot_user.id)
            self._reaction_event("MESSAGE_REACTION_ADD", msg, emoji)
        return None

    async def remove_reaction(self, ctx: Ctx) -> Any:
        channel = self._channel(ctx)
        msg = self._message(ctx, channel)
        emoji = self._emoji(ctx)
        users = msg.reactions.get(emoji, [])
        if self.state.bot_user.id in users:
            users.remove(self.state.bot_user.id)
            self._reaction_event("MESSAGE_REACTION_REMOVE", msg, emoji)
        return None

    def _reaction_event(self, event: str, msg: Message, emoji: str) -> None:
        name, _, eid = emoji.partition(":")
        data: dict[str, Any] = {"user_id": str(self.state.bot_user.id), "channel_id": str(msg.channel.id),
                                "message_id": str(msg.id), "emoji": {"id": eid or None, "name": name},
                                "burst": False, "type": 0}
        if msg.channel.guild is not None:
            data["guild_id"] = str(msg.channel.guild.id)
            data["message_author_id"] = str(msg.author.id)
        intent = intents.DIRECT_MESSAGE_REACTIONS if msg.channel.type == DM else intents.GUILD_MESSAGE_REACTIONS
        self.state.emit(event, data, intent=intent)

    # -- interactions ------------------------------------------------------------------------------

    async def interaction_callback(self, ctx: Ctx) -> Any:
        body = self._dict_body(ctx)
        result = self.engine.callback(ctx.int("webhook_id"), ctx.params["webhook_token"], body, ctx.uploads)
        if ctx.query.get("with_response") in ("1", "true", "True"):
            return result
        return None

    async def webhook_execute(self, ctx: Ctx) -> Any:
        msg = self.engine.followup(ctx.int("webhook_id"), ctx.params["webhook_token"], self._dict_body(ctx),
                                   ctx.uploads)
        return msg.payload()

    async def webhook_get(self, ctx: Ctx) -> Any:
        return self.engine.get_message(ctx.int("webhook_id"), ctx.params["webhook_token"],
                                       ctx.params["message_id"]).payload()

    async def webhook_edit(self, ctx: Ctx) -> Any:
        msg = self.engine.edit_message(ctx.int("webhook_id"), ctx.params["webhook_token"], ctx.params["message_id"],
                                       self._dict_body(ctx), ctx.uploads)
        return msg.payload()

    async def webhook_delete(self, ctx: Ctx) -> Any:
        self.engine.delete_message(ctx.int("webhook_id"), ctx.params["webhook_token"], ctx.params["message_id"])
        return None

    # -- CDN -----------------------------------------------------------------------------------------

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        """Serve stored attachment bytes; unsigned or expired links 404 like Discord's CDN."""
        path = request.path
        self.cdn_requests.append((path, 0))
        gone = web.Response(status=404, text="This content is no longer available.")
        try:
            channel_id = int(request.match_info["channel_id"])
            att_id = int(request.match_info["attachment_id"])
        except ValueError:
            return gone
        att = self.state.attachments.get(att_id)
        if att is None or att.channel_id != channel_id or request.match_info["filename"] != att.filename:
            return gone
        if self.require_signed_cdn_urls and not self.state.cdn_signature_ok(
                path.removeprefix("/media"), dict(request.query)):
            return gone
        self.cdn_requests[-1] = (path, 200)
        return web.Response(body=att.data, headers={"Content-Type": att.content_type or "application/octet-stream"})
