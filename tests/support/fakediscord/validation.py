"""Discord's request-body limits, so a bot that would be rejected live is rejected here too.

Covers the limits an image bot realistically hits (content/embeds/components/modals/commands);
it is not a full copy of Discord's validator.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from . import errors
from .models import FLAG_COMPONENTS_V2

MAX_CONTENT = 2000
MAX_EMBEDS = 10
MAX_EMBED_TOTAL = 6000
MAX_FILES = 10

_COMMAND_NAME = re.compile(r"^[-_'\w]{1,32}$", re.UNICODE)
# Discord's locales (https://discord.com/developers/docs/reference#locales): the keys localizations may use.
LOCALES = frozenset({"id", "da", "de", "en-GB", "en-US", "es-ES", "es-419", "fr", "hr", "it", "lt", "hu", "nl", "no",
                     "pl", "pt-BR", "ro", "fi", "sv-SE", "vi", "tr", "cs", "el", "bg", "ru", "uk", "hi", "th",
                     "zh-CN", "ja", "zh-TW", "ko"})

# Components allowed at top level of a message without / with the Components V2 flag.
_V1_TOP = {1}
_V2_TOP = {1, 9, 10, 12, 13, 14, 17}
_SELECTS = {3, 5, 6, 7, 8}


class _Errors:
    def __init__(self) -> None:
        self.items: dict[str, tuple[str, str]] = {}

    def add(self, path: str, code: str, message: str) -> None:
        self.items.setdefault(path, (code, message))

    def max_len(self, path: str, value: Any, limit: int) -> None:
        if isinstance(value, str) and len(value) > limit:
            self.add(path, "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length.")

    def required(self, path: str) -> None:
        self.add(path, "BASE_TYPE_REQUIRED", "This field is required")

    def raise_if_any(self) -> None:
        if self.items:
            raise errors.invalid_form(self.items)


def _embed_length(embed: dict[str, Any]) -> int:
    total = len(embed.get("title") or "") + len(embed.get("description") or "")
    total += len((embed.get("footer") or {}).get("text") or "")
    total += len((embed.get("author") or {}).get("name") or "")
    for f in embed.get("fields") or []:
        total += len(f.get("name") or "") + len(f.get("value") or "")
    return total


def _check_embeds(errs: _Errors, embeds: list[dict[str, Any]]) -> None:
    if len(embeds) > MAX_EMBEDS:
        errs.add("embeds", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_EMBEDS} or fewer in length.")
        return
    total = 0
    for i, embed in enumerate(embeds):
        p = f"embeds.{i}"
        errs.max_len(f"{p}.title", embed.get("title"), 256)
        errs.max_len(f"{p}.description", embed.get("description"), 4096)
        errs.max_len(f"{p}.footer.text", (embed.get("footer") or {}).get("text"), 2048)
        errs.max_len(f"{p}.author.name", (embed.get("author") or {}).get("name"), 256)
        fields = embed.get("fields") or []
        if len(fields) > 25:
            errs.add(f"{p}.fields", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        for j, f in enumerate(fields):
            if not f.get("name"):
                errs.required(f"{p}.fields.{j}.name")
            if not f.get("value"):
                errs.required(f"{p}.fields.{j}.value")
            errs.max_len(f"{p}.fields.{j}.name", f.get("name"), 256)
            errs.max_len(f"{p}.fields.{j}.value", f.get("value"), 1024)
        for key in ("image", "thumbnail"):
            url = (embed.get(key) or {}).get("url")
            if url is not None and not re.match(r"^(https?|attachment)://", str(url)):
                errs.add(f"{p}.{key}.url", "URL_TYPE_INVALID_PROTOCOL", "Scheme must be one of ('http', 'https').")
        total += _embed_length(embed)
    if total > MAX_EMBED_TOTAL:
        errs.add("embeds", "MESSAGE_EMBEDS_TOO_LARGE", "Embed size exceeds maximum size of 6000")


def _walk(components: list[dict[str, Any]], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for i, comp in enumerate(components):
        p = f"{path}.{i}"
        yield p, comp
        if isinstance(comp.get("components"), list):
            yield from _walk(comp["components"], f"{p}.components")
        if isinstance(comp.get("component"), dict):
            yield f"{p}.component", comp["component"]
        if isinstance(comp.get("accessory"), dict):
            yield f"{p}.accessory", comp["accessory"]


def _check_button(errs: _Errors, p: str, comp: dict[str, Any]) -> None:
    style = comp.get("style")
    if style not in (1, 2, 3, 4, 5, 6):
        errs.add(f"{p}.style", "BASE_TYPE_CHOICES", "Value must be one of {1, 2, 3, 4, 5, 6}.")
    errs.max_len(f"{p}.label", comp.get("label"), 80)
    if style == 5:
        if not comp.get("url"):
            errs.add(f"{p}.url", "BUTTON_COMPONENT_URL_REQUIRED", "A url is required")
        if comp.get("custom_id"):
            errs.add(f"{p}.custom_id", "BUTTON_COMPONENT_CUSTOM_ID_INVALID", "A custom id cannot be set on url buttons")
    elif style in (1, 2, 3, 4) and not comp.get("custom_id"):
        errs.add(f"{p}.custom_id", "BUTTON_COMPONENT_CUSTOM_ID_REQUIRED", "A custom id is required")
    if not comp.get("label") and not comp.get("emoji") and style != 6:
        errs.add(p, "BUTTON_COMPONENT_INVALID", "A label or emoji is required")


def check_components(components: Any, *, v2: bool, path: str = "components") -> None:
    """Validate a message's component tree (rows of <=5 buttons or one select, unique ids)."""
    errs = _Errors()
    if components is None:
        return
    if not isinstance(components, list):
        errs.add(path, "BASE_TYPE_ARRAY", "Must be an array.")
        errs.raise_if_any()
    top = _V2_TOP if v2 else _V1_TOP
    if not v2 and len(components) > 5:
        errs.add(path, "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
    seen: set[str] = set()
    for i, comp in enumerate(components):
        if comp.get("type") not in top:
            errs.add(f"{path}.{i}.type", "UNION_TYPE_CHOICES", f"Value of field \"type\" must be one of ({', '.join(map(str, sorted(top)))}).")
    for p, comp in _walk(components, path):
        ctype = comp.get("type")
        cid = comp.get("custom_id")
        if cid is not None:
            errs.max_len(f"{p}.custom_id", cid, 100)
            if cid in seen:
                errs.add(f"{p}.custom_id", "COMPONENT_CUSTOM_ID_DUPLICATED", "Component custom id cannot be duplicated")
            seen.add(cid)
        if ctype == 1:
            children = comp.get("components") or []
            if not children:
                errs.add(f"{p}.components", "BASE_TYPE_MIN_LENGTH", "Must be 1 or more in length.")
            kinds = {c.get("type") for c in children}
            if kinds & _SELECTS and len(children) > 1:
                errs.add(f"{p}.components", "COMPONENT_LAYOUT_WIDTH_EXCEEDED", "The specified component exceeds the maximum width")
            if len(children) > 5:
                errs.add(f"{p}.components", "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
            if 4 in kinds:
                errs.add(f"{p}.components", "COMPONENT_TYPE_INVALID", "Text inputs are only allowed in modals")
        elif ctype == 2:
            _check_button(errs, p, comp)
        elif ctype in _SELECTS:
            if not cid:
                errs.required(f"{p}.custom_id")
            errs.max_len(f"{p}.placeholder", comp.get("placeholder"), 150)
            if ctype == 3:
                options = comp.get("options") or []
                if not 1 <= len(options) <= 25:
                    errs.add(f"{p}.options", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 25 in length.")
        elif ctype == 10:
            errs.max_len(f"{p}.content", comp.get("content"), 4000)
    errs.raise_if_any()


def check_message(payload: dict[str, Any], *, creating: bool, attachment_count: int, has_existing: bool = False) -> None:
    """Validate a create/edit message body the way Discord does (50035 / 50006)."""
    errs = _Errors()
    content = payload.get("content")
    if content is not None and not isinstance(content, str):
        errs.add("content", "BASE_TYPE_STRING", "Must be a string.")
    errs.max_len("content", content, MAX_CONTENT)
    embeds = payload.get("embeds")
    if embeds is not None:
        _check_embeds(errs, embeds)
    nonce = payload.get("nonce")
    if isinstance(nonce, str):
        errs.max_len("nonce", nonce, 25)
    if attachment_count > MAX_FILES:
        errs.add("attachments", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_FILES} or fewer in length.")
    flags = int(payload.get("flags") or 0)
    v2 = bool(flags & FLAG_COMPONENTS_V2)
    if v2 and (content or embeds):
        errs.add("content", "MESSAGE_CANNOT_USE_LEGACY_FIELDS_WITH_COMPONENTS_V2",
                 "The 'content' and 'embeds' fields cannot be used when using MessageFlags.IS_COMPONENTS_V2")
    errs.raise_if_any()
    check_components(payload.get("components"), v2=v2)
    if creating and not has_existing:
        has_content = bool(content and content.strip())
        if not (has_content or embeds or attachment_count or payload.get("components")
                or payload.get("sticker_ids") or payload.get("poll")):
            raise errors.empty_message()


def check_modal(data: dict[str, Any] | None) -> None:
    """Validate a MODAL (type 9) callback's data: ActionRow- or Label-wrapped inputs."""
    errs = _Errors()
    if not isinstance(data, dict):
        errs.required("data")
        errs.raise_if_any()
        return
    if not data.get("custom_id"):
        errs.required("data.custom_id")
    errs.max_len("data.custom_id", data.get("custom_id"), 100)
    if not data.get("title"):
        errs.required("data.title")
    errs.max_len("data.title", data.get("title"), 45)
    comps = data.get("components") or []
    if not 1 <= len(comps) <= 5:
        errs.add("data.components", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length.")
    seen: set[str] = set()
    for i, row in enumerate(comps):
        p = f"data.components.{i}"
        if row.get("type") == 1:
            inner = row.get("components") or []
            if len(inner) != 1 or inner[0].get("type") not in (4, *_SELECTS):
                errs.add(f"{p}.components", "COMPONENT_LAYOUT_WIDTH_EXCEEDED", "The specified component exceeds the maximum width")
                continue
            field = inner[0]
            fp = f"{p}.components.0"
            if field.get("type") == 4:
                if not field.get("label"):
                    errs.required(f"{fp}.label")
                errs.max_len(f"{fp}.label", field.get("label"), 45)
        elif row.get("type") == 18:
            if not row.get("label"):
                errs.required(f"{p}.label")
            errs.max_len(f"{p}.label", row.get("label"), 45)
            errs.max_len(f"{p}.description", row.get("description"), 100)
            field = row.get("component") or {}
            fp = f"{p}.component"
            if field.get("type") not in (4, 19, 21, 22, 23, *_SELECTS):
                errs.add(f"{fp}.type", "COMPONENT_TYPE_INVALID", "Invalid component type for a label")
        elif row.get("type") == 10:
            continue
        else:
            errs.add(f"{p}.type", "UNION_TYPE_CHOICES", "Value of field \"type\" must be one of (1, 10, 18).")
            continue
        cid = field.get("custom_id")
        if not cid:
            errs.required(f"{fp}.custom_id")
        elif cid in seen:
            errs.add(f"{fp}.custom_id", "COMPONENT_CUSTOM_ID_DUPLICATED", "Component custom id cannot be duplicated")
        else:
            seen.add(cid)
        if field.get("type") == 4:
            if field.get("style") not in (1, 2):
                errs.add(f"{fp}.style", "BASE_TYPE_CHOICES", "Value must be one of {1, 2}.")
            errs.max_len(f"{fp}.placeholder", field.get("placeholder"), 100)
            errs.max_len(f"{fp}.value", field.get("value"), 4000)
            for key in ("min_length", "max_length"):
                v = field.get(key)
                if v is not None and not 0 <= int(v) <= 4000:
                    errs.add(f"{fp}.{key}", "NUMBER_TYPE_MAX", "int value should be <= 4000.")
    errs.raise_if_any()


def check_command(cmd: dict[str, Any], path: str = "") -> None:
    """Validate one application command (name rules, description, option order and limits)."""
    errs = _Errors()
    prefix = f"{path}." if path else ""
    ctype = cmd.get("type", 1)
    name = cmd.get("name")
    if not isinstance(name, str) or not name:
        errs.required(f"{prefix}name")
        errs.raise_if_any()
    assert isinstance(name, str)
    if ctype == 1:
        if not _COMMAND_NAME.match(name) or name != name.lower():
            errs.add(f"{prefix}name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
        desc = cmd.get("description")
        if not desc:
            errs.add(f"{prefix}description", "BASE_TYPE_REQUIRED", "This field is required")
        errs.max_len(f"{prefix}description", desc, 100)
    else:
        errs.max_len(f"{prefix}name", name, 32)
        if cmd.get("description"):
            errs.add(f"{prefix}description", "APPLICATION_COMMAND_DESCRIPTION_INVALID", "Context menu commands cannot have a description")

    def check_localizations(p: str, item: dict[str, Any], *, chat_name: bool, name_limit: int = 32) -> None:
        """name_localizations / description_localizations: known locales, and each value obeys the rules
        of the field it localizes (a chat-input name the name regex in lowercase, descriptions <= 100)."""
        for field, limit in (("name_localizations", name_limit), ("description_localizations", 100)):
            values = item.get(field) or {}
            if not isinstance(values, dict):
                errs.add(f"{p}{field}", "DICT_TYPE_CONVERT", "Only dictionaries may be used in a DictType")
                continue
            for locale, value in values.items():
                lp = f"{p}{field}.{locale}"
                if locale not in LOCALES:
                    errs.add(lp, "LOCALE_INVALID", f"Invalid locale: {locale!r}")
                if not isinstance(value, str) or not value:
                    errs.required(lp)
                    continue
                errs.max_len(lp, value, limit)
                if field == "name_localizations" and chat_name and (not _COMMAND_NAME.match(value)
                                                                   or value != value.lower()):
                    errs.add(lp, "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")

    check_localizations(prefix, cmd, chat_name=ctype == 1)

    def check_options(options: list[dict[str, Any]], p: str, depth: int) -> None:
        if len(options) > 25:
            errs.add(p, "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        names: set[str] = set()
        seen_optional = False
        for i, opt in enumerate(options):
            op = f"{p}.{i}"
            oname = opt.get("name", "")
            if not _COMMAND_NAME.match(oname) or oname != oname.lower():
                errs.add(f"{op}.name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
            if oname in names:
                errs.add(f"{op}.name", "APPLICATION_COMMAND_OPTIONS_NAME_ALREADY_EXISTS", "Option name already exists")
            names.add(oname)
            check_localizations(f"{op}.", opt, chat_name=True)
            for k, choice in enumerate(opt.get("choices") or []):
                check_localizations(f"{op}.choices.{k}.", choice, chat_name=False, name_limit=100)
            if not opt.get("description"):
                errs.required(f"{op}.description")
            errs.max_len(f"{op}.description", opt.get("description"), 100)
            otype = opt.get("type")
            if otype in (1, 2):
                if depth >= 2 or (otype == 2 and depth >= 1):
                    errs.add(f"{op}.type", "APPLICATION_COMMAND_OPTION_TYPE_INVALID", "Subcommand nesting too deep")
                check_options(opt.get("options") or [], f"{op}.options", depth + 1)
                continue
            if opt.get("required"):
                if seen_optional:
                    errs.add(f"{op}.required", "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                             "Required options must be placed before non-required options")
            else:
                seen_optional = True
            if len(opt.get("choices") or []) > 25:
                errs.add(f"{op}.choices", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")

    if ctype == 1:
        check_options(cmd.get("options") or [], f"{prefix}options", 0)
    errs.raise_if_any()
