"""Putting a job's status and result in front of its user, from the stored record alone.

Interaction jobs edit their deferred response through the interaction webhook while its token lives
(15 minutes); after that, and for reply-refines, the bot uses ordinary channel messages, replying to
the status message and mentioning the user so a late result is not missed. Working from the record
(not a live Interaction object) is what lets a job resumed after a restart still reach its user.
"""

from __future__ import annotations

import logging
import time

import discord

from . import i18n
from .storage import JobRecord, Store

log = logging.getLogger(__name__)

TOKEN_LIFETIME = 15 * 60
TOKEN_MARGIN = 30  # leave time for the request itself; Discord rejects a token at 15:00 sharp
NO_PINGS = discord.AllowedMentions.none()


def via_interaction(job: JobRecord) -> bool:
    """Whether the job's status message is an interaction response (its token may be expired and deleted)."""
    return bool(job.interaction_token or job.application_id)


def token_alive(job: JobRecord, now: float | None = None) -> bool:
    """Whether the job's interaction token can still edit its response (15 minutes, with a margin)."""
    if not job.interaction_token or not job.application_id or not job.token_created_at:
        return False
    return (now or time.time()) - job.token_created_at < TOKEN_LIFETIME - TOKEN_MARGIN


class Delivery:
    def __init__(self, bot: discord.Client, store: Store) -> None:
        self.bot, self.store = bot, store

    def _webhook(self, job: JobRecord) -> discord.Webhook:
        return discord.Webhook.partial(job.application_id, job.interaction_token, client=self.bot)

    async def show(self, job: JobRecord, content: str, *, embed: discord.Embed | None = None,
                   file: discord.File | None = None, view: discord.ui.View | None = None,
                   ping: bool = False, keep_attachments: bool = False) -> JobRecord:
        """Replace what the job's status message says; returns the record (its message ids may change).

        ``ping`` marks a final word (result or failure). An edit never notifies anyone, so when the live
        interaction response cannot carry it, it goes out as a new message that mentions the user.
        The message's attachments become ``file`` (none without one), unless ``keep_attachments`` and no
        ``file``: a progress edit leaves the live preview already shown in place rather than upload it again.
        """
        kwargs = {"content": content, "embed": embed, "view": view}
        if file is not None or not keep_attachments:
            kwargs["attachments"] = [file] if file else []
        try:
            if token_alive(job) and job.status_message_id:
                await self._webhook(job).edit_message(job.status_message_id, allowed_mentions=NO_PINGS, **kwargs)
                return job
            if not ping and not via_interaction(job) and job.status_message_id:
                channel = self.bot.get_partial_messageable(job.channel_id)
                message = channel.get_partial_message(job.status_message_id)
                await message.edit(allowed_mentions=NO_PINGS, **kwargs)
                return job
            if not ping and via_interaction(job):
                return job  # the response can no longer be edited; progress is not worth a new message
        except discord.NotFound:
            log.info("status message of job %s is gone; posting a new one", job.id)
        except discord.HTTPException as err:
            if err.status not in (401, 404) and getattr(err, "code", 0) not in (50027, 10015):
                raise
            log.info("interaction token of job %s no longer works (%s); using the channel", job.id, err.code)
            job = await self.store.update_job(job.id, token_created_at=0.0)  # dead: never try it again
            if not ping:
                return job
        old_status = job.status_message_id if not via_interaction(job) else None
        job = await self._post_in_channel(job, content, embed=embed, file=file, view=view, ping=ping)
        if old_status:  # the new message replaces the old status line; don't leave both
            try:
                await self.bot.get_partial_messageable(job.channel_id).get_partial_message(old_status).delete()
            except discord.HTTPException:
                pass
        return job

    async def _post_in_channel(self, job: JobRecord, content: str, *, embed, file, view, ping: bool) -> JobRecord:
        """A new channel message replying to the old status message, mentioning the user when it matters."""
        channel = self.bot.get_partial_messageable(job.channel_id)
        reference = None
        target = job.reply_to_message_id or job.status_message_id
        if target:
            reference = discord.MessageReference(message_id=target,
                                                 channel_id=job.channel_id, fail_if_not_exists=False)
        mention = f"<@{job.user_id}> " if ping else ""
        allowed = discord.AllowedMentions(users=[discord.Object(job.user_id)], everyone=False, roles=False,
                                          replied_user=False) if ping else NO_PINGS
        kwargs = {"content": mention + content, "embed": embed, "allowed_mentions": allowed, "reference": reference}
        if file:
            kwargs["file"] = file
        if view:
            kwargs["view"] = view
        try:
            message = await channel.send(**kwargs)
        except discord.Forbidden as err:
            if not (file or embed):
                log.warning("job %s: no permission to post in channel %s (%s)", job.id, job.channel_id, err.code)
                raise
            # Missing Attach Files / Embed Links: say so in plain text, so the user is not left waiting.
            log.warning("job %s: cannot attach files or embeds in channel %s (%s)", job.id, job.channel_id, err.code)
            kwargs.pop("file", None)
            kwargs.pop("view", None)
            kwargs.update(embed=None, content=mention + content + "\n" + i18n.text("errors.missing_permissions", job.locale))
            message = await channel.send(**kwargs)
            await self.store.update_job(job.id, error="could not post the image: missing Attach Files / Embed Links")
        return await self.store.update_job(job.id, status_message_id=message.id, interaction_token=None,
                                           application_id=None)
