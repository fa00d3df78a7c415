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

from . import i18n
from .retention import ForgetReport
from .storage import UNFINISHED_STATES

if TYPE_CHECKING:
    from .bot import MgieBot

log = logging.getLogger(__name__)

SETTLE_TIMEOUT = 60.0  # most seconds to wait for cancelled jobs to stop before giving up


async def describe(bot: MgieBot, user_id: int, locale: object = None) -> tuple[str, bool]:
    """What the confirmation asks about (how much is stored, what happens to it), and whether there is any."""
    jobs = await bot.store.recent_jobs(user_id, limit=1_000_000)
    pending = sum(j.state in UNFINISHED_STATES for j in jobs)
    if not jobs:
        return i18n.text("admin.forget_nothing", locale), False
    cancel = i18n.text("admin.forget_cancel_first", locale, pending=pending) if pending else ""
    return i18n.text("admin.forget_confirm", locale, jobs=len(jobs), cancel=cancel), True


async def forget(bot: MgieBot, user_id: int, locale: object = None) -> str:
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
            return i18n.text("admin.forget_try_again", locale)
        await asyncio.sleep(0.1)
    await bot.settle_events()  # their "Cancelled" status edits read the rows about to go
    report = await bot.retention.forget_user(user_id)
    if not isinstance(report, ForgetReport):
        return i18n.text("admin.forget_try_again", locale)  # a new edit started meanwhile
    log.info("forgot user %s: %d job(s), %d file(s), %d other job(s) detached", user_id, report.jobs,
             report.files, report.detached)
    others = i18n.text("admin.forget_detached", locale, detached=report.detached) if report.detached else ""
    cancelled = i18n.text("admin.forget_cancelled", locale, cancelled=len(asked)) if asked else ""
    return i18n.text("admin.forget_done", locale, jobs=report.jobs, files=report.files, cancelled=cancelled,
                     others=others)


class ForgetButton(discord.ui.DynamicItem[discord.ui.Button],
                   template=r"mgie-forget:(?P<choice>yes|no):(?P<user>[0-9]{1,20})"):
    """The confirmation under /mgie forget-me. The user id is in the custom id, so the button still works
    after a restart (never Discord's bare "This interaction failed") and only acts for that user."""

    def __init__(self, choice: str, user_id: int, locale: object = None) -> None:
        label, style = ((i18n.text("admin.forget_yes", locale), discord.ButtonStyle.danger) if choice == "yes"
                        else (i18n.text("admin.forget_no", locale), discord.ButtonStyle.secondary))
        super().__init__(discord.ui.Button(label=label, style=style, custom_id=f"mgie-forget:{choice}:{user_id}"))
        self.choice, self.user_id = choice, user_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match):
        return cls(match["choice"], int(match["user"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        """Only the user it asks may answer; "yes" deletes and says what went."""
        loc = interaction.locale
        if interaction.user.id != self.user_id:
            await interaction.response.send_message(i18n.text("admin.forget_not_yours", loc), ephemeral=True)
        elif self.choice == "no":
            await interaction.response.edit_message(content=i18n.text("admin.forget_kept", loc), view=None)
        else:
            await interaction.response.edit_message(content=i18n.text("admin.forget_deleting", loc), view=None)
            await interaction.edit_original_response(content=await forget(interaction.client, self.user_id, loc))


def confirm_view(user_id: int, locale: object = None) -> discord.ui.View:
    """The two buttons under /mgie forget-me: delete, or keep (labelled in ``locale``'s language)."""
    view = discord.ui.View(timeout=None)
    view.add_item(ForgetButton("yes", user_id, locale))
    view.add_item(ForgetButton("no", user_id, locale))
    return view
