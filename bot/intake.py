"""Checks every request passes before it becomes a job: where, who, how many, and the image itself.

Each refusal is a :class:`Refusal` whose message is shown to the user (ephemerally) as is.
"""

from __future__ import annotations

import asyncio

import discord
import PIL.Image

from mgie_engine.errors import MgieError
from mgie_engine.images import MAX_INPUT_BYTES, load_image

from .downloads import allowed_hosts, check_attachment_meta, download
from .storage import GuildSettings


class Refusal(MgieError):
    """A request we will not take; the message says why and what to do instead."""


def first_image(attachments: list[discord.Attachment]) -> discord.Attachment | None:
    for attachment in attachments:
        ctype = (attachment.content_type or "").lower()
        if ctype.startswith("image/") or attachment.filename.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".gif")):
            return attachment
    return None


async def fetch_image(bot, attachment: discord.Attachment) -> tuple[bytes, PIL.Image.Image]:
    """Download (Discord's CDN only, capped) and decode (in a thread: big images take a while)."""
    check_attachment_meta(attachment.filename, attachment.content_type, attachment.size, MAX_INPUT_BYTES)
    data = await download(bot.http_session, attachment.url, allowed_hosts(bot.config.api_base),
                          MAX_INPUT_BYTES)
    image = await asyncio.to_thread(load_image, data)
    return data, image


async def check_access(bot, user: discord.abc.User, guild_id: int | None, channel_id: int,
                       settings: GuildSettings) -> None:
    if settings.allowed_channel_ids and channel_id not in settings.allowed_channel_ids:
        mentions = ", ".join(f"<#{c}>" for c in settings.allowed_channel_ids[:5])
        raise Refusal(f"Edits are not enabled in this channel; try {mentions}.")
    pending = bot.queue.pending_for(user.id)
    if pending >= settings.user_pending_cap:
        raise Refusal(f"You already have {pending} edit(s) waiting; the limit here is {settings.user_pending_cap}. "
                      "Wait for one to finish or cancel one.")
