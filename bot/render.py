"""What users read: status lines and result embeds, built from stored job records, in the language of the
job's requester (``JobRecord.locale``; see bot.i18n).

User text (instructions, model output) is escaped so it cannot inject markdown or mentions.
"""

from __future__ import annotations

import discord

from . import i18n
from .storage import JobRecord

COLOR_OK = discord.Color.from_rgb(88, 101, 242)
COLOR_FAIL = discord.Color.red()


def quote(text: str, limit: int = 300) -> str:
    """User text made safe to show: markdown and mentions escaped, cut to ``limit`` characters."""
    text = discord.utils.escape_mentions(discord.utils.escape_markdown(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def seconds(value: float | None, locale: object = None) -> str:
    """A duration for people: "12 s", "3.4 s", "?" when unknown (in the reader's number format)."""
    if value is None:
        return "?"
    return i18n.text("render.seconds", locale, value=f"{value:.0f}" if value >= 10 else _decimal(value, locale))


def _decimal(value: float, locale: object) -> str:
    """One decimal, with the reader's decimal separator (a comma in de, es, fr, pt-BR)."""
    return f"{value:.1f}".replace(".", i18n.text("render.decimal_separator", locale))


def queued(job: JobRecord, position: int | None, eta: float | None, warming: bool) -> str:
    """The status line of a waiting job: its place in the queue and about when it starts."""
    loc = job.locale
    head = i18n.text("render.queued_warming" if warming else "render.queued", loc)
    where = i18n.text("render.position", loc, position=position) if position else ""
    when = i18n.text("render.starts_in", loc, eta=seconds(eta, loc)) if eta and not warming else ""
    return f"{head}{where}{when}\n> {quote(job.instruction)}"


def working(job: JobRecord, stage: str, step: int, total: int, eta: float | None) -> str:
    """The status line of a running job: which stage, which step, about how long is left."""
    loc = job.locale
    if stage == "denoise":
        line = i18n.text("render.painting", loc, step=step, total=total)
        if eta:
            line += i18n.text("render.time_left", loc, eta=seconds(eta, loc))
    elif stage == "decode":
        line = i18n.text("render.finishing", loc)
    else:
        line = i18n.text("render.reading", loc)
    return f"{line}\n> {quote(job.instruction)}"


def failed(job: JobRecord, reason: str) -> str:
    """The final line of a job that failed, with the reason (already in the job's language)."""
    return f"{i18n.text('render.failed', job.locale, reason=quote(reason, 500))}\n> {quote(job.instruction)}"


def cancelled(job: JobRecord) -> str:
    """The final line of a cancelled job."""
    return f"{i18n.text('render.cancelled', job.locale)}\n> {quote(job.instruction)}"


def preset_reason(job: JobRecord) -> str:
    """Why the job has its CFG values, in its language (stored as a message, see bot.i18n.stored)."""
    return i18n.stored_text(job.preset_reason, job.locale)


def result_embed(job: JobRecord, filename: str, random_weights: bool = False) -> discord.Embed:
    """The embed under a result: instruction, expressive instruction, seed, guidance, steps, time, preset."""
    loc = job.locale

    def t(key: str, **params: object) -> str:
        return i18n.text(f"render.{key}", loc, **params)

    embed = discord.Embed(title=quote(job.instruction, 250), color=COLOR_OK,
                          description=t("expressive", text=quote(job.expressive or t("none"), 1000)))
    embed.add_field(name=t("seed"), value=str(job.seed))
    embed.add_field(name=t("text_cfg"), value=f"{job.text_cfg:g}")
    embed.add_field(name=t("image_cfg"), value=f"{job.image_cfg:g}")
    embed.add_field(name=t("steps"), value=str(job.steps))
    took = (job.finished_at - job.started_at) if job.finished_at and job.started_at else None
    embed.add_field(name=t("time"), value=seconds(took, loc) + (t("cached_llm") if job.llm_cached else ""))
    embed.add_field(name=t("preset"), value=job.preset)
    if job.preset_reason:
        embed.add_field(name=t("why"), value=quote(preset_reason(job), 1000), inline=False)
    if job.history_depth:
        embed.add_field(name=t("refinement"), value=t("refinement_turn", turn=job.history_depth + 1))
    embed.set_image(url=f"attachment://{filename}")
    footer = t("footer_job", job=job.id[:12])
    if random_weights:
        footer += " · " + i18n.text("common.random_weights", loc)
    embed.set_footer(text=footer)
    return embed


def done(job: JobRecord) -> str:
    """The line above the result embed; delivery adds a mention when the result arrives late."""
    return i18n.text("render.done", job.locale)


def spoilered(job: JobRecord) -> str:
    """Above a flagged result sent behind a spoiler."""
    return i18n.text("render.spoilered", job.locale)


def withheld(job: JobRecord) -> str:
    """Instead of a flagged result this server withholds."""
    return i18n.text("render.withheld", job.locale)


# English, for callers and tests that need the reference text.
DONE = i18n.text("render.done")
SPOILERED = i18n.text("render.spoilered")
WITHHELD = i18n.text("render.withheld")
