"""Interactions end to end: building what users trigger, and Discord's rules for answering.

The user side builds INTERACTION_CREATE payloads (slash commands with resolved attachments,
context menus, buttons/selects carrying their message, modal submits mirroring the modal's
ActionRow or Label layout). The bot side enforces Discord's contract: one initial callback
(else 40060), within 3 s (else the user sees "This interaction failed" and callbacks get
10062), follow-ups and ``@original`` edits only after acknowledging and only for 15 minutes
(then 401/50027).

Installation contexts: ``authorizing_integration_owners`` has ``"0"`` (the guild id, or ``"0"`` in
the bot's DM) when the app is installed in that server and the command allows guild installs, and
``"1"`` (the user's id) when the user installed the app to their account and the command allows user
installs; with neither the client offers no command. Components and modal submits carry the owners
of the interaction that made their message. Where only ``"1"`` applies in a server (the bot is not
a member), ``app_permissions`` are ``@everyone``'s in the channel, and a member without Use External
Apps there gets every response ephemeral. Every response is held to ``app_permissions``: files need
Attach Files and embeds Embed Links, else 403/50013 (strict where Discord may merely drop them).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from . import errors
from . import permissions as perms
from .models import (
    APPLICATION_COMMAND,
    AUTOCOMPLETE,
    CB_AUTOCOMPLETE,
    CB_DEFERRED_MESSAGE,
    CB_DEFERRED_UPDATE,
    CB_MESSAGE,
    CB_MODAL,
    CB_UPDATE_MESSAGE,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    MESSAGE_COMPONENT,
    MODAL_SUBMIT,
    MSG_CHAT_INPUT_COMMAND,
    MSG_CONTEXT_MENU_COMMAND,
    MSG_DEFAULT,
    AppCommand,
    Attachment,
    Callback,
    Channel,
    InteractionRecord,
    Message,
    Rejection,
    Role,
    User,
)
from .state import State, number_components
from .validation import check_modal

ACK_DEADLINE = 3.0
TOKEN_LIFETIME = 15 * 60.0
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024

_ALLOWED_CALLBACKS = {
    APPLICATION_COMMAND: {CB_MESSAGE, CB_DEFERRED_MESSAGE, CB_MODAL},
    MESSAGE_COMPONENT: {CB_MESSAGE, CB_DEFERRED_MESSAGE, CB_DEFERRED_UPDATE, CB_UPDATE_MESSAGE, CB_MODAL},
    MODAL_SUBMIT: {CB_MESSAGE, CB_DEFERRED_MESSAGE, CB_DEFERRED_UPDATE, CB_UPDATE_MESSAGE},
    AUTOCOMPLETE: {CB_AUTOCOMPLETE},
}
_CREATE_FLAGS = FLAG_EPHEMERAL | (1 << 2) | (1 << 12) | (1 << 15)

Uploads = dict[int, tuple[str, bytes, str | None]]


def _token(interaction_id: int) -> str:
    raw = f"interaction:{interaction_id}:{secrets.token_urlsafe(48)}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class InteractionEngine:
    """Creates interactions for test users and enforces how the bot may answer them."""

    def __init__(self, state: State, *, ack_deadline: float = ACK_DEADLINE,
                 token_lifetime: float = TOKEN_LIFETIME) -> None:
        self.state = state
        self.ack_deadline = ack_deadline
        self.token_lifetime = token_lifetime

    # -- common payload pieces -----------------------------------------------------------

    def _channel_payload(self, channel: Channel, user: User) -> dict[str, Any]:
        data = channel.payload()
        if channel.guild is not None:
            data["permissions"] = str(self.state.permissions_for(channel, user))
        return data

    def _owners(self, user: User, channel: Channel, command: AppCommand | None) -> dict[str, str]:
        """``authorizing_integration_owners`` for a command (or, with None, a bot message's component)."""
        st = self.state
        types = {0} if command is None else set(command.raw.get("integration_types") or st.app_integration_types)
        guild = channel.guild
        owners: dict[str, str] = {}
        if 0 in types and (guild is None or st.bot_in(guild)):
            owners["0"] = str(guild.id) if guild is not None else "0"
        if 1 in types and user.id in st.user_installs:
            owners["1"] = str(user.id)
        if not owners:
            where = f"server {guild.name!r}" if guild is not None else "this DM"
            raise PermissionError(f"the app is installed neither in {where} nor for {user.username} in a way this "
                                  "command allows (integration_types), so the client offers no command")
        return owners

    def _new(self, itype: int, user: User, channel: Channel, data: dict[str, Any], *,
             command: AppCommand | None = None, message: Message | None = None,
             locale: str | None = None, owners: dict[str, str] | None = None) -> InteractionRecord:
        st = self.state
        guild = channel.guild
        if owners is None:
            made_by = message.interaction if message is not None else None
            owners = (dict(made_by.payload["authorizing_integration_owners"]) if made_by is not None
                      else self._owners(user, channel, command))
        user_app_only = guild is not None and "0" not in owners  # the bot is not a member there
        app_permissions = st.everyone_permissions(channel) if user_app_only else st.bot_permissions(channel)
        iid = st.ids.next()
        token = _token(iid)
        payload: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(st.application_id),
            "type": itype,
            "data": data,
            "token": token,
            "version": 1,
            "channel": self._channel_payload(channel, user),
            "channel_id": str(channel.id),
            "locale": locale or user.locale,
            "app_permissions": str(app_permissions),
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": guild.upload_limit if guild is not None else DEFAULT_UPLOAD_LIMIT,
            "authorizing_integration_owners": owners,
            "context": 0 if guild is not None else 1,
        }
        if guild is not None:
            member = st.ensure_member(guild, user)
            payload["guild_id"] = str(guild.id)
            payload["guild"] = {"id": str(guild.id), "locale": guild.locale, "features": list(guild.features)}
            payload["guild_locale"] = guild.locale
            payload["member"] = member.payload(permissions=st.permissions_for(channel, user))
        else:
            payload["user"] = user.payload()
        if message is not None:
            payload["message"] = message.payload()
        rec = InteractionRecord(id=iid, token=token, type=itype, payload=payload, user=user, channel=channel,
                                created_at=st.clock.now(), command=command, source_message=message)
        # Use External Apps off: a user-installed app's responses are only shown to the user.
        rec.forced_ephemeral = user_app_only and not st.permissions_for(channel, user) & perms.USE_EXTERNAL_APPS
        st.interactions[iid] = rec
        st.interactions_by_token[token] = rec
        st.emit("INTERACTION_CREATE", payload)
        return rec

    # -- user actions ----------------------------------------------------------------------

    def slash(self, user: User, channel: Channel, name: str, options: Mapping[str, Any] | None = None, *,
              locale: str | None = None, focused: str | None = None) -> InteractionRecord:
        """A chat-input command; ``name`` may be ``"group sub"`` for subcommands."""
        parts = name.split()
        cmd = self.state.find_command(parts[0], guild=channel.guild)
        self._check_context(cmd, channel)
        if channel.guild is not None:
            self.state.ensure_member(channel.guild, user)
        self._check_member_can_use(cmd, channel, user)
        resolved: dict[str, dict[str, Any]] = {}
        defs = cmd.options
        nested: list[dict[str, Any]] = []
        for sub in parts[1:]:
            sub_def = next((o for o in defs if o.get("name") == sub and o.get("type") in (1, 2)), None)
            if sub_def is None:
                raise LookupError(f"{cmd.name} has no subcommand {sub!r}")
            nested.append({"type": sub_def["type"], "name": sub, "options": []})
            defs = sub_def.get("options") or []
        built = self._build_options(defs, dict(options or {}), resolved, channel, focused=focused)
        if nested:
            nested[-1]["options"] = built
            for outer, inner in zip(nested, nested[1:], strict=False):
                outer["options"] = [inner]
            built = [nested[0]]
        data: dict[str, Any] = {"id": str(cmd.id), "name": cmd.name, "type": 1}
        if built:
            data["options"] = built
        if resolved:
            data["resolved"] = resolved
        if cmd.guild_id is not None:
            data["guild_id"] = str(cmd.guild_id)
        itype = AUTOCOMPLETE if focused is not None else APPLICATION_COMMAND
        return self._new(itype, user, channel, data, command=cmd, locale=locale)

    def _check_context(self, cmd: AppCommand, channel: Channel) -> None:
        contexts = cmd.raw.get("contexts")
        ctx = 0 if channel.guild is not None else 1
        if contexts is not None and ctx not in contexts:
            raise PermissionError(f"/{cmd.name} is not available in this context ({ctx}); contexts={contexts}")
        if channel.guild is None and cmd.raw.get("dm_permission") is False:
            raise PermissionError(f"/{cmd.name} is not available in DMs")
        if cmd.raw.get("nsfw") and channel.guild is not None and not channel.nsfw:
            raise PermissionError(f"/{cmd.name} is age-restricted and hidden outside NSFW channels")

    def _check_member_can_use(self, cmd: AppCommand, channel: Channel, user: User) -> None:
        """Discord hides commands whose ``default_member_permissions`` the member lacks."""
        required = cmd.raw.get("default_member_permissions")
        if channel.guild is None or required is None:
            return
        have = self.state.permissions_for(channel, user)
        if int(required) & have != int(required):
            raise PermissionError(f"{user.username} lacks default_member_permissions={required} for {cmd.name!r}")

    def _build_options(self, defs: list[dict[str, Any]], values: dict[str, Any],
                       resolved: dict[str, dict[str, Any]], channel: Channel,
                       focused: str | None) -> list[dict[str, Any]]:
        by_name = {d["name"]: d for d in defs}
        unknown = set(values) - set(by_name)
        if unknown:
            raise LookupError(f"unknown option(s) {sorted(unknown)}; command takes {sorted(by_name)}")
        missing = [d["name"] for d in defs if d.get("required") and d["name"] not in values and d["name"] != focused]
        if missing and focused is None:
            raise ValueError(f"Discord would not send this: required option(s) missing {missing}")
        out = []
        for odef in defs:  # Discord sends options in the order the user filled them; definition order is fine
            name = odef["name"]
            if name not in values:
                continue
            value = values[name]
            entry: dict[str, Any] = {"name": name, "type": odef["type"]}
            entry["value"] = self._option_value(odef, value, resolved, channel, is_focused=name == focused)
            if name == focused:
                entry["focused"] = True
            out.append(entry)
        return out

    def _option_value(self, odef: dict[str, Any], value: Any, resolved: dict[str, dict[str, Any]],
                      channel: Channel, *, is_focused: bool) -> Any:
        otype = odef["type"]
        st = self.state
        if otype in (3, 4, 5, 10):
            if is_focused:
                return str(value)
            if otype == 3:
                value = str(value)
                if "min_length" in odef and len(value) < odef["min_length"]:
                    raise ValueError(f"{odef['name']}: shorter than min_length {odef['min_length']}")
                if "max_length" in odef and len(value) > odef["max_length"]:
                    raise ValueError(f"{odef['name']}: longer than max_length {odef['max_length']}")
            elif otype == 4:
                value = int(value)
            elif otype == 10:
                value = float(value)
            else:
                value = bool(value)
            if otype in (4, 10):
                if "min_value" in odef and value < odef["min_value"]:
                    raise ValueError(f"{odef['name']}: below min_value {odef['min_value']}")
                if "max_value" in odef and value > odef["max_value"]:
                    raise ValueError(f"{odef['name']}: above max_value {odef['max_value']}")
            choices = odef.get("choices")
            if choices and value not in [c["value"] for c in choices]:
                raise ValueError(f"{odef['name']}: {value!r} is not one of the choices")
            return value
        if otype == 11:
            if not isinstance(value, Attachment):
                raise TypeError(f"{odef['name']} takes an Attachment from fake.upload_user_attachment()")
            data = value.payload()
            data["ephemeral"] = True  # Discord marks slash-command uploads ephemeral
            resolved.setdefault("attachments", {})[str(value.id)] = data
            return str(value.id)
        if otype in (6, 9) and isinstance(value, User):
            resolved.setdefault("users", {})[str(value.id)] = value.payload()
            guild = channel.guild
            if guild is not None and value.id in guild.members:
                member = guild.members[value.id]
                resolved.setdefault("members", {})[str(value.id)] = member.payload(
                    permissions=st.permissions_for(channel, value), with_user=False)
            return str(value.id)
        if otype in (8, 9) and isinstance(value, Role):
            resolved.setdefault("roles", {})[str(value.id)] = value.payload()
            return str(value.id)
        if otype == 7 and isinstance(value, Channel):
            data = {"id": str(value.id), "name": value.name, "type": value.type,
                    "permissions": str(st.bot_permissions(value))}
            if value.guild is not None:
                data["guild_id"] = str(value.guild.id)
            resolved.setdefault("channels", {})[str(value.id)] = data
            return str(value.id)
        raise TypeError(f"option {odef['name']} (type {otype}) cannot take {value!r}")

    def context_menu(self, user: User, target: Message | User, name: str, *,
                     channel: Channel | None = None) -> InteractionRecord:
        """A message (right-click > Apps) or user context menu command."""
        if isinstance(target, Message):
            channel = target.channel
            cmd = self.state.find_command(name, guild=channel.guild, type=3)
            if target.deleted:
                raise ValueError("cannot open a context menu on a deleted message")
            resolved = {"messages": {str(target.id): target.payload()}}
        else:
            if channel is None:
                raise ValueError("a user context menu needs the channel it is used in")
            cmd = self.state.find_command(name, guild=channel.guild, type=2)
            resolved = {"users": {str(target.id): target.payload()}}
            guild = channel.guild
            if guild is not None and target.id in guild.members:
                resolved["members"] = {str(target.id): guild.members[target.id].payload(with_user=False)}
        self._check_context(cmd, channel)
        if channel.guild is not None:
            self.state.ensure_member(channel.guild, user)
        self._check_member_can_use(cmd, channel, user)
        data: dict[str, Any] = {"id": str(cmd.id), "name": cmd.name, "type": cmd.type,
                                "target_id": str(target.id), "resolved": resolved}
        if cmd.guild_id is not None:
            data["guild_id"] = str(cmd.guild_id)
        return self._new(APPLICATION_COMMAND, user, channel, data, command=cmd)

    def component(self, user: User, message: Message, custom_id: str,
                  values: Sequence[Any] | None = None) -> InteractionRecord:
        """A button press (no ``values``) or select choice on ``message``."""
        if message.deleted:
            raise ValueError("the message was deleted; there is nothing to click")
        if message.ephemeral and message.interaction is not None and message.interaction.user is not user:
            raise PermissionError("only the invoking user can see this ephemeral message")
        comp = message.find_component(custom_id)
        if comp is None:
            raise LookupError(f"no component {custom_id!r} on {message!r}; has {message.custom_ids}")
        if comp.get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled; a user cannot use it")
        ctype = comp["type"]
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": ctype}
        if isinstance(comp.get("id"), int):
            data["id"] = comp["id"]
        if ctype == 2:
            if values is not None:
                raise TypeError("buttons take no values")
            if comp.get("style") in (5, 6):
                raise ValueError("link/premium buttons do not create interactions")
        else:
            values = list(values or [])
            lo, hi = comp.get("min_values", 1), comp.get("max_values", 1)
            if not lo <= len(values) <= hi:
                raise ValueError(f"select {custom_id!r} needs {lo}..{hi} values, got {len(values)}")
            resolved: dict[str, dict[str, Any]] = {}
            out = []
            for v in values:
                if isinstance(v, User):
                    resolved.setdefault("users", {})[str(v.id)] = v.payload()
                    out.append(str(v.id))
                elif isinstance(v, Role):
                    resolved.setdefault("roles", {})[str(v.id)] = v.payload()
                    out.append(str(v.id))
                elif isinstance(v, Channel):
                    resolved.setdefault("channels", {})[str(v.id)] = {"id": str(v.id), "name": v.name,
                                                                     "type": v.type, "permissions": "0"}
                    out.append(str(v.id))
                else:
                    if ctype == 3 and str(v) not in [o.get("value") for o in comp.get("options") or []]:
                        raise ValueError(f"{v!r} is not an option of select {custom_id!r}")
                    out.append(str(v))
            data["values"] = out
            if resolved:
                data["resolved"] = resolved
        return self._new(MESSAGE_COMPONENT, user, message.channel, data, message=message)

    def submit_modal(self, user: User, modal_interaction: InteractionRecord,
                     values: Mapping[str, Any]) -> InteractionRecord:
        """Submit the modal the bot opened on ``modal_interaction`` (ActionRow or Label layout)."""
        modal = modal_interaction.modal
        if modal is None:
            raise ValueError(f"{modal_interaction!r} did not open a modal")
        if user is not modal_interaction.user:
            raise PermissionError("only the user the modal was shown to can submit it")
        if modal_interaction.modal_submitted:
            raise ValueError("this modal was already submitted (and closed); the bot must open a new one")
        remaining = dict(values)
        resolved: dict[str, dict[str, Any]] = {}
        components = []
        for row in modal["components"]:
            if row.get("type") == 1:
                inner = row["components"][0]
                components.append({"type": 1, "id": row.get("id"),
                                   "components": [self._modal_value(inner, remaining, resolved)]})
            elif row.get("type") == 18:
                components.append({"type": 18, "id": row.get("id"),
                                   "component": self._modal_value(row["component"], remaining, resolved)})
            elif row.get("type") == 10:
                components.append({"type": 10, "id": row.get("id")})
        if remaining:
            raise LookupError(f"modal has no input(s) {sorted(remaining)}")
        data: dict[str, Any] = {"custom_id": modal["custom_id"], "components": components}
        if resolved:
            data["resolved"] = resolved
        modal_interaction.modal_submitted = True
        return self._new(MODAL_SUBMIT, user, modal_interaction.channel, data,
                         message=modal_interaction.source_message,
                         owners=dict(modal_interaction.payload["authorizing_integration_owners"]))

    @staticmethod
    def _modal_value(field: dict[str, Any], remaining: dict[str, Any],
                     resolved: dict[str, dict[str, Any]]) -> dict[str, Any]:
        cid = field["custom_id"]
        ftype = field["type"]
        out: dict[str, Any] = {"type": ftype, "id": field.get("id"), "custom_id": cid}
        if ftype == 4:
            value = remaining.pop(cid, field.get("value") or "")
            value = str(value)
            required = field.get("required", True)
            if required and not value:
                raise ValueError(f"text input {cid!r} is required")
            if value and field.get("min_length") and len(value) < field["min_length"]:
                raise ValueError(f"text input {cid!r} is shorter than {field['min_length']}")
            if field.get("max_length") and len(value) > field["max_length"]:
                raise ValueError(f"text input {cid!r} is longer than {field['max_length']}")
            out["value"] = value
        elif ftype == 19:
            files = list(remaining.pop(cid, []))
            ids = []
            for att in files:
                data = att.payload()
                data["ephemeral"] = True
                resolved.setdefault("attachments", {})[str(att.id)] = data
                ids.append(str(att.id))
            out["values"] = ids
        elif ftype == 23:
            out["value"] = bool(remaining.pop(cid, False))
        else:
            raw = remaining.pop(cid, [])
            out["values"] = [str(v) for v in (raw if isinstance(raw, (list, tuple)) else [raw])]
        return out

    # -- deadlines ---------------------------------------------------------------------------

    def sweep(self) -> bool:
        """Mark unanswered interactions older than 3 s as failed; True if any changed."""
        now = self.state.clock.now()
        changed = False
        for rec in self.state.interactions.values():
            if not rec.callbacks and not rec.failed and now - rec.created_at > self.ack_deadline:
                rec.failed = True
                rec.failed_at = now
                changed = True
        return changed

    def _expired(self, rec: InteractionRecord) -> bool:
        return self.state.clock.now() - rec.created_at > self.token_lifetime

    # -- bot side: initial response --------------------------------------------------------

    def find(self, *, interaction_id: int | None = None, token: str | None = None) -> InteractionRecord | None:
        if token is not None and token in self.state.interactions_by_token:
            return self.state.interactions_by_token[token]
        if interaction_id is not None:
            return self.state.interactions.get(interaction_id)
        return None

    def callback(self, interaction_id: int, token: str, body: dict[str, Any], uploads: Uploads) -> dict[str, Any]:
        st = self.state
        rec = st.interactions.get(interaction_id)
        if rec is None or rec.token != token:
            raise errors.unknown_interaction()
        now = st.clock.now()
        if rec.callbacks:
            raise errors.already_acknowledged()
        if rec.failed or now - rec.created_at > self.ack_deadline:
            if not rec.failed:
                rec.failed, rec.failed_at = True, now
            raise errors.unknown_interaction()
        ctype = body.get("type")
        data = body.get("data")
        if ctype not in _ALLOWED_CALLBACKS[rec.type] or (
                rec.type == MODAL_SUBMIT and ctype in (CB_DEFERRED_UPDATE, CB_UPDATE_MESSAGE)
                and rec.source_message is None):
            raise errors.invalid_form({"type": ("INTERACTION_RESPONSE_TYPE_INVALID",
                                                f"Invalid interaction response type {ctype} for interaction type {rec.type}")})
        if data is not None and not isinstance(data, dict):
            raise errors.invalid_form({"data": ("DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType")})
        data = data or {}
        if ctype in (CB_MESSAGE, CB_UPDATE_MESSAGE):
            self._check_app_permissions(rec, data, uploads)
        if rec.forced_ephemeral and ctype in (CB_MESSAGE, CB_DEFERRED_MESSAGE):
            data = dict(data, flags=int(data.get("flags") or 0) | FLAG_EPHEMERAL)
        resource: dict[str, Any] | None = None
        message: Message | None = None
        cb = Callback(type=ctype, data=body.get("data") or {}, at=now)
        before = {a.id for a in rec.source_message.attachments} if ctype == CB_UPDATE_MESSAGE and rec.source_message else set()
        if ctype == CB_MESSAGE:
            message = self._response_message(rec, data, uploads)
            st.post_message(message)
            rec.original = message
            st.emit_message("MESSAGE_CREATE", message)
        elif ctype == CB_DEFERRED_MESSAGE:
            flags = FLAG_LOADING | (int(data.get("flags") or 0) & FLAG_EPHEMERAL)
            message = st.make_message(rec.channel, st.bot_user, flags=flags, type=self._msg_type(rec),
                                      interaction=rec, webhook_id=st.application_id,
                                      application_id=st.application_id)
            st.post_message(message)
            rec.original = message
            st.emit_message("MESSAGE_CREATE", message)
        elif ctype == CB_DEFERRED_UPDATE:
            rec.original = rec.source_message
        elif ctype == CB_UPDATE_MESSAGE:
            target = rec.source_message
            assert target is not None
            if target.deleted:
                raise errors.unknown_message()
            st.apply_body(target, data, uploads, creating=False)
            rec.original = message = target
            st.emit_message("MESSAGE_UPDATE", target)
        elif ctype == CB_MODAL:
            check_modal(data)
            rec.modal = dict(data, components=number_components(list(data["components"])))
        elif ctype == CB_AUTOCOMPLETE:
            choices = data.get("choices") or []
            if len(choices) > 25:
                raise errors.invalid_form({"data.choices": ("BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")})
        if message is not None:
            cb.files = [a for a in message.attachments if a.id not in before]
        rec.callbacks.append(cb)
        st.changed()
        meta: dict[str, Any] = {"id": str(rec.id), "type": rec.type}
        if message is not None and ctype in (CB_MESSAGE, CB_DEFERRED_MESSAGE, CB_UPDATE_MESSAGE):
            meta["response_message_id"] = str(message.id)
            meta["response_message_loading"] = message.loading
            meta["response_message_ephemeral"] = message.ephemeral
            resource = {"type": ctype, "message": message.payload()}
        out: dict[str, Any] = {"interaction": meta}
        if resource is not None:
            out["resource"] = resource
        return out

    @staticmethod
    def _check_app_permissions(rec: InteractionRecord, body: dict[str, Any], uploads: Uploads) -> None:
        """Files need Attach Files and embeds Embed Links in the interaction's ``app_permissions``."""
        have = int(rec.payload.get("app_permissions") or 0)
        if uploads and not have & perms.ATTACH_FILES:
            raise errors.missing_permissions()
        if body.get("embeds") and not have & perms.EMBED_LINKS:
            raise errors.missing_permissions()

    @staticmethod
    def _msg_type(rec: InteractionRecord) -> int:
        if rec.type == APPLICATION_COMMAND:
            return MSG_CHAT_INPUT_COMMAND if rec.payload["data"].get("type", 1) == 1 else MSG_CONTEXT_MENU_COMMAND
        return MSG_DEFAULT

    def _response_message(self, rec: InteractionRecord, data: dict[str, Any], uploads: Uploads) -> Message:
        st = self.state
        flags = int(data.get("flags") or 0)
        if flags & ~_CREATE_FLAGS:
            raise errors.invalid_form({"data.flags": ("MESSAGE_FLAGS_INVALID", "Invalid message flags")})
        msg = st.make_message(rec.channel, st.bot_user, type=self._msg_type(rec), interaction=rec,
                              webhook_id=st.application_id, application_id=st.application_id)
        st.apply_body(msg, data, uploads, creating=True)
        return msg

    # -- bot side: webhook endpoints (follow-ups, @original) --------------------------------

    def _webhook_rec(self, app_id: int, token: str) -> InteractionRecord:
        rec = self.state.interactions_by_token.get(token)
        if rec is None or app_id != self.state.application_id:
            raise errors.invalid_webhook_token() if rec is None else errors.unknown_webhook()
        if self._expired(rec):
            raise errors.invalid_webhook_token()
        if not rec.callbacks:
            raise errors.unknown_webhook()
        return rec

    def _target(self, rec: InteractionRecord, message_id: str) -> Message:
        if message_id == "@original":
            msg = rec.original
        else:
            try:
                mid = int(message_id)
            except ValueError:
                raise errors.unknown_message() from None
            msg = next((m for m in rec.messages if m.id == mid), None)
        if msg is None or msg.deleted:
            raise errors.unknown_message()
        return msg

    def followup(self, app_id: int, token: str, body: dict[str, Any], uploads: Uploads) -> Message:
        st = self.state
        rec = self._webhook_rec(app_id, token)
        if rec.response_type == CB_AUTOCOMPLETE:
            raise errors.unknown_webhook()
        original = rec.original
        if (rec.response_type == CB_DEFERRED_MESSAGE and original is not None and original.loading
                and not original.deleted):
            # Discord turns the first follow-up after a "thinking" defer into the original response.
            self._check_app_permissions(rec, body, uploads)
            st.apply_body(original, body, uploads, creating=False, require_content=True)
            original.flags &= ~FLAG_LOADING
            st.emit_message("MESSAGE_UPDATE", original)
            return original
        flags = int(body.get("flags") or 0)
        if flags & ~_CREATE_FLAGS:
            raise errors.invalid_form({"flags": ("MESSAGE_FLAGS_INVALID", "Invalid message flags")})
        self._check_app_permissions(rec, body, uploads)
        if rec.forced_ephemeral:
            body = dict(body, flags=flags | FLAG_EPHEMERAL)
        msg = st.make_message(rec.channel, st.bot_user, type=MSG_DEFAULT, interaction=rec,
                              webhook_id=st.application_id, application_id=st.application_id)
        st.apply_body(msg, body, uploads, creating=True)
        st.post_message(msg)
        rec.followups.append(msg)
        st.emit_message("MESSAGE_CREATE", msg)
        return msg

    def get_message(self, app_id: int, token: str, message_id: str) -> Message:
        return self._target(self._webhook_rec(app_id, token), message_id)

    def edit_message(self, app_id: int, token: str, message_id: str, body: dict[str, Any],
                     uploads: Uploads) -> Message:
        st = self.state
        rec = self._webhook_rec(app_id, token)
        msg = self._target(rec, message_id)
        self._check_app_permissions(rec, body, uploads)
        was_loading = msg.loading
        st.apply_body(msg, body, uploads, creating=False, require_content=was_loading)
        msg.flags &= ~FLAG_LOADING
        st.emit_message("MESSAGE_UPDATE", msg)
        return msg

    def delete_message(self, app_id: int, token: str, message_id: str) -> None:
        rec = self._webhook_rec(app_id, token)
        msg = self._target(rec, message_id)
        if msg is rec.original:
            rec.original_deleted = True
        self.state.delete_message(msg)

    def reject(self, rec: InteractionRecord | None, method: str, path: str, err: errors.ApiError) -> None:
        if rec is not None:
            rec.rejected.append(Rejection(method=method, path=path, status=err.status, code=err.code,
                                          message=err.message, at=self.state.clock.now()))
