"""/mgie forget-me: delete everything the bot stores about one user, once they confirm.

What goes: every job row of theirs (instructions, settings, message ids, interaction tokens) and every
image their jobs wrote (uploads, results). Their jobs still queued or running are cancelled first, the
usual way (their status messages say so), and the deletion waits until those have stopped.

Other users' jobs built on their images (a re-roll of their edit, a refinement of their result): the
other user's own results stay, since they are that user's, but the link to the forgotten jobs is cut and
any input that was one of the forgotten images is dropped. So a refinement's history no longer holds the
forgotten instructions, and re-rolling such a job says its original is gone. Those of them still waiting
are cancelled, since they could only run on the forgotten image.

Kept: server bans (a moderation record, not the user's content; forgetting must not lift one) and what
is already posted on Discord (messages are Discord's; the Delete button removes a result message).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import discord

from .retention import ForgetReport
from .storage import UNFINISHED_STATES

if TYPE_CHECKING:
    from .bot import MgieBot

log = logging.getLogger(__name__)

SETTLE_TIMEOUT = 60.0  # most seconds to wait for cancelled jobs to stop before giving up
_TRY_AGAIN = ("Some edits that need your images are still running, so nothing was deleted yet. "
              "Please try again in a minute.")


async def describe(bot: MgieBot, user_id: int) -> tuple[str, bool]:
    """What the confirmation asks about (how much is stored, what happens to it), and whether there is any."""
    jobs = await bot.store.recent_jobs(user_id, limit=1_000_000)
    pending = sum(j.state in UNFINISHED_STATES for j in jobs)
    if not jobs:
        return "I don't store anything about you: you have no edits.", False
    cancel = f" Your {pending} edit(s) still waiting or running will be cancelled first." if pending else ""
    return (f"This deletes everything I store about you: {len(jobs)} edit(s), their instructions and every "
            f"image you uploaded or I made for you.{cancel} Other people's edits built on your images keep "
            "their own results but lose your images and instructions. Messages already posted on Discord "
            "stay (use Delete on a result to remove it). This can't be undone."), True


async def forget(bot: MgieBot, user_id: int) -> str:
    """Cancel what needs the user's data, wait for it to stop, delete it all; the answer for the user."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    asked: set[str] = set()
    while pending := await bot.retention.pending_for_forget(user_id):
        for job_id in pending:
            if job_id in asked:
                continue
            asked.add(job_id)
            if not bot.queue.cancel(job_id) and bot.queue.position(job_id) is None:
                # In no queue (lost in a crash before recovery ran): nothing will report it, settle it here.
                await bot.store.update_job(job_id, state="cancelled", finished_at=time.time())
        if time.monotonic() > deadline:
            return _TRY_AGAIN
        await asyncio.sleep(0.1)
    await bot.settle_events()  # their "Cancelled" status edits read the rows about to go
    report = await bot.retention.forget_user(user_id)
    if not isinstance(report, ForgetReport):
        return _TRY_AGAIN  # a new edit started meanwhile
    log.info("forgot user %s: %d job(s), %d file(s), %d other job(s) detached", user_id, report.jobs,
             report.files, report.detached)
    others = (f" {report.detached} edit(s) by others that used your images no longer link to them."
              if report.detached else "")
    cancelled = f" Cancelled {len(asked)} waiting edit(s) first." if asked else ""
    return f"🗑️ Done: deleted {report.jobs} edit(s) and {report.files} image(s).{cancelled}{others}"


class ForgetButton(discord.ui.DynamicItem[discord.ui.Button],
                   template=r"mgie-forget:(?P<choice>yes|no):(?P<user>[0-9]{1,20})"):
    """The confirmation under /mgie forget-me. The user id is in the custom id, so the button still works
    after a restart (never Discord's bare "This interaction failed") and only acts for that user."""

    def __init__(self, choice: str, user_id: int) -> None:
        label, style = (("Delete my data", discord.ButtonStyle.danger) if choice == "yes"
                        else ("Keep it", discord.ButtonStyle.secondary))
        super().__init__(discord.ui.Button(label=label, style=style, custom_id=f"mgie-forget:{choice}:{user_id}"))
        self.choice, self.user_id = choice, user_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match):
        return cls(match["choice"], int(match["user"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        """Only the user it asks may answer; "yes" deletes and says what went."""
        if interaction.user.id != self.user_id:
            await interaction.response.send_message("That button is not yours.", ephemeral=True)
        elif self.choice == "no":
            await interaction.response.edit_message(content="Nothing was deleted.", view=None)
        else:
            await interaction.response.edit_message(content="⏳ Deleting your data…", view=None)
            await interaction.edit_original_response(content=await forget(interaction.client, self.user_id))


def confirm_view(user_id: int) -> discord.ui.View:
    """The two buttons under /mgie forget-me: delete, or keep."""
    view = discord.ui.View(timeout=None)
    view.add_item(ForgetButton("yes", user_id))
    view.add_item(ForgetButton("no", user_id))
    return view
