"""New jobs from what users do: an /edit, and the jobs made from a result (re-roll, stronger, closer, refine).

Every path runs the same steps: cheap checks, then :func:`~bot.intake.check_access` (which reserves the
request's place in a :class:`~bot.admission.Ticket`), an answer within Discord's 3 seconds (a public
"thinking" defer, or a "Queued" reply to a reply), the job's record, and :meth:`JobManager.submit`.
Cogs only read what Discord sent and call the ``start_*`` functions here.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import discord

from mgie_engine.errors import MgieError
from mgie_engine.instructions import normalize_instruction
from mgie_engine.options import DEFAULT_STEPS, IMAGE_CFG_RANGE, TEXT_CFG_RANGE, check_options

from . import i18n, presets
from .admission import Ticket
from .deferred import describe_failure, failures_told_privately, status_message_id, tell_privately
from .intake import Refusal, check_access, fetch_image
from .quiet_refusals import refuse_reply
from .storage import JobRecord

if TYPE_CHECKING:
    from .bot import MgieBot

log = logging.getLogger(__name__)

STRONGER_STEP = 1.0  # text CFG added by "Stronger edit"
CLOSER_STEP = 0.5  # image CFG added by "Closer to original"
VARIANT_KINDS = ("reroll", "stronger", "closer")


def new_seed() -> int:
    """A random seed for a job that asked for none (always shown with its result)."""
    return secrets.randbelow(2**32)


@dataclasses.dataclass(frozen=True)
class Origin:
    """Who asked for a job, where, and how its status and result reach them (all stored in its record)."""

    user_id: int
    channel_id: int
    guild_id: int | None
    application_id: int | None = None
    interaction_token: str | None = None
    token_created_at: float | None = None
    status_message_id: int | None = None
    reply_to_message_id: int | None = None
    locale: str | None = None  # the requester's Discord locale (their job's messages are in its language)


async def interaction_origin(interaction: discord.Interaction) -> Origin:
    """The origin of a job asked for by a deferred interaction: its webhook token and the placeholder's id."""
    return Origin(user_id=interaction.user.id, channel_id=interaction.channel_id, guild_id=interaction.guild_id,
                  application_id=interaction.application_id, interaction_token=interaction.token,
                  token_created_at=interaction.created_at.timestamp(),
                  status_message_id=await status_message_id(interaction),
                  locale=i18n.locale_value(interaction.locale))


def new_job_record(origin: Origin, **fields) -> JobRecord:
    """A record for a new job with a fresh id; ``fields`` are the job's own (instruction, seed, CFG, ...)."""
    return JobRecord(id=uuid.uuid4().hex, **dataclasses.asdict(origin), **fields)


def upload_limit(interaction: discord.Interaction) -> int | None:
    """The largest file the result may be in this channel (Discord reports it with the interaction)."""
    return getattr(interaction, "filesize_limit", None) or None


async def submit_after_defer(bot: MgieBot, interaction: discord.Interaction, ticket: Ticket,
                             build: Callable[[], Awaitable[tuple[JobRecord, bytes | None]]]) -> None:
    """Defer publicly ("thinking"), then ``build`` the job (record, new input image or None) and submit it.

    Any failure after the defer reaches only the user and leaves nothing loading; the ticket is given
    back unless the job was queued.
    """
    try:
        await interaction.response.defer(thinking=True)
        async with failures_told_privately(interaction, ticket):
            record, image = await build()
            await bot.jobs.submit(record, image, upload_limit=upload_limit(interaction), ticket=ticket)
    finally:
        ticket.release()


# -- /edit and the message command -------------------------------------------------------------------


async def start_edit(bot: MgieBot, interaction: discord.Interaction, attachment: discord.Attachment,
                     instruction: str, *, text_cfg: float | None = None, image_cfg: float | None = None,
                     seed: int | None = None, steps: int | None = None, preset: str = "auto") -> None:
    """Validate cheaply, answer within Discord's 3 seconds (defer), then fetch, decode and queue."""
    settings = await bot.store.guild_settings(interaction.guild_id)
    try:
        instruction = normalize_instruction(instruction)
        steps = steps if steps is not None else min(DEFAULT_STEPS, settings.max_steps)
        if steps > settings.max_steps:
            raise Refusal("errors.max_steps", max_steps=settings.max_steps)
        seed = new_seed() if seed is None else seed
        check_options(text_cfg if text_cfg is not None else 7.5, image_cfg if image_cfg is not None else 1.5,
                      steps, seed)
        if preset not in presets.PRESET_CHOICES:
            raise Refusal("errors.unknown_preset", preset=repr(preset), choices=", ".join(presets.PRESET_CHOICES))
        ticket = await check_access(bot, interaction.user, interaction.guild_id, interaction.channel_id,
                                    settings, instruction=instruction, app_permissions=interaction.app_permissions)
    except MgieError as err:
        await interaction.response.send_message(i18n.error_text(err, interaction.locale), ephemeral=True)
        return

    async def build() -> tuple[JobRecord, bytes]:
        # Decoded once, off the event loop; 'auto' looks at the picture in the same worker thread.
        data, guidance = await fetch_image(bot, attachment, lambda picture: presets.choose_guidance(
            preset, picture, instruction, text_cfg, image_cfg))
        record = new_job_record(
            await interaction_origin(interaction), instruction=instruction, seed=seed,
            text_cfg=guidance.text_cfg, image_cfg=guidance.image_cfg, steps=steps, preset=guidance.preset,
            preset_reason=i18n.stored(guidance.reason_message) if guidance.reason_message else guidance.reason,
            kind="edit")
        return record, data

    await submit_after_defer(bot, interaction, ticket, build)


# -- re-roll, stronger, closer -----------------------------------------------------------------------


def variant_settings(source: JobRecord, kind: str) -> tuple[dict, str]:
    """The seed and guidance of a ``kind`` variant of ``source`` and why, for the result's "why" field.

    Raises Refusal when the guidance to raise is already at its maximum.
    """
    fields = {"seed": source.seed, "text_cfg": source.text_cfg, "image_cfg": source.image_cfg}
    if kind == "reroll":
        fields["seed"] = new_seed()
        return fields, i18n.stored(i18n.message("render.reason_reroll"))
    if kind == "stronger":
        if source.text_cfg >= TEXT_CFG_RANGE[1]:
            raise Refusal("errors.text_cfg_at_max", maximum=f"{TEXT_CFG_RANGE[1]:g}")
        fields["text_cfg"] = min(source.text_cfg + STRONGER_STEP, TEXT_CFG_RANGE[1])
        return fields, i18n.stored(i18n.message("render.reason_stronger", before=f"{source.text_cfg:g}",
                                                       after=f"{fields['text_cfg']:g}"))
    if kind == "closer":
        if source.image_cfg >= IMAGE_CFG_RANGE[1]:
            raise Refusal("errors.image_cfg_at_max", maximum=f"{IMAGE_CFG_RANGE[1]:g}")
        image_cfg = max(source.image_cfg + CLOSER_STEP, 1.0)  # below 1 diffusers ignores the image entirely
        fields["image_cfg"] = min(image_cfg, IMAGE_CFG_RANGE[1])
        return fields, i18n.stored(i18n.message("render.reason_closer", before=f"{source.image_cfg:g}",
                                                       after=f"{fields['image_cfg']:g}"))
    raise ValueError(f"unknown variant {kind!r}; expected one of {', '.join(VARIANT_KINDS)}")


async def start_variant(bot: MgieBot, interaction: discord.Interaction, source: JobRecord, kind: str) -> None:
    """Same input, instruction and earlier turns as ``source``; a new seed or CFG. The LLM output is cached.

    Refusals raise (the caller answers them privately).
    """
    fields, reason = variant_settings(source, kind)
    settings = await bot.store.guild_settings(interaction.guild_id)
    if await bot.store.read_image(source.input_image) is None:
        raise Refusal("errors.original_gone")
    ticket = await check_access(bot, interaction.user, interaction.guild_id, interaction.channel_id,
                                settings, instruction=source.instruction, app_permissions=interaction.app_permissions)

    async def build() -> tuple[JobRecord, None]:
        record = new_job_record(
            await interaction_origin(interaction), instruction=source.instruction,
            steps=min(source.steps, settings.max_steps), preset="custom", preset_reason=reason, kind=kind,
            parent_id=source.parent_id, input_image=source.input_image, history_depth=source.history_depth,
            **fields)
        return record, None

    await submit_after_defer(bot, interaction, ticket, build)


# -- refine: a follow-up instruction on a result -----------------------------------------------------


async def reply_locales(bot: MgieBot, user_id: int, reply_to: discord.Message,
                        source: JobRecord) -> tuple[str | None, str | None]:
    """(the language of a reply-refine's job, that of its public refusal notice), from what is stored.

    A plain message carries no locale. The job's is the user's own, as their latest job stored it (else the
    source job's when it is theirs, else the server's); the public notice's is the server's (the user's in
    a DM).
    """
    guild_locale = i18n.locale_value(reply_to.guild.preferred_locale) if reply_to.guild is not None else None
    latest = await bot.store.recent_jobs(user_id, limit=1)
    user_locale = (latest[0].locale if latest and latest[0].locale
                   else source.locale if source.user_id == user_id else None) or guild_locale
    return user_locale, guild_locale or user_locale


async def start_refine(bot: MgieBot, source: JobRecord, text: str, user: discord.abc.User, guild_id: int | None,
                       channel_id: int, *, interaction: discord.Interaction | None = None,
                       reply_to: discord.Message | None = None) -> None:
    """Edit the result of ``source`` with a follow-up instruction; earlier turns go into the prompt.

    Asked either through the Refine button's modal (``interaction``) or by replying to a result
    (``reply_to``), whose refusals are public and so kept quiet (see :mod:`bot.quiet_refusals`).
    """
    # The job's messages are in the requester's language; a refused reply's notice is public, so in the
    # server's (see reply_locales).
    job_locale, refusal_locale = ((i18n.locale_value(interaction.locale),) * 2 if interaction is not None
                                  else await reply_locales(bot, user.id, reply_to, source))

    async def refuse(err: BaseException) -> None:
        message = describe_failure(err, refusal_locale)
        if interaction is not None:
            await tell_privately(interaction, message)
        elif reply_to is not None:
            await refuse_reply(bot, reply_to, message, locale=refusal_locale)  # public: a reaction, a notice

    settings = await bot.store.guild_settings(guild_id)
    try:
        instruction = normalize_instruction(text)
        if not source.output_image or await bot.store.read_image(source.output_image) is None:
            raise Refusal("errors.refine_image_gone")
        ticket = await check_access(bot, user, guild_id, channel_id, settings, instruction=instruction,
                                    app_permissions=interaction.app_permissions if interaction is not None else None)
    except MgieError as err:
        await refuse(err)
        return

    async def refine_record(origin: Origin) -> JobRecord:
        chain = await bot.store.chain(source.id, limit=settings.refine_depth)
        return new_job_record(
            origin, instruction=instruction, seed=source.seed, text_cfg=source.text_cfg,
            image_cfg=source.image_cfg, steps=min(source.steps, settings.max_steps), preset="custom",
            preset_reason=i18n.stored(i18n.message("render.reason_refine", turns=len(chain))),
            kind="refine", parent_id=source.id, input_image=source.output_image,
            history_depth=min(len(chain), settings.refine_depth))

    if interaction is not None:
        async def build() -> tuple[JobRecord, None]:
            origin = await interaction_origin(interaction)
            return await refine_record(dataclasses.replace(origin, user_id=user.id, channel_id=channel_id,
                                                           guild_id=guild_id)), None

        await submit_after_defer(bot, interaction, ticket, build)
        return
    try:  # the ticket holds this request's place from the check on; it is given back unless queued
        status = None
        try:
            status = await reply_to.reply(i18n.text("render.queued", job_locale), mention_author=False,
                                          allowed_mentions=discord.AllowedMentions.none())
            record = await refine_record(Origin(user_id=user.id, channel_id=channel_id, guild_id=guild_id,
                                                reply_to_message_id=reply_to.id, status_message_id=status.id,
                                                locale=job_locale))
            await bot.jobs.submit(record, None, ticket=ticket)
        except Exception as err:  # noqa: BLE001 - the "Queued" line must not stay; the user hears why
            ticket.release()  # before telling them, so they may retry at once
            if status is not None:
                try:
                    await status.delete()
                except discord.HTTPException:
                    log.warning("could not remove the status line of a failed refine")
            try:
                await refuse(err)
            except discord.HTTPException as http_err:
                log.warning("could not tell %s that their refine failed: %s", user.id, http_err)
    finally:
        ticket.release()
