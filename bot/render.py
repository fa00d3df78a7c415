"""What users read: status lines and result embeds, built from stored job records.

User text (instructions, model output) is escaped so it cannot inject markdown or mentions.
"""

from __future__ import annotations

import discord

from .storage import JobRecord

COLOR_OK = discord.Color.from_rgb(88, 101, 242)
COLOR_FAIL = discord.Color.red()


def quote(text: str, limit: int = 300) -> str:
    """User text made safe to show: markdown and mentions escaped, cut to ``limit`` characters."""
    text = discord.utils.escape_mentions(discord.utils.escape_markdown(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def seconds(value: float | None) -> str:
    """A duration for people: "12 s", "3.4 s", "?" when unknown."""
    if value is None:
        return "?"
    return f"{value:.0f} s" if value >= 10 else f"{value:.1f} s"


def queued(job: JobRecord, position: int | None, eta: float | None, warming: bool) -> str:
    """The status line of a waiting job: its place in the queue and about when it starts."""
    head = "⏳ The model is warming up; your edit is queued" if warming else "⏳ Queued"
    where = f" (position {position})" if position else ""
    when = f" · about {seconds(eta)}" if eta and not warming else ""
    return f"{head}{where}{when}\n> {quote(job.instruction)}"


def working(job: JobRecord, stage: str, step: int, total: int, eta: float | None) -> str:
    """The status line of a running job: which stage, which step, about how long is left."""
    if stage == "denoise":
        line = f"🎨 Painting: step {step}/{total}"
        if eta:
            line += f" · about {seconds(eta)} left"
    elif stage == "decode":
        line = "🎨 Finishing the image…"
    else:
        line = "🧠 Reading the image and writing the expressive instruction…"
    return f"{line}\n> {quote(job.instruction)}"


def failed(job: JobRecord, reason: str) -> str:
    """The final line of a job that failed, with the reason."""
    return f"❌ I couldn't finish this edit: {quote(reason, 500)}\n> {quote(job.instruction)}"


def cancelled(job: JobRecord) -> str:
    """The final line of a cancelled job."""
    return f"🚫 Cancelled.\n> {quote(job.instruction)}"


def result_embed(job: JobRecord, filename: str, random_weights: bool = False) -> discord.Embed:
    """The embed under a result: instruction, expressive instruction, seed, guidance, steps, time, preset."""
    embed = discord.Embed(title=quote(job.instruction, 250), color=COLOR_OK,
                          description=f"**Expressive instruction:** {quote(job.expressive or '(none)', 1000)}")
    embed.add_field(name="Seed", value=str(job.seed))
    embed.add_field(name="Text CFG", value=f"{job.text_cfg:g}")
    embed.add_field(name="Image CFG", value=f"{job.image_cfg:g}")
    embed.add_field(name="Steps", value=str(job.steps))
    took = (job.finished_at - job.started_at) if job.finished_at and job.started_at else None
    embed.add_field(name="Time", value=seconds(took) + (" (cached LLM)" if job.llm_cached else ""))
    embed.add_field(name="Preset", value=job.preset)
    if job.preset_reason:
        embed.add_field(name="Why these values", value=quote(job.preset_reason, 1000), inline=False)
    if job.history_depth:
        embed.add_field(name="Refinement", value=f"turn {job.history_depth + 1} (earlier turns in the prompt)")
    embed.set_image(url=f"attachment://{filename}")
    footer = f"job {job.id[:12]}"
    if random_weights:
        footer += " · RANDOM test weights: this output is noise"
    embed.set_footer(text=footer)
    return embed


DONE = "✅ Done"  # above the result embed; delivery adds a mention when the result arrives late
SPOILERED = "✅ Done · the safety check flagged this result, so it is behind a spoiler."
WITHHELD = ("✅ Done · the safety check flagged this result and this server withholds flagged results "
            "outside age-restricted channels.")
