"""The fake's single source of truth, and every mutation that should produce a gateway event.

REST handlers, the interaction engine and test helpers all change the world through
:class:`State`, so the bot sees the same MESSAGE_CREATE / GUILD_CREATE / ... events it would
get from Discord, filtered by its intents and channel visibility.
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol
from urllib.parse import quote

from . import errors, intents
from . import permissions as perms
from .clock import FakeClock
from .models import (
    DM,
    FLAG_EPHEMERAL,
    GUILD_TEXT,
    MSG_DEFAULT,
    MSG_REPLY,
    AppCommand,
    Attachment,
    Channel,
    Guild,
    InteractionRecord,
    Member,
    Message,
    Role,
    User,
)
from .snowflake import SnowflakeGenerator
from .validation import check_command, check_message

#: Attachment URLs stay valid this long (Discord signs CDN links for ~24 h).
CDN_LINK_LIFETIME = 24 * 3600

EventData = dict[str, Any] | Callable[[int], "dict[str, Any] | None"]


class EventSink(Protocol):
    """Where state changes go: the gateway, which fans them out to connected sessions."""

    def dispatch(self, event: str, data: EventData, *, intent: int | None = None) -> None: ...


class _NoSink:
    def dispatch(self, event: str, data: EventData, *, intent: int | None = None) -> None:
        return None


_MENTION_USER = re.compile(r"<@!?(\d+)>")
_MENTION_ROLE = re.compile(r"<@&(\d+)>")


def sanitize_filename(name: str) -> str:
    """Discord rewrites upload names: whitespace becomes ``_`` and odd characters are dropped."""
    name = re.sub(r"\s+", "_", name.strip())
    name = re.sub(r"[^A-Za-z0-9._-]", "", name)
    return name or "unknown"


def sniff(data: bytes, filename: str) -> tuple[str | None, int | None, int | None]:
    """Content type and image size the way Discord's media pipeline reports them."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            mime = Image.MIME.get(img.format or "")
            if mime:
                return mime, img.width, img.height
    except Exception:  # not an image (or Pillow missing): fall back to the name
        pass
    guessed = mimetypes.guess_type(filename)[0]
    if guessed and guessed.startswith("text/"):
        guessed += "; charset=utf-8"
    return guessed, None, None


class State:
    """Registries of everything in the fake Discord plus the mutations tests and REST use."""

    def __init__(
        self,
        clock: FakeClock,
        *,
        token: str,
        bot_name: str = "FakeBot",
        application_id: int | None = None,
        privileged_intents: int = intents.PRIVILEGED,
    ) -> None:
        self.clock = clock
        self.ids = SnowflakeGenerator(clock.now)
        self.token = token
        self.privileged_intents = privileged_intents
        self.base_url = "http://127.0.0.1:0"
        self.sink: EventSink = _NoSink()
        self._listeners: list[Callable[[], None]] = []
        self._cdn_secret = secrets.token_bytes(16)

        self.users: dict[int, User] = {}
        self.guilds: dict[int, Guild] = {}
        self.channels: dict[int, Channel] = {}
        self.messages: dict[int, Message] = {}
        self.attachments: dict[int, Attachment] = {}
        self.commands: dict[int, AppCommand] = {}
        self.interactions: dict[int, InteractionRecord] = {}
        self.interactions_by_token: dict[str, InteractionRecord] = {}
        self.dm_channels: dict[int, Channel] = {}
        #: Users who added the app to their own account (a user install: USER_INSTALL, ``"1"``).
        self.user_installs: set[int] = set()
        #: The app's installation contexts (``integration_types_config``); a command that names none gets these.
        self.app_integration_types: set[int] = {0}

        self.owner = self.add_user("app-owner")
        self.bot_user = self.add_user(bot_name, bot=True)
        self.application_id = application_id or self.bot_user.id
        self.app_name = bot_name
        self.verify_key = secrets.token_hex(32)

    # -- change notification -------------------------------------------------------------

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def changed(self) -> None:
        """Wake anything waiting in ``FakeDiscord.wait_for``."""
        for listener in list(self._listeners):
            listener()

    def emit(self, event: str, data: EventData, *, intent: int | None = None) -> None:
        self.sink.dispatch(event, data, intent=intent)
        self.changed()

    # -- users, guilds, channels ---------------------------------------------------------

    def add_user(self, username: str, *, bot: bool = False, global_name: str | None = None,
                 locale: str = "en-US") -> User:
        user = User(id=self.ids.next(), username=username, global_name=global_name, bot=bot, locale=locale)
        self.users[user.id] = user
        return user

    def add_guild(
        self,
        name: str,
        *,
        owner: User | None = None,
        bot_permissions: int = perms.DEFAULT_BOT,
        everyone_permissions: int = perms.DEFAULT_EVERYONE,
        locale: str = "en-US",
        upload_limit: int = 10 * 1024 * 1024,
        with_bot: bool = True,
    ) -> Guild:
        """A guild; ``with_bot=False`` makes one the app is not installed in (no bot member, no events)."""
        owner = owner or self.owner
        gid = self.ids.next()
        guild = Guild(id=gid, name=name, owner_id=owner.id, locale=locale, upload_limit=upload_limit,
                      created_at=self.clock.now())
        guild.roles[gid] = Role(id=gid, guild_id=gid, name="@everyone", permissions=everyone_permissions)
        self.guilds[gid] = guild
        if with_bot:
            bot_role = Role(id=self.ids.next(), guild_id=gid, name=self.app_name, permissions=bot_permissions,
                            position=1, managed=True, bot_id=self.bot_user.id)
            guild.roles[bot_role.id] = bot_role
            self._join(guild, self.bot_user, [bot_role.id])
        self._join(guild, owner, [])
        self.emit_guild(guild, "GUILD_CREATE", lambda i: self.guild_create_payload(guild, i), intent=intents.GUILDS)
        return guild

    def bot_in(self, guild: Guild) -> bool:
        """Whether the app is installed in ``guild`` (its bot user is a member)."""
        return self.bot_user.id in guild.members

    def emit_guild(self, guild: Guild, event: str, data: EventData, *, intent: int | None = None) -> None:
        """A guild event; the gateway only carries it when the bot is in that guild."""
        if self.bot_in(guild):
            self.emit(event, data, intent=intent)
        else:
            self.changed()

    def install_for_user(self, user: User) -> None:
        """``user`` adds the app to their account: its user-installable commands follow them everywhere."""
        self.app_integration_types.add(1)
        self.user_installs.add(user.id)
        self.changed()

    def _join(self, guild: Guild, user: User, role_ids: list[int], nick: str | None = None) -> Member:
        member = Member(user=user, guild=guild, role_ids=role_ids, nick=nick, joined_at=self.clock.now())
        guild.members[user.id] = member
        return member

    def guild_create_payload(self, guild: Guild, session_intents: int) -> dict[str, Any]:
        """GUILD_CREATE as Discord sends it: all members only with presences (small guild)."""
        if session_intents & intents.GUILD_PRESENCES:
            members = list(guild.members.values())
        else:
            members = [guild.members[self.bot_user.id]]
        return guild.payload(members=members)

    def add_role(self, guild: Guild, name: str, permissions: int = 0, *, mentionable: bool = False) -> Role:
        role = Role(id=self.ids.next(), guild_id=guild.id, name=name, permissions=permissions,
                    position=len(guild.roles), mentionable=mentionable)
        guild.roles[role.id] = role
        self.emit_guild(guild, "GUILD_ROLE_CREATE", {"guild_id": str(guild.id), "role": role.payload()},
                        intent=intents.GUILDS)
        return role

    def set_role_permissions(self, role: Role, permissions: int) -> None:
        role.permissions = permissions
        self.emit_guild(self.guilds[role.guild_id], "GUILD_ROLE_UPDATE",
                        {"guild_id": str(role.guild_id), "role": role.payload()}, intent=intents.GUILDS)

    def add_member(self, guild: Guild, user: User, *, roles: Iterable[Role] = (), permissions: int | None = None,
                   nick: str | None = None) -> Member:
        """Join ``user`` to ``guild``; ``permissions`` creates a personal role granting them."""
        role_ids = [r.id for r in roles]
        if permissions is not None:
            role_ids.append(self.add_role(guild, f"{user.username}-perms", permissions).id)
        existing = guild.members.get(user.id)
        if existing is not None:
            existing.role_ids = sorted(set(existing.role_ids) | set(role_ids))
            data = dict(existing.payload(), guild_id=str(guild.id))
            self.emit_guild(guild, "GUILD_MEMBER_UPDATE", data, intent=intents.GUILD_MEMBERS)
            return existing
        member = self._join(guild, user, role_ids, nick)
        self.emit_guild(guild, "GUILD_MEMBER_ADD", dict(member.payload(), guild_id=str(guild.id)),
                        intent=intents.GUILD_MEMBERS)
        return member

    def ensure_member(self, guild: Guild, user: User) -> Member:
        return guild.members.get(user.id) or self.add_member(guild, user)

    def add_channel(self, guild: Guild, name: str, *, nsfw: bool = False, topic: str | None = None) -> Channel:
        channel = Channel(id=self.ids.next(), type=GUILD_TEXT, name=name, guild=guild, nsfw=nsfw, topic=topic,
                          position=len(guild.channels))
        guild.channels[channel.id] = channel
        self.channels[channel.id] = channel
        self.emit_guild(guild, "CHANNEL_CREATE", channel.payload(), intent=intents.GUILDS)
        return channel

    def set_overwrite(self, channel: Channel, target: User | Role | Member, *, allow: int = 0, deny: int = 0) -> None:
        """Set a channel permission overwrite for a role or a member."""
        if isinstance(target, Member):
            target = target.user
        kind = 0 if isinstance(target, Role) else 1
        channel.overwrites[target.id] = (allow, deny, kind)
        assert channel.guild is not None, "DM channels have no permission overwrites"
        self.emit_guild(channel.guild, "CHANNEL_UPDATE", channel.payload(), intent=intents.GUILDS)

    def dm_channel(self, user: User) -> Channel:
        """The DM channel between ``user`` and the bot (created on first use)."""
        channel = self.dm_channels.get(user.id)
        if channel is None:
            channel = Channel(id=self.ids.next(), type=DM, name=None, recipients=[user])
            self.dm_channels[user.id] = channel
            self.channels[channel.id] = channel
        return channel

    # -- permissions -----------------------------------------------------------------------

    def permissions_for(self, channel: Channel, user: User) -> int:
        if channel.type == DM:
            return perms.DM_PERMISSIONS
        assert channel.guild is not None
        member = channel.guild.members.get(user.id)
        if member is None:
            return 0
        return perms.channel_permissions(channel, member)

    def bot_permissions(self, channel: Channel) -> int:
        return self.permissions_for(channel, self.bot_user)

    def everyone_permissions(self, channel: Channel) -> int:
        """What ``@everyone`` may do in ``channel``: all a user-installed app gets where it has no bot member.

        Discord documents ``app_permissions`` only as "the permissions the app has in the source location";
        an app with no member and no role can only be held to the channel's ``@everyone`` permissions, which
        is also how moderators limit it (e.g. denying Attach Files to ``@everyone`` in a channel).
        """
        if channel.type == DM:
            return perms.DM_PERMISSIONS
        assert channel.guild is not None
        return perms.everyone_permissions(channel)

    def require(self, channel: Channel, needed: int) -> None:
        """Raise Discord's 403s when the bot lacks ``needed`` in ``channel``."""
        have = self.bot_permissions(channel)
        if channel.type != DM and not have & perms.VIEW_CHANNEL:
            raise errors.missing_access()
        if have & needed != needed:
            raise errors.missing_permissions()

    # -- files -----------------------------------------------------------------------------

    def _sign(self, path: str, expires: int, issued: int) -> str:
        return hashlib.sha256(self._cdn_secret + f"{path}|{expires}|{issued}".encode()).hexdigest()

    def cdn_signature_ok(self, path: str, query: dict[str, str]) -> bool:
        """Whether a CDN link's ``ex``/``is``/``hm`` parameters are present, genuine and unexpired."""
        try:
            expires = int(query["ex"], 16)
            issued = int(query["is"], 16)
        except (KeyError, ValueError):
            return False
        if query.get("hm") != self._sign(path, expires, issued):
            return False
        return expires > self.clock.now()

    def store_attachment(self, channel_id: int, filename: str, data: bytes, content_type: str | None = None,
                         *, description: str | None = None, ephemeral: bool = False,
                         title: str | None = None) -> Attachment:
        """Put bytes on the fake CDN and return the attachment Discord would create for them."""
        att_id = self.ids.next()
        clean = sanitize_filename(filename)
        sniffed, width, height = sniff(data, clean)
        ctype = content_type or sniffed
        path = f"/attachments/{channel_id}/{att_id}/{quote(clean)}"
        issued = int(self.clock.now())
        expires = issued + CDN_LINK_LIFETIME
        query = f"?ex={expires:08x}&is={issued:08x}&hm={self._sign(path, expires, issued)}&"
        att = Attachment(
            id=att_id, filename=clean, data=bytes(data), content_type=ctype, channel_id=channel_id,
            url=f"{self.base_url}{path}{query}", proxy_url=f"{self.base_url}{path}{query}",
            expires_at=expires, width=width, height=height, description=description,
            ephemeral=ephemeral, title=title,
        )
        self.attachments[att_id] = att
        return att

    # -- messages --------------------------------------------------------------------------

    def member_payload_for(self, message: Message) -> dict[str, Any] | None:
        guild = message.channel.guild
        if guild is None or message.webhook_id is not None:
            return None
        member = guild.members.get(message.author.id)
        return None if member is None else member.payload(with_user=False)

    def _bot_sees(self, channel: Channel) -> bool:
        return channel.type == DM or bool(self.bot_permissions(channel) & perms.VIEW_CHANNEL)

    def emit_message(self, event: str, message: Message) -> None:
        """MESSAGE_CREATE/UPDATE, with content blanked for sessions lacking MESSAGE_CONTENT."""
        if message.ephemeral or not self._bot_sees(message.channel):
            self.changed()
            return
        full = message.payload(member=self.member_payload_for(message))
        exempt = (message.channel.type == DM or message.author is self.bot_user
                  or any(u is self.bot_user for u in message.mentions))

        def build(session_intents: int) -> dict[str, Any]:
            if exempt or session_intents & intents.MESSAGE_CONTENT:
                return full
            return dict(full, content="", embeds=[], attachments=[], components=[])

        intent = intents.DIRECT_MESSAGES if message.channel.type == DM else intents.GUILD_MESSAGES
        self.emit(event, build, intent=intent)

    def make_message(self, channel: Channel, author: User, **fields: Any) -> Message:
        """A message object not yet posted (so a rejected body leaves no trace)."""
        return Message(id=self.ids.next(), channel=channel, author=author, created_at=self.clock.now(), **fields)

    def post_message(self, msg: Message) -> Message:
        msg.created_at = self.clock.now()
        self.messages[msg.id] = msg
        msg.channel.messages.append(msg)
        return msg

    def new_message(self, channel: Channel, author: User, **fields: Any) -> Message:
        return self.post_message(self.make_message(channel, author, **fields))

    def user_message(
        self,
        user: User,
        channel: Channel,
        content: str = "",
        *,
        reply_to: Message | None = None,
        mention_reply: bool = True,
        mentions: Sequence[User] = (),
        attachments: Sequence[Attachment] = (),
        embeds: Sequence[dict[str, Any]] = (),
    ) -> Message:
        """A message typed by a person, dispatched to the bot as MESSAGE_CREATE."""
        if channel.guild is not None:
            self.ensure_member(channel.guild, user)
        mentioned = list(mentions)
        for uid in _MENTION_USER.findall(content):
            u = self.users.get(int(uid))
            if u is not None and u not in mentioned:
                mentioned.append(u)
        reference = None
        if reply_to is not None:
            reference = {
                "type": 0,
                "message_id": str(reply_to.id),
                "channel_id": str(reply_to.channel.id),
                "fail_if_not_exists": False,
            }
            if reply_to.channel.guild is not None:
                reference["guild_id"] = str(reply_to.channel.guild.id)
            if mention_reply and reply_to.author not in mentioned and reply_to.author is not user:
                mentioned.append(reply_to.author)
        msg = self.new_message(
            channel, user, content=content, attachments=list(attachments), embeds=list(embeds),
            type=MSG_REPLY if reply_to is not None else MSG_DEFAULT, mentions=mentioned,
            mention_roles=[int(r) for r in _MENTION_ROLE.findall(content)],
            mention_everyone="@everyone" in content or "@here" in content,
            message_reference=reference, referenced=reply_to,
        )
        self.emit_message("MESSAGE_CREATE", msg)
        return msg

    def _resolve_mentions(self, msg: Message) -> None:
        """Fill ``mentions`` from content, honouring ``allowed_mentions`` like Discord."""
        allowed = msg.allowed_mentions
        parse = None if allowed is None else set(allowed.get("parse") or [])
        explicit_users = {int(u) for u in (allowed or {}).get("users") or []}
        explicit_roles = {int(r) for r in (allowed or {}).get("roles") or []}
        users: list[User] = []
        for uid in _MENTION_USER.findall(msg.content):
            u = self.users.get(int(uid))
            if u is None or u in users:
                continue
            if parse is None or "users" in parse or u.id in explicit_users:
                users.append(u)
        roles = [int(r) for r in _MENTION_ROLE.findall(msg.content)
                 if parse is None or "roles" in parse or int(r) in explicit_roles]
        everyone = ("@everyone" in msg.content or "@here" in msg.content) and (parse is None or "everyone" in parse)
        if msg.referenced is not None and not msg.referenced.deleted:
            replied = True if allowed is None else allowed.get("replied_user", False)
            if replied and msg.referenced.author not in users and msg.referenced.author is not msg.author:
                users.append(msg.referenced.author)
        msg.mentions = users
        msg.mention_roles = roles
        msg.mention_everyone = everyone

    def apply_body(
        self,
        msg: Message,
        body: dict[str, Any],
        uploads: dict[int, tuple[str, bytes, str | None]],
        *,
        creating: bool,
        require_content: bool = False,
    ) -> None:
        """Apply a create/edit body (content, embeds, components, attachments...) to ``msg``.

        ``uploads`` maps the multipart ``files[n]`` index to (filename, bytes, content type).
        Attachments listed in ``body["attachments"]`` are kept (existing id) or created (upload
        index); on edit an omitted list keeps what is there and appends new uploads.
        """
        keep: list[Attachment] = []
        new_files: list[tuple[str, bytes, str | None, str | None, str | None]] = []
        used: set[int] = set()
        existing = {a.id: a for a in msg.attachments}
        if "attachments" in body and body["attachments"] is not None:
            for i, entry in enumerate(body["attachments"]):
                try:
                    ref = int(entry["id"])
                except (KeyError, TypeError, ValueError):
                    raise errors.invalid_form({f"attachments.{i}.id": ("BASE_TYPE_REQUIRED", "This field is required")}) from None
                if ref in existing:
                    keep.append(existing[ref])
                elif ref in uploads:
                    name, data, ctype = uploads[ref]
                    new_files.append((entry.get("filename") or name, data, ctype, entry.get("description"),
                                      entry.get("title")))
                    used.add(ref)
                else:
                    raise errors.invalid_form({f"attachments.{i}.id": ("ATTACHMENT_NOT_FOUND", "Unknown attachment")})
            for idx in sorted(set(uploads) - used):
                name, data, ctype = uploads[idx]
                new_files.append((name, data, ctype, None, None))
        else:
            keep = [] if creating else list(msg.attachments)
            for idx in sorted(uploads):
                name, data, ctype = uploads[idx]
                new_files.append((name, data, ctype, None, None))

        check_message(body, creating=creating, attachment_count=len(keep) + len(new_files),
                      has_existing=not creating)
        if require_content:  # e.g. replacing a "thinking..." placeholder with nothing
            content = body.get("content", msg.content) or ""
            if not (content.strip() or body.get("embeds", msg.embeds) or keep or new_files
                    or body.get("components", msg.components) or body.get("poll")):
                raise errors.empty_message()
        guild = msg.channel.guild
        limit = guild.upload_limit if guild is not None else 10 * 1024 * 1024
        if any(len(f[1]) > limit for f in new_files):
            raise errors.entity_too_large()

        if not creating:
            msg.history.append(msg.payload(with_reference=False))
            msg.edited_at = self.clock.now()
        if "content" in body:
            msg.content = body["content"] or ""
        if "embeds" in body:
            msg.embeds = list(body["embeds"] or [])
        if "components" in body:
            msg.components = _number_components(list(body["components"] or []))
        if "flags" in body and body["flags"] is not None:
            requested = int(body["flags"])
            if creating:
                msg.flags |= requested
            else:
                # Ephemerality is fixed at creation; an edit can neither add nor remove it.
                msg.flags = (requested & ~FLAG_EPHEMERAL) | (msg.flags & FLAG_EPHEMERAL)
        if "allowed_mentions" in body:
            msg.allowed_mentions = body["allowed_mentions"]
        if creating:
            msg.tts = bool(body.get("tts", False))
            if body.get("nonce") is not None:
                msg.nonce = str(body["nonce"])
        msg.attachments = keep + [
            self.store_attachment(msg.channel.id, name, data, ctype, description=desc, title=title)
            for name, data, ctype, desc, title in new_files
        ]
        self._resolve_mentions(msg)

    def bot_reference(self, channel: Channel, ref: dict[str, Any] | None) -> Message | None:
        """Resolve a bot's ``message_reference`` (reply target) or raise Discord's 50035."""
        if not ref or ref.get("message_id") is None:
            return None
        target = self.messages.get(int(ref["message_id"]))
        if target is None or target.deleted or target.ephemeral:
            if ref.get("fail_if_not_exists", True):
                raise errors.invalid_form({"message_reference": ("MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")})
            return None
        return target

    def delete_message(self, msg: Message) -> None:
        msg.deleted = True
        if msg.ephemeral:
            self.changed()
            return
        data: dict[str, Any] = {"id": str(msg.id), "channel_id": str(msg.channel.id)}
        if msg.channel.guild is not None:
            data["guild_id"] = str(msg.channel.guild.id)
        if self._bot_sees(msg.channel):
            intent = intents.DIRECT_MESSAGES if msg.channel.type == DM else intents.GUILD_MESSAGES
            self.emit("MESSAGE_DELETE", data, intent=intent)
        else:
            self.changed()

    # -- application commands -------------------------------------------------------------

    def overwrite_commands(self, guild_id: int | None, payloads: list[dict[str, Any]]) -> list[AppCommand]:
        """Bulk overwrite; a command keeps its id when name and type are unchanged (as on Discord)."""
        if not isinstance(payloads, list):
            raise errors.invalid_form({"_": ("BASE_TYPE_ARRAY", "Must be an array.")})
        if len(payloads) > 100:
            raise errors.invalid_form({"_": ("BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length.")})
        seen: set[tuple[str, int]] = set()
        for i, p in enumerate(payloads):
            check_command(p, str(i))
            key = (p["name"], p.get("type", 1))
            if key in seen:
                raise errors.invalid_form({str(i) + ".name": ("APPLICATION_COMMANDS_DUPLICATE_NAME",
                                                               f"Application command names must be unique ({p['name']})")})
            seen.add(key)
        old = {(c.name, c.type): c for c in self.commands.values() if c.guild_id == guild_id}
        result = []
        for p in payloads:
            result.append(self._store_command(guild_id, p, old.pop((p["name"], p.get("type", 1)), None)))
        for stale in old.values():
            del self.commands[stale.id]
        self.changed()
        return result

    def upsert_command(self, guild_id: int | None, payload: dict[str, Any]) -> tuple[AppCommand, bool]:
        check_command(payload)
        ctype = payload.get("type", 1)
        existing = next((c for c in self.commands.values()
                         if c.guild_id == guild_id and c.name == payload["name"] and c.type == ctype), None)
        cmd = self._store_command(guild_id, payload, existing)
        self.changed()
        return cmd, existing is None

    def _store_command(self, guild_id: int | None, payload: dict[str, Any], existing: AppCommand | None) -> AppCommand:
        raw = {k: v for k, v in payload.items() if k not in ("id", "application_id", "version", "guild_id")}
        if existing is not None:
            existing.raw = raw
            existing.version = self.ids.next()
            return existing
        cmd = AppCommand(id=self.ids.next(), application_id=self.application_id, name=payload["name"],
                         type=payload.get("type", 1), raw=raw, guild_id=guild_id, version=self.ids.next())
        self.commands[cmd.id] = cmd
        return cmd

    def find_command(self, name: str, *, guild: Guild | None = None, type: int = 1) -> AppCommand:
        """A synced command by name: the guild's own version first, then the global one."""
        for gid in ([guild.id] if guild is not None else []) + [None]:
            for cmd in self.commands.values():
                if cmd.name == name and cmd.type == type and cmd.guild_id == gid:
                    return cmd
        known = sorted(c.name for c in self.commands.values())
        raise LookupError(f"no synced command {name!r} (type {type}); synced: {known}")


def _number_components(components: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Discord assigns every component a numeric ``id`` (tree order) when none was given."""
    counter = [0]
    used = set()

    def collect(comps: list[dict[str, Any]]) -> None:
        for c in comps:
            if isinstance(c.get("id"), int):
                used.add(c["id"])
            collect(list(c.get("components") or []))
            for key in ("component", "accessory"):
                if isinstance(c.get(key), dict):
                    collect([c[key]])

    def assign(comps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for c in comps:
            c = dict(c)
            if not isinstance(c.get("id"), int):
                counter[0] += 1
                while counter[0] in used:
                    counter[0] += 1
                c["id"] = counter[0]
            if isinstance(c.get("components"), list):
                c["components"] = assign(c["components"])
            for key in ("component", "accessory"):
                if isinstance(c.get(key), dict):
                    c[key] = assign([c[key]])[0]
            out.append(c)
        return out

    collect(components)
    return assign(components)


number_components = _number_components
