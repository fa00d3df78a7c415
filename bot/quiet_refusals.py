"""Refusing a reply-refine without spamming the channel.

A slash command can be refused privately (ephemerally); a plain reply cannot: anything the bot answers
is public. So a refused reply (banned user, closed channel, blocked word, limits) always gets a 🚫
reaction on the user's own message, and a short public notice saying why at most once per user per
server (per channel in DMs) every NOTICE_WINDOW_S seconds. The notice says that further refusals in
that time only get the reaction, and it mentions nobody. 20 replies from a banned user thus produce 20
reactions and one message instead of 20 messages.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import discord

from . import i18n

if TYPE_CHECKING:
    from .bot import MgieBot

log = logging.getLogger(__name__)

NOTICE_WINDOW_S = 300.0
REFUSED_REACTION = "\N{NO ENTRY SIGN}"
_NO_PINGS = discord.AllowedMentions.none()


class NoticeThrottle:
    """Allows one notice per key per ``window`` seconds; at most ``max_keys`` keys are remembered.

    Memory-only: a restart forgets it, which at worst allows one extra notice. Past ``max_keys`` the key
    noticed longest ago is dropped, so memory stays bounded however many accounts show up.
    """

    def __init__(self, window: float = NOTICE_WINDOW_S, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window, self.max_keys, self.clock = window, max_keys, clock
        self._last: collections.OrderedDict[Hashable, float] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def allow(self, key: Hashable) -> bool:
        """True (and the window starts) when no notice went to ``key`` in the last ``window`` seconds."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.window:
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return True


async def refuse_reply(bot: MgieBot, message: discord.Message, text: str, *, reaction: str = REFUSED_REACTION,
                       locale: object = None) -> None:
    """Refuse ``message`` quietly: a reaction always, the reason in public at most once per window.

    ``text`` is already in the notice's language, ``locale`` (default: the server's, since the notice is
    public), in which the line about further refusals is written too.

    Whether the notice is due is decided first, so of a burst of refused replies the first to get here
    gets it, whichever reaction Discord confirms first.
    """
    place = message.guild.id if message.guild is not None else message.channel.id
    notice_due = bot.reply_notices.allow((place, message.author.id))
    try:
        await message.add_reaction(reaction)
    except discord.HTTPException as err:  # no Add Reactions here: the notice (if due) still explains
        log.info("could not react to message %s: %s", message.id, err)
    if not notice_due:
        return
    minutes = max(1, round(NOTICE_WINDOW_S / 60))
    try:
        if locale is None and message.guild is not None:
            locale = message.guild.preferred_locale
        later = i18n.text("errors.reply_notice_window", locale, minutes=minutes, reaction=reaction)
        await message.reply(f"{text}\n-# {later}", mention_author=False, allowed_mentions=_NO_PINGS)
    except discord.HTTPException as err:
        log.info("could not post a refusal notice in channel %s: %s", message.channel.id, err)
