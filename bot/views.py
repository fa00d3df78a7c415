"""Buttons that keep working after a restart: dynamic items carrying the job id in their custom id.

Each button only parses its custom id and hands the press to the Results cog, which owns the logic.
"""

from __future__ import annotations

import functools
import re

import discord

from . import i18n

# action: (English label, emoji, style); shown in the job's language as the catalogue's "results.button_<action>"
# (any area's "<area>.button_<action>" for a feature's own button), the English label where there is none.
ACTIONS = {
    "reroll": ("Re-roll", "🎲", discord.ButtonStyle.secondary),
    "stronger": ("Stronger edit", "💪", discord.ButtonStyle.secondary),
    "closer": ("Closer to original", "🖼️", discord.ButtonStyle.secondary),
    "refine": ("Refine", "✏️", discord.ButtonStyle.primary),
    "undo": ("Undo", "↩️", discord.ButtonStyle.secondary),
    "delete": ("Delete", "🗑️", discord.ButtonStyle.danger),
    "cancel": ("Cancel", "✖️", discord.ButtonStyle.danger),
    "compare": ("Compare", "🔍", discord.ButtonStyle.secondary),
}


@functools.cache
def _label_key(action: str) -> str | None:
    """The catalogue key of ``action``'s label: ``results.button_<action>``, else any area's (looked up once)."""
    messages = i18n.catalogue(i18n.REFERENCE)
    key = f"results.button_{action}"
    if key in messages:
        return key
    return next((k for k in messages if k.endswith(f".button_{action}") and k.count(".") == 1), None)


def button_label(action: str, locale: object = None) -> str:
    """The label of ``action``'s button in the language of ``locale`` (English when it has no entry)."""
    key = _label_key(action)
    return i18n.text(key, locale) if key is not None else ACTIONS[action][0]


class JobButton(discord.ui.DynamicItem[discord.ui.Button], template=r"mgie:(?P<action>[a-z]+):(?P<job>[0-9a-f]{32})"):
    def __init__(self, action: str, job_id: str, locale: object = None) -> None:
        _, emoji, style = ACTIONS[action]
        label = button_label(action, locale)
        super().__init__(discord.ui.Button(label=label, emoji=emoji, style=style, custom_id=f"mgie:{action}:{job_id}"))
        self.action, self.job_id = action, job_id

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]):
        if match["action"] not in ACTIONS:
            raise ValueError(f"unknown action {match['action']}")
        return cls(match["action"], match["job"])

    async def callback(self, interaction: discord.Interaction) -> None:
        """Hand the press to the Results cog (or say the bot is restarting when it is not loaded)."""
        cog = interaction.client.get_cog("Results")
        if cog is None:
            await interaction.response.send_message(i18n.text("results.restarting", interaction.locale),
                                                    ephemeral=True)
            return
        await cog.on_button(interaction, self.action, self.job_id)


def result_view(job_id: str, owner_job_id: str | None = None, locale: object = None) -> discord.ui.View:
    """Buttons for a message showing ``job_id``'s result, labelled in ``locale``'s language.

    Re-roll, Stronger, Closer, Refine and Compare act on the result shown. Undo and Delete carry ``owner_job_id``,
    the job that made the message (default: the one shown): after an Undo the message shows an earlier
    step, possibly someone else's, but it is still its maker's to undo further or delete.
    """
    owner_job_id = owner_job_id or job_id
    view = discord.ui.View(timeout=None)
    for action in ("reroll", "stronger", "closer", "refine", "compare"):
        view.add_item(JobButton(action, job_id, locale))
    view.add_item(JobButton("undo", owner_job_id, locale))
    view.add_item(JobButton("delete", owner_job_id, locale))
    return view


def cancel_view(job_id: str, locale: object = None) -> discord.ui.View:
    """The Cancel button under a queued or running job's status."""
    view = discord.ui.View(timeout=None)
    view.add_item(JobButton("cancel", job_id, locale))
    return view
