"""The fake's world: users, guilds, channels, messages, files, commands and interactions.

Objects are plain mutable dataclasses that tests read directly for assertions; ``payload()``
renders the JSON shape Discord would send for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# Channel types
GUILD_TEXT = 0
DM = 1

# Message flags
FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
FLAG_COMPONENTS_V2 = 1 << 15

# Message types
MSG_DEFAULT = 0
MSG_REPLY = 19
MSG_CHAT_INPUT_COMMAND = 20
MSG_CONTEXT_MENU_COMMAND = 23

# Interaction types
PING = 1
APPLICATION_COMMAND = 2
MESSAGE_COMPONENT = 3
AUTOCOMPLETE = 4
MODAL_SUBMIT = 5

# Interaction callback types
CB_PONG = 1
CB_MESSAGE = 4
CB_DEFERRED_MESSAGE = 5
CB_DEFERRED_UPDATE = 6
CB_UPDATE_MESSAGE = 7
CB_AUTOCOMPLETE = 8
CB_MODAL = 9

CALLBACK_NAMES = {
    CB_PONG: "PONG",
    CB_MESSAGE: "CHANNEL_MESSAGE_WITH_SOURCE",
    CB_DEFERRED_MESSAGE: "DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE",
    CB_DEFERRED_UPDATE: "DEFERRED_UPDATE_MESSAGE",
    CB_UPDATE_MESSAGE: "UPDATE_MESSAGE",
    CB_AUTOCOMPLETE: "APPLICATION_COMMAND_AUTOCOMPLETE_RESULT",
    CB_MODAL: "MODAL",
}


def iso(ts: float | None) -> str | None:
    """Discord's ISO-8601 timestamp for a Unix time (``None`` passes through)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat()


@dataclass(eq=False)
class User:
    """A Discord account (a test user or the bot itself)."""

    id: int
    username: str
    global_name: str | None = None
    bot: bool = False
    avatar: str | None = None
    locale: str = "en-US"

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "username": self.username,
            "discriminator": "0",
            "global_name": self.global_name,
            "avatar": self.avatar,
            "avatar_decoration_data": None,
            "collectibles": None,
            "primary_guild": None,
            "banner": None,
            "accent_color": None,
            "public_flags": 0,
        }
        if self.bot:
            data["bot"] = True
        return data

    def __repr__(self) -> str:
        return f"<User {self.username} {self.id}>"


@dataclass(eq=False)
class Role:
    id: int
    guild_id: int
    name: str
    permissions: int
    position: int = 0
    managed: bool = False
    bot_id: int | None = None
    color: int = 0
    mentionable: bool = False

    @property
    def mention(self) -> str:
        return f"<@&{self.id}>"

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "name": self.name,
            "description": None,
            "color": self.color,
            "colors": {"primary_color": self.color, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": self.position,
            "permissions": str(self.permissions),
            "managed": self.managed,
            "mentionable": self.mentionable,
            "flags": 0,
        }
        if self.bot_id is not None:
            data["tags"] = {"bot_id": str(self.bot_id)}
        return data


@dataclass(eq=False)
class Member:
    user: User
    guild: Guild
    role_ids: list[int] = field(default_factory=list)
    nick: str | None = None
    joined_at: float = 0.0

    def payload(self, *, permissions: int | None = None, with_user: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "roles": [str(r) for r in self.role_ids],
            "nick": self.nick,
            "avatar": None,
            "banner": None,
            "joined_at": iso(self.joined_at),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
        }
        if with_user:
            data["user"] = self.user.payload()
        if permissions is not None:
            data["permissions"] = str(permissions)
        return data


@dataclass(eq=False)
class Guild:
    id: int
    name: str
    owner_id: int
    roles: dict[int, Role] = field(default_factory=dict)
    members: dict[int, Member] = field(default_factory=dict)
    channels: dict[int, Channel] = field(default_factory=dict)
    locale: str = "en-US"
    features: list[str] = field(default_factory=list)
    upload_limit: int = 10 * 1024 * 1024
    created_at: float = 0.0

    @property
    def everyone(self) -> Role:
        return self.roles[self.id]

    def member(self, user: User) -> Member | None:
        return self.members.get(user.id)

    def channel_named(self, name: str) -> Channel:
        for channel in self.channels.values():
            if channel.name == name:
                return channel
        raise KeyError(name)

    def payload(self, *, members: list[Member] | None = None) -> dict[str, Any]:
        """Full GUILD_CREATE shape (REST ``GET /guilds/{id}`` uses the same minus lists)."""
        members = list(self.members.values()) if members is None else members
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(self.owner_id),
            "region": "deprecated",
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": self.locale,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "vanity_url_code": None,
            "max_members": 500000,
            "max_video_channel_users": 25,
            "max_stage_video_channel_users": 50,
            "features": list(self.features),
            "roles": [r.payload() for r in self.roles.values()],
            "emojis": [],
            "stickers": [],
            "incidents_data": None,
            # GUILD_CREATE-only fields
            "joined_at": iso(self.created_at),
            "large": False,
            "unavailable": False,
            "member_count": len(self.members),
            "voice_states": [],
            "members": [m.payload() for m in members],
            "channels": [c.payload() for c in self.channels.values()],
            "threads": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }


@dataclass(eq=False)
class Channel:
    """A guild text channel or a DM. ``messages`` is every message ever posted, in order."""

    id: int
    type: int
    name: str | None
    guild: Guild | None = None
    nsfw: bool = False
    topic: str | None = None
    position: int = 0
    # target id -> (allow, deny, kind) where kind 0 = role, 1 = member
    overwrites: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    recipients: list[User] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)

    @property
    def is_dm(self) -> bool:
        return self.type == DM

    @property
    def mention(self) -> str:
        return f"<#{self.id}>"

    @property
    def visible_messages(self) -> list[Message]:
        """What everyone sees in the channel: not deleted, not ephemeral."""
        return [m for m in self.messages if not m.deleted and not m.ephemeral]

    @property
    def last_message(self) -> Message | None:
        visible = self.visible_messages
        return visible[-1] if visible else None

    def messages_by(self, user: User) -> list[Message]:
        return [m for m in self.messages if m.author is user and not m.deleted]

    def payload(self) -> dict[str, Any]:
        last = self.messages[-1].id if self.messages else None
        if self.type == DM:
            return {
                "id": str(self.id),
                "type": DM,
                "last_message_id": None if last is None else str(last),
                "flags": 0,
                "recipients": [u.payload() for u in self.recipients],
            }
        assert self.guild is not None
        return {
            "id": str(self.id),
            "type": self.type,
            "guild_id": str(self.guild.id),
            "name": self.name,
            "position": self.position,
            "permission_overwrites": [
                {"id": str(target), "type": kind, "allow": str(allow), "deny": str(deny)}
                for target, (allow, deny, kind) in self.overwrites.items()
            ],
            "nsfw": self.nsfw,
            "topic": self.topic,
            "last_message_id": None if last is None else str(last),
            "rate_limit_per_user": 0,
            "parent_id": None,
            "flags": 0,
            "icon_emoji": None,
            "theme_color": None,
        }

    def __repr__(self) -> str:
        return f"<Channel {self.name or 'DM'} {self.id}>"


@dataclass(eq=False)
class Attachment:
    """A stored file. ``data`` holds the exact bytes uploaded; the CDN serves them at ``url``."""

    id: int
    filename: str
    data: bytes
    content_type: str | None
    channel_id: int
    url: str
    proxy_url: str
    expires_at: float
    width: int | None = None
    height: int | None = None
    description: str | None = None
    ephemeral: bool = False
    title: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.proxy_url,
        }
        if self.content_type:
            data["content_type"] = self.content_type
        if self.width is not None:
            data["width"] = self.width
            data["height"] = self.height
        if self.description is not None:
            data["description"] = self.description
        if self.title is not None:
            data["title"] = self.title
        if self.ephemeral:
            data["ephemeral"] = True
        return data

    def __repr__(self) -> str:
        return f"<Attachment {self.filename} {self.size}B {self.id}>"


@dataclass(eq=False)
class Message:
    """A message as Discord stores it; ``history`` keeps each earlier version's payload."""

    id: int
    channel: Channel
    author: User
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    flags: int = 0
    type: int = MSG_DEFAULT
    created_at: float = 0.0
    edited_at: float | None = None
    tts: bool = False
    mentions: list[User] = field(default_factory=list)
    mention_roles: list[int] = field(default_factory=list)
    mention_everyone: bool = False
    allowed_mentions: dict[str, Any] | None = None
    message_reference: dict[str, Any] | None = None
    referenced: Message | None = None
    interaction: InteractionRecord | None = None
    webhook_id: int | None = None
    application_id: int | None = None
    nonce: str | None = None
    reactions: dict[str, list[int]] = field(default_factory=dict)
    deleted: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        """True while this is a deferred "Bot is thinking..." placeholder."""
        return bool(self.flags & FLAG_LOADING)

    @property
    def guild(self) -> Guild | None:
        return self.channel.guild

    def iter_components(self) -> Iterator[dict[str, Any]]:
        """Every component in the tree (rows, buttons, selects, v2 containers...)."""
        stack = list(reversed(self.components))
        while stack:
            comp = stack.pop()
            yield comp
            children = list(comp.get("components") or [])
            if "component" in comp:
                children.append(comp["component"])
            if "accessory" in comp:
                children.append(comp["accessory"])
            stack.extend(reversed(children))

    def find_component(self, custom_id: str) -> dict[str, Any] | None:
        for comp in self.iter_components():
            if comp.get("custom_id") == custom_id:
                return comp
        return None

    @property
    def custom_ids(self) -> list[str]:
        return [c["custom_id"] for c in self.iter_components() if "custom_id" in c]

    def payload(self, *, member: dict[str, Any] | None = None, with_reference: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "type": self.type,
            "channel_id": str(self.channel.id),
            "author": self.author.payload(),
            "content": self.content,
            "timestamp": iso(self.created_at),
            "edited_timestamp": iso(self.edited_at),
            "tts": self.tts,
            "mention_everyone": self.mention_everyone,
            "mentions": [u.payload() for u in self.mentions],
            "mention_roles": [str(r) for r in self.mention_roles],
            "attachments": [a.payload() for a in self.attachments],
            "embeds": self.embeds,
            "components": self.components,
            "pinned": False,
            "flags": self.flags,
        }
        if self.channel.guild is not None:
            data["guild_id"] = str(self.channel.guild.id)
        if member is not None:
            data["member"] = member
        if self.nonce is not None:
            data["nonce"] = self.nonce
        if self.webhook_id is not None:
            data["webhook_id"] = str(self.webhook_id)
        if self.application_id is not None:
            data["application_id"] = str(self.application_id)
        if self.reactions:
            data["reactions"] = [
                {
                    "emoji": {"id": None, "name": emoji},
                    "count": len(users),
                    "count_details": {"burst": 0, "normal": len(users)},
                    "burst_colors": [],
                    "me": self.author.bot and self.author.id in users,
                    "me_burst": False,
                    "burst_me": False,
                    "burst_count": 0,
                }
                for emoji, users in self.reactions.items()
                if users
            ]
        if self.message_reference is not None:
            data["message_reference"] = self.message_reference
            if with_reference:
                ref = self.referenced
                data["referenced_message"] = (
                    None if ref is None or ref.deleted else ref.payload(with_reference=False)
                )
        inter = self.interaction
        if inter is not None:
            user = inter.user.payload()
            data["interaction_metadata"] = {
                "id": str(inter.id),
                "type": inter.type,
                "user": user,
                "authorizing_integration_owners": inter.payload.get("authorizing_integration_owners", {}),
            }
            if inter.type == APPLICATION_COMMAND:
                data["interaction_metadata"]["name"] = inter.command_name
                data["interaction_metadata"]["command_type"] = inter.payload["data"].get("type", 1)
            data["interaction"] = {
                "id": str(inter.id),
                "type": inter.type,
                "name": inter.command_name or "",
                "user": user,
            }
        return data

    def __repr__(self) -> str:
        flags = " ephemeral" if self.ephemeral else ""
        flags += " loading" if self.loading else ""
        flags += " deleted" if self.deleted else ""
        return f"<Message {self.id} by {self.author.username}{flags}: {self.content[:40]!r}>"


@dataclass(eq=False)
class AppCommand:
    """A registered application command, as the bot last synced it."""

    id: int
    application_id: int
    name: str
    type: int
    raw: dict[str, Any]
    guild_id: int | None = None
    version: int = 0

    @property
    def description(self) -> str:
        return self.raw.get("description", "")

    @property
    def options(self) -> list[dict[str, Any]]:
        return list(self.raw.get("options") or [])

    def payload(self) -> dict[str, Any]:
        data = dict(self.raw)
        data.update(
            {
                "id": str(self.id),
                "application_id": str(self.application_id),
                "version": str(self.version),
                "name": self.name,
                "type": self.type,
                "description": self.raw.get("description", "") if self.type == 1 else "",
                "default_member_permissions": self.raw.get("default_member_permissions"),
                "dm_permission": self.raw.get("dm_permission", True),
                "nsfw": self.raw.get("nsfw", False),
            }
        )
        if self.guild_id is not None:
            data["guild_id"] = str(self.guild_id)
        data.setdefault("contexts", None)
        data.setdefault("integration_types", [0])
        return data

    def __repr__(self) -> str:
        where = f" guild={self.guild_id}" if self.guild_id else ""
        return f"<AppCommand {self.name} type={self.type} id={self.id}{where}>"


@dataclass(eq=False)
class Callback:
    """One initial-response call the bot made (``POST /interactions/{id}/{token}/callback``)."""

    type: int
    data: dict[str, Any] | None
    at: float
    files: list[Attachment] = field(default_factory=list)

    @property
    def name(self) -> str:
        return CALLBACK_NAMES.get(self.type, str(self.type))


@dataclass(eq=False)
class Rejection:
    """A request about an interaction that Discord refused (e.g. 40060, 10062, 50027)."""

    method: str
    path: str
    status: int
    code: int
    message: str
    at: float


@dataclass(eq=False)
class InteractionRecord:
    """Everything that happened to one interaction, from the user's click to the last edit.

    ``original`` is the ``@original`` response message as last edited (the same object that
    sits in ``channel.messages``); ``failed`` is True when the user saw "This interaction failed".
    """

    id: int
    token: str
    type: int
    payload: dict[str, Any]
    user: User
    channel: Channel
    created_at: float
    command: AppCommand | None = None
    source_message: Message | None = None
    callbacks: list[Callback] = field(default_factory=list)
    original: Message | None = None
    followups: list[Message] = field(default_factory=list)
    failed: bool = False
    failed_at: float | None = None
    modal: dict[str, Any] | None = None
    modal_submitted: bool = False
    rejected: list[Rejection] = field(default_factory=list)
    original_deleted: bool = False
    #: A user-installed app in a server where the member lacks Use External Apps: responses only they see.
    forced_ephemeral: bool = False

    @property
    def guild(self) -> Guild | None:
        return self.channel.guild

    @property
    def command_name(self) -> str | None:
        if self.type in (APPLICATION_COMMAND, AUTOCOMPLETE):
            return self.payload["data"]["name"]
        return None

    @property
    def custom_id(self) -> str | None:
        return self.payload.get("data", {}).get("custom_id")

    @property
    def acknowledged(self) -> bool:
        return bool(self.callbacks)

    @property
    def response_type(self) -> int | None:
        return self.callbacks[0].type if self.callbacks else None

    @property
    def acked_at(self) -> float | None:
        return self.callbacks[0].at if self.callbacks else None

    @property
    def ack_delay(self) -> float | None:
        """Seconds from the user's action to the bot's first callback (Discord allows 3)."""
        return None if not self.callbacks else self.callbacks[0].at - self.created_at

    @property
    def deferred(self) -> bool:
        return self.response_type in (CB_DEFERRED_MESSAGE, CB_DEFERRED_UPDATE)

    @property
    def ephemeral(self) -> bool:
        """Whether the initial response used flag 64 or was made ephemeral by Discord (only the user sees it)."""
        if not self.callbacks:
            return False
        if self.forced_ephemeral and self.response_type in (CB_MESSAGE, CB_DEFERRED_MESSAGE):
            return True
        data = self.callbacks[0].data or {}
        return bool(int(data.get("flags", 0) or 0) & FLAG_EPHEMERAL)

    @property
    def thinking(self) -> bool:
        """Deferred with a "thinking" placeholder that has not been replaced yet."""
        return self.original is not None and self.original.loading and not self.original.deleted

    @property
    def messages(self) -> list[Message]:
        """The original response (if any) followed by follow-ups."""
        out = [] if self.original is None else [self.original]
        return out + [m for m in self.followups if m is not self.original]

    def __repr__(self) -> str:
        what = self.command_name or self.custom_id or self.type
        state = "failed" if self.failed else (self.callbacks[0].name if self.callbacks else "pending")
        return f"<Interaction {self.id} {what!r} {state}>"
