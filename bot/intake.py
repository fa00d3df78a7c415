"""Checks every request passes before it becomes a job: where, who, what, how many, and the image itself.

Each refusal is a :class:`Refusal` whose message is shown to the user (ephemerally) in their language.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import discord
import PIL.Image

from mgie_engine.errors import MgieError
from mgie_engine.images import MAX_INPUT_BYTES, load_image, prepare_image
from mgie_engine.png import encode_png

from . import i18n
from .admission import Ticket, fair_share_allows
from .downloads import allowed_hosts, check_attachment_meta, download
from .moderation_text import contains_blocked_word
from .presets import EDGE_ANALYSIS_SIDE
from .storage import GuildSettings

if TYPE_CHECKING:
    from .bot import MgieBot

T = TypeVar("T")

DECODE_SLOTS = max(1, min(4, (os.cpu_count() or 2) // 2))
"""Inputs decoded at once. A decode is CPU-bound and holds up to ~200 MB (a 40 MP PNG), so this bounds
both: the rest wait their turn, holding at most their downloaded bytes."""
DOWNLOAD_SLOTS = 2 * DECODE_SLOTS
"""Attachments held in memory at once (each at most MAX_INPUT_BYTES): downloading up to one decode ahead."""
INPUT_MULTIPLE = 8
"""Stored inputs are fitted with the engine's rounding (Stable Diffusion's VAE factor), so a worker's own
fit leaves them as they are."""

BANNED_MESSAGE = i18n.text("errors.banned")  # English, as the catalogue has it


class Refusal(MgieError):
    """A request we will not take; the message (catalogue ``key`` with ``params``) says why and what to do
    instead. ``str()`` is English (logs); :func:`bot.i18n.error_text` gives the reader's language."""

    def __init__(self, key: str, **params: object) -> None:
        super().__init__(i18n.text(key, None, **params), key=key, **params)


def first_image(attachments: list[discord.Attachment]) -> discord.Attachment | None:
    """The first attachment that looks like an image (by content type or file name), if any."""
    for attachment in attachments:
        ctype = (attachment.content_type or "").lower()
        if ctype.startswith("image/") or attachment.filename.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".gif")):
            return attachment
    return None


class IntakeSlots:
    """How many attachments are downloaded and decoded at once (one per bot).

    Decodes run on threads of their own, as many as may run at once: a big decode's freed memory stays
    with its thread's malloc arena, so spreading decodes over ever other threads (the loop's default
    executor) would grow the process by a decode's worth per thread instead of reusing it.
    """

    def __init__(self, decodes: int = DECODE_SLOTS, downloads: int = DOWNLOAD_SLOTS) -> None:
        self.decodes, self.downloads = decodes, max(downloads, decodes)
        self.decode = asyncio.Semaphore(self.decodes)
        self.download = asyncio.Semaphore(self.downloads)
        self.executor = concurrent.futures.ThreadPoolExecutor(self.decodes, thread_name_prefix="mgie-decode")

    def close(self) -> None:
        """Stop the decode threads (the bot is closing); queued decodes are dropped."""
        self.executor.shutdown(wait=False, cancel_futures=True)


def _decode_and_fit(data: bytes, max_side: int, analyse: Callable[[PIL.Image.Image], T]) -> tuple[bytes, T]:
    picture = load_image(data, reduce_to=max(2 * max_side, EDGE_ANALYSIS_SIDE))
    png = encode_png(prepare_image(picture, max_side, INPUT_MULTIPLE))
    return png, analyse(picture)


async def fetch_image(bot: MgieBot, attachment: discord.Attachment,
                      analyse: Callable[[PIL.Image.Image], T]) -> tuple[bytes, T]:
    """Download (Discord's CDN only, capped), decode once, fit to the engine's size and encode that as the
    PNG the job stores and its worker reads; ``analyse`` (e.g. the auto preset) sees the decoded picture.

    Decoding, fitting and ``analyse`` run in a worker thread, never on the event loop, and at most
    ``bot.intake_slots.decodes`` at once; the upload's bytes are dropped as soon as it is decoded.
    """
    check_attachment_meta(attachment.filename, attachment.content_type, attachment.size, MAX_INPUT_BYTES)
    slots: IntakeSlots = bot.intake_slots
    async with slots.download:
        data = await download(bot.http_session, attachment.url, allowed_hosts(bot.config.api_base),
                              MAX_INPUT_BYTES)
        async with slots.decode:
            return await asyncio.get_running_loop().run_in_executor(
                slots.executor, _decode_and_fit, data, bot.config.engine.max_side, analyse)


class JobRateLimiter:
    """At most ``limit`` new jobs per user in any ``window`` seconds (a sliding window, not fixed minutes).

    The pending cap stops a queue of many waiting jobs, but fast jobs finish at once, so without this one
    user could still keep the GPU busy by submitting over and over. State is in memory: a restart forgets
    it, which only ever lets someone in early. At most ``max_users`` users are tracked; past that the one
    idle longest is forgotten, so memory stays bounded however many accounts show up.
    """

    def __init__(self, limit: int, window: float = 60.0, max_users: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.max_users, self.clock = limit, window, max_users, clock
        self._starts: collections.OrderedDict[int, collections.deque[float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._starts)

    def retry_after(self, user_id: int) -> float:
        """Seconds until ``user_id`` may start another job; 0 when they may now."""
        if self.limit <= 0:
            return 0.0
        starts = self._starts.get(user_id)
        if starts is None:
            return 0.0
        now = self.clock()
        while starts and starts[0] <= now - self.window:
            starts.popleft()
        if len(starts) < self.limit:
            return 0.0
        return starts[0] + self.window - now

    def record(self, user_id: int) -> float | None:
        """Count a new job of ``user_id`` now (call only after every other check passed); returns its start."""
        if self.limit <= 0:
            return None
        starts = self._starts.get(user_id)
        if starts is None:
            starts = self._starts[user_id] = collections.deque(maxlen=self.limit)
        now = self.clock()
        starts.append(now)
        self._starts.move_to_end(user_id)
        while len(self._starts) > self.max_users:
            self._starts.popitem(last=False)
        return now

    def forget(self, user_id: int, start: float | None) -> None:
        """Un-count a start that :meth:`record` returned: its request failed before it became a job."""
        starts = self._starts.get(user_id)
        if start is not None and starts is not None and start in starts:
            starts.remove(start)


async def check_access(bot: MgieBot, user: discord.abc.User, guild_id: int | None, channel_id: int,
                       settings: GuildSettings, instruction: str | None = None,
                       app_permissions: discord.Permissions | None = None) -> Ticket:
    """Raise Refusal unless ``user`` may start a new job here; on success reserve its place and return it.

    Every path that starts a job calls this, so bans, the block-list and the limits cannot be side-stepped
    through a button or a reply. Pass ``instruction`` wherever the user typed one (re-used ones too), so the
    server's block-list applies to it. A ban is per server, so DMs (``guild_id`` None) never see one.
    Interactions pass their ``app_permissions`` (what Discord lets the app do in that channel: for a
    user-installed app in a server without the bot, what moderators allow ``@everyone``); without Attach
    Files and Embed Links the result could not be posted, so the request is refused before any work.
    The server's settings apply whether the app was installed to the server or to the user.

    The returned :class:`~bot.admission.Ticket` already counts toward the pending cap, the queue's global cap
    and the jobs-per-minute limit (see :mod:`bot.admission` for why, and for the fair share of the queue):
    hand it to ``JobManager.submit`` and ``release()`` it in a ``finally``, which gives it back unless the
    job was queued. Nothing may be awaited between the last check and the reservation, or two concurrent
    requests could both pass.
    """
    if await bot.store.is_blocked(guild_id, user.id):
        raise Refusal("errors.banned")
    if settings.allowed_channel_ids and channel_id not in settings.allowed_channel_ids:
        mentions = ", ".join(f"<#{c}>" for c in settings.allowed_channel_ids[:5])
        raise Refusal("errors.channel_not_enabled", channels=mentions)
    if app_permissions is not None and not (app_permissions.attach_files and app_permissions.embed_links):
        raise Refusal("errors.no_image_permissions")
    if instruction is not None and contains_blocked_word(instruction, settings.blocked_words):
        raise Refusal("errors.blocked_word")  # never echo the word: that would publish it in reply refusals
    queue = bot.queue
    pending = queue.pending_for(user.id)
    if pending >= settings.user_pending_cap:
        raise Refusal("errors.pending_cap", pending=pending, cap=settings.user_pending_cap)
    limiter = bot.rate_limiter
    wait = limiter.retry_after(user.id)
    if wait > 0:
        raise Refusal("errors.rate_limited", limit=limiter.limit, seconds=math.ceil(wait))
    if not queue.accepting:
        raise Refusal("errors.restarting")
    if not fair_share_allows(queue.taken, queue.max_total, pending + 1):
        if pending == 0:
            raise Refusal("errors.queue_full", max_total=queue.max_total)
        raise Refusal("errors.queue_busy", taken=queue.taken, pending=pending)
    return Ticket(queue, limiter, user.id)
