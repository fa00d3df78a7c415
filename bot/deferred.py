"""After a public "thinking..." defer: failures reach only the user, and nothing public is left loading.

Discord turns the first follow-up after a thinking defer into the deferred message itself, ephemeral flag
or not, so an error sent as a plain follow-up is shown to everyone, and an error nobody catches leaves
the placeholder loading for good. So the placeholder goes first (deleted, or if that fails edited to a
neutral line) and the reason follows privately. A job does not depend on Discord telling us the
placeholder's id either: without it the job still runs and its result is posted in the channel.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sqlite3
from collections.abc import AsyncIterator

import discord

from mgie_engine.errors import MgieError

from . import i18n
from .admission import Ticket

log = logging.getLogger(__name__)

STORAGE_TROUBLE = i18n.text("errors.storage_trouble")  # English, for logs and tests
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES,
                             errno.EPERM})


def describe_failure(err: BaseException, locale: object = None) -> str:
    """What to tell the user about ``err``, in their ``locale``: our own messages (translated), anything
    else without details."""
    if isinstance(err, MgieError):
        return i18n.error_text(err, locale)
    if isinstance(err, sqlite3.Error) or (isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS):
        log.error("storage failed while starting a job: %s", err)
        return i18n.text("errors.storage_trouble", locale)
    log.error("starting a job failed", exc_info=err)
    return i18n.text("errors.unexpected", locale)


async def fail_after_defer(interaction: discord.Interaction, message: str) -> None:
    """Take the public thinking placeholder away, then tell the user ``message`` privately."""
    try:
        await interaction.delete_original_response()
    except discord.NotFound:
        pass  # already gone
    except discord.HTTPException as err:
        log.warning("could not delete the deferred response (%s); editing it instead", err)
        try:
            await interaction.edit_original_response(content=i18n.text("errors.not_started", interaction.locale), embed=None, view=None, attachments=[])
        except discord.HTTPException as edit_err:
            # Still loading: a follow-up would take its place and show the reason to everyone.
            log.warning("could not settle the deferred response either (%s); the user is not told", edit_err)
            return
    try:
        await interaction.followup.send(message, ephemeral=True)
    except discord.HTTPException as err:
        log.warning("could not tell the user privately: %s", err)


@contextlib.asynccontextmanager
async def failures_told_privately(interaction: discord.Interaction,
                                  ticket: Ticket | None = None) -> AsyncIterator[None]:
    """Wrap the work after a thinking defer: any exception ends in :func:`fail_after_defer`.

    ``ticket`` (the request's reserved place) is released first, so the user may retry at once.
    """
    try:
        yield
    except Exception as err:  # noqa: BLE001 - whatever it was, the user hears of it and nothing is left loading
        if ticket is not None:
            ticket.release()
        await fail_after_defer(interaction, describe_failure(err, interaction.locale))


async def tell_privately(interaction: discord.Interaction, message: str) -> None:
    """Answer ``message`` to the user alone, whether or not (and how) the interaction was answered yet.

    Not answered: an ephemeral response. After a public thinking defer: :func:`fail_after_defer` (a plain
    follow-up would replace the placeholder publicly). Otherwise: an ephemeral follow-up.
    """
    if not interaction.response.is_done():
        await interaction.response.send_message(message, ephemeral=True)
    elif interaction.response.type is discord.InteractionResponseType.deferred_channel_message:
        await fail_after_defer(interaction, message)
    else:
        await interaction.followup.send(message, ephemeral=True)


async def answer_failure(interaction: discord.Interaction, err: BaseException) -> None:
    """An error nothing else caught, answered privately whatever state the response is in."""
    try:
        await tell_privately(interaction, describe_failure(err, interaction.locale))
    except discord.HTTPException as http_err:
        log.warning("could not tell the user about an error: %s", http_err)


async def status_message_id(interaction: discord.Interaction) -> int | None:
    """The id of the deferred response, where the job will show its progress and result.

    Fetching it can fail; the job must not. Then the placeholder is edited instead (which returns the id
    as well), or at least removed, and the job posts its result in the channel (``None``).
    """
    try:
        return (await interaction.original_response()).id
    except discord.HTTPException as err:
        log.warning("could not fetch the deferred response (%s); editing it instead", err)
    try:
        return (await interaction.edit_original_response(content=i18n.text("render.queued", interaction.locale))).id
    except discord.HTTPException as err:
        log.warning("could not edit the deferred response (%s); the result goes to the channel", err)
    try:
        await interaction.delete_original_response()
    except discord.HTTPException as err:
        log.warning("could not remove the deferred response either: %s", err)
    return None
