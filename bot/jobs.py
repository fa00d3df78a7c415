"""Jobs from request to reply: store, queue, follow progress, deliver, recover after a restart.

bot.job_requests builds a new job's record and calls :meth:`JobManager.submit`; everything after that
happens here, driven by the queue's events. The record in SQLite is the truth: a restart resumes from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import time
from typing import TYPE_CHECKING

import discord

from mgie_engine.images import encode_under, load_image
from mgie_engine.protocol import EditJob, JobProgress, WorkerState

from . import i18n, render
from .admission import Ticket
from .delivery import Delivery
from .failure_causes import QUEUE_FULL, STORAGE, cause_of
from .metrics import BotMetrics
from .preview_policy import PreviewMode, preview_mode
from .queue import EventKind, JobEvent, JobQueue, QueueFullError
from .storage import JobRecord, Store
from .views import cancel_view, result_view

if TYPE_CHECKING:
    from mgie_engine.pool import WorkerPool

log = logging.getLogger(__name__)

DEFAULT_UPLOAD_LIMIT = 10 * 2**20
REDELIVERY_WINDOW = 3600.0  # seconds: a result older than this when the bot is back stays in /history only
PREVIEW_FILENAME = "preview.jpg"
FINAL_STATES = ("done", "failed", "cancelled")


@dataclasses.dataclass
class StatusUpdates:
    """How a job's status message is being kept up to date; memory only (a restart starts afresh).

    ``lock`` keeps one edit of the message at a time, ``last_edit`` paces progress edits,
    ``upload_limit`` is the largest result file the job's channel takes, and ``preview`` the newest live
    preview not yet shown (it rides on the next progress edit; frames in between are dropped).
    """

    last_edit: float = 0.0
    upload_limit: int = DEFAULT_UPLOAD_LIMIT
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    preview: bytes | None = None


class JobManager:
    """Every job from its stored record to its delivered result (or failure), across restarts."""

    def __init__(self, bot: discord.Client, store: Store, queue: JobQueue, engine: WorkerPool,
                 progress_interval: float = 2.0, metrics: BotMetrics | None = None) -> None:
        self.bot, self.store, self.queue, self.engine = bot, store, queue, engine
        self.metrics = metrics if metrics is not None else BotMetrics()
        self.delivery = Delivery(bot, store)
        self.progress_interval = progress_interval
        self._updates: dict[str, StatusUpdates] = {}
        self.previews_sent = 0  # progress edits that carried a live preview (metrics read it)


    # -- submitting jobs ----------------------------------------------------------------------------
    async def history_for(self, parent_id: str | None, depth: int) -> tuple[tuple[str, str], ...]:
        """Earlier turns for the prompt: the chain ending at the job whose output we edit, newest `depth`."""
        if not parent_id or depth <= 0:
            return ()
        chain = await self.store.chain(parent_id, limit=depth)
        return tuple((r.instruction, r.expressive) for r in chain if r.expressive)

    async def submit(self, record: JobRecord, image: bytes | None, upload_limit: int | None = None,
                     ticket: Ticket | None = None) -> JobRecord:
        """Store a new job (and its input image when new), queue it and show its position.

        ``ticket`` is the place check_access reserved; it is consumed once the job is queued. Errors before
        that (a full disk, a restart) raise, with the job marked failed if it was stored; the caller tells
        the user and releases the ticket. Once queued the job runs, even if showing its position fails.
        A refused job leaves nothing behind: without a reserved place a full queue is refused before
        anything is stored, and should the queue refuse it anyway, the row and file just written go again.
        """
        if (ticket is None or not ticket.open) and self.queue.taken >= self.queue.max_total:
            raise QueueFullError(f"The queue is full ({self.queue.max_total} edits waiting); please try again later.",
                                 key="errors.queue_full", max_total=self.queue.max_total)
        if image is not None:
            record.input_image = await self.store.save_image(record.id, "in", image)
        record = await self.store.create_job(record)
        self._updates[record.id] = StatusUpdates(upload_limit=upload_limit or DEFAULT_UPLOAD_LIMIT)
        try:
            await self._enqueue(record, ticket)
        except QueueFullError:
            self._updates.pop(record.id, None)
            await self.store.delete_new_job(record.id, record.input_image if image is not None else None)
            raise
        except Exception as err:
            self._updates.pop(record.id, None)
            try:
                await self.store.update_job(record.id, state="failed", error=str(err) or type(err).__name__,
                                            finished_at=time.time())
                self.metrics.job_ended("failed", cause_of(err))
            except Exception:  # the disk that failed the job may fail this too; the user is told anyway
                log.exception("could not mark job %s failed", record.id)
            raise
        try:
            await self._show_queued(record)
        except discord.HTTPException as err:
            log.warning("could not show the queue position of job %s: %s", record.id, err)
        return record

    async def _enqueue(self, record: JobRecord, ticket: Ticket | None = None) -> None:
        # The worker reads the stored, already fitted input itself: a queued job holds a path, not pixels.
        image = await self.store.existing_image_path(record.input_image)
        if image is None:
            raise FileNotFoundError(record.input_image)
        # parent_id is the job whose output is this job's input, so the chain up to it is the history
        # (a re-roll shares its source's parent, input and history).
        history = await self.history_for(record.parent_id, record.history_depth)
        previews = (await self._preview_mode(record)).shown  # DMs: the defaults (on)
        job = EditJob(job_id=record.id, image=image, instruction=record.instruction, seed=record.seed,
                      text_cfg=record.text_cfg, image_cfg=record.image_cfg, steps=record.steps, history=history,
                      previews=previews)
        self.queue.submit(job, record.user_id, reserved=ticket is not None and ticket.open)
        if ticket is not None:
            ticket.consume()

    async def _show_queued(self, record: JobRecord) -> None:
        warming = self.engine.state is WorkerState.LOADING
        text = render.queued(record, self.queue.position(record.id), self.queue.eta(record.id), warming)
        await self._show(record.id, text, view=cancel_view(record.id, record.locale))

    # -- events from the queue ----------------------------------------------------------------------
    async def on_event(self, event: JobEvent) -> None:
        """Show what happened to a job (started, progress, done, failed, ...) on its status message."""
        if event.kind is EventKind.PROGRESS:
            updates = self._updates.get(event.job_id)
            if updates is None:
                return  # the job has ended (a late tick, e.g. one through Redis after the result): nothing to show
            if event.progress is not None and event.progress.preview:
                updates.preview = event.progress.preview  # the newest; shown with the next progress edit
            if updates.lock.locked() or time.monotonic() - updates.last_edit < self.progress_interval:
                return  # Discord's edit rate limits: drop intermediate frames, never queue them up
        else:
            updates = self._updates.setdefault(event.job_id, StatusUpdates())
        async with updates.lock:
            try:
                await self._handle(event, updates)
            except Exception:
                log.exception("could not report %s of job %s", event.kind, event.job_id)

    async def _handle(self, event: JobEvent, updates: StatusUpdates) -> None:
        job_id = event.job_id
        if event.kind is EventKind.STARTED:
            record = await self.store.update_job(job_id, state="running", started_at=time.time())
            await self._show(job_id, render.working(record, "language", 0, 1, None),
                             view=cancel_view(job_id, record.locale))
            await self._refresh_positions()
        elif event.kind is EventKind.PROGRESS:
            record = await self.store.get_job(job_id)
            if record is None or record.state in FINAL_STATES or job_id not in self._updates:
                return  # its final word is out: a late tick must not replace it
            p: JobProgress = event.progress
            eta = self.queue.eta(job_id)
            mode = await self._preview_mode(record)  # now: a moderator may have changed the policy meanwhile
            preview, updates.preview = updates.preview, None
            file = (discord.File(io.BytesIO(preview), filename=PREVIEW_FILENAME, spoiler=mode is PreviewMode.SPOILER)
                    if preview and mode.shown else None)
            await self._show(job_id, render.working(record, p.stage, p.step, p.total, eta),
                             view=cancel_view(job_id, record.locale), file=file,
                             keep_attachments=mode is not PreviewMode.WITHHELD)
            if file is not None:
                self.preview_sent(job_id)
        elif event.kind is EventKind.DONE:
            await self._deliver(job_id, event, updates)
        elif event.kind is EventKind.FAILED:
            record = await self.store.update_job(job_id, state="failed", error=event.error, finished_at=time.time())
            self.metrics.job_ended("failed", event.cause)
            await self._show(job_id, render.failed(record, failure_text(event, record.locale)), view=None, ping=True)
            self._updates.pop(job_id, None)
        elif event.kind is EventKind.REQUEUED:  # its worker stopped responding before it began painting
            record = await self.store.update_job(job_id, state="queued", started_at=None)
            await self._show_queued(record)
        elif event.kind is EventKind.CANCELLED:
            record = await self.store.update_job(job_id, state="cancelled", finished_at=time.time())
            self.metrics.job_ended("cancelled")
            await self._show(job_id, render.cancelled(record), view=None)
            self._updates.pop(job_id, None)
            await self._refresh_positions()
        updates.last_edit = time.monotonic()

    async def _deliver(self, job_id: str, event: JobEvent, updates: StatusUpdates) -> None:
        outcome = event.outcome
        current = await self.store.get_job(job_id)
        if current is not None and current.state == "done":  # a job that ran twice (a worker's job reclaimed)
            log.info("job %s already has its result; a second one is dropped", job_id)
            return
        try:
            path = await self.store.save_image(job_id, "out", outcome.png)
        except OSError as err:
            log.error("could not store the result of job %s: %s", job_id, err)
            record = await self.store.update_job(job_id, state="failed", finished_at=time.time(),
                                                 error=i18n.text("errors.result_not_stored"))
            self.metrics.job_ended("failed", STORAGE)
            await self._show(job_id, render.failed(record, i18n.text("errors.result_not_stored", record.locale)),
                             view=None, ping=True)
            return
        record = await self.store.update_job(job_id, state="done", output_image=path, finished_at=time.time(),
                                             expressive=outcome.expressive_instruction, llm_cached=outcome.llm_cached,
                                             flagged=outcome.flagged)
        self.metrics.job_ended("done")
        await self._announce(record, outcome.png, updates)

    async def _announce(self, record: JobRecord, png: bytes, updates: StatusUpdates) -> None:
        """Post a stored result (with the guild's policy for flagged outputs) and remember its message."""
        job_id = record.id
        data, ext = png, "png"
        if len(data) > updates.upload_limit:
            data, ext = await asyncio.to_thread(_smaller, data, updates.upload_limit)
        filename = f"mgie-{job_id[:8]}.{ext}"
        embed = render.result_embed(record, filename, random_weights=self.engine.random_weights)
        content, file = render.done(record), discord.File(io.BytesIO(data), filename=filename)
        if record.flagged and not self._age_restricted(record.channel_id):
            policy = (await self.store.guild_settings(record.guild_id)).flagged_outputs
            embed.set_image(url=None)
            if policy == "withhold":
                content, file = render.withheld(record), None
            else:  # a spoiler attachment: shown blurred until clicked; embeds can't be blurred, so none there
                content, file = render.spoilered(record), discord.File(io.BytesIO(data), filename=filename,
                                                                       spoiler=True)
        record = await self._show(job_id, content, embed=embed, file=file,
                                  view=result_view(job_id, locale=record.locale), ping=True)
        await self.store.update_job(job_id, result_message_id=record.status_message_id)
        self._updates.pop(job_id, None)

    async def _preview_mode(self, record: JobRecord) -> PreviewMode:
        """How the job's live previews are shown (bot/preview_policy.py); the settings come from memory."""
        settings = await self.store.guild_settings(record.guild_id)
        return preview_mode(settings, safety_check=self._safety_checked(),
                            age_restricted=self._age_restricted(record.channel_id))

    def _safety_checked(self) -> bool:
        """Whether results go through the optional safety check: ``MGIE_SAFETY_CHECKER`` (with Redis workers,
        set on the bot's host too), or a worker in this process that loaded one."""
        config = getattr(self.bot, "config", None)
        return bool(config is not None and config.engine.safety_checker) or any(
            getattr(worker, "safety_check", None) is not None for worker in self.engine.workers)

    def _age_restricted(self, channel_id: int) -> bool:
        channel = self.bot.get_channel(channel_id)
        return bool(getattr(channel, "nsfw", False) or (hasattr(channel, "is_nsfw") and channel.is_nsfw()))

    def preview_sent(self, job_id: str) -> None:
        """A progress edit carrying a live preview went out: counted here (``previews_sent``) and in
        ``mgie_previews_sent_total`` (bot/metrics.py)."""
        self.previews_sent += 1
        self.metrics.preview_sent()

    async def _show(self, job_id: str, content: str, *, view, embed=None, file=None, ping: bool = False,
                    keep_attachments: bool = False) -> JobRecord:
        record = await self.store.get_job(job_id)
        return await self.delivery.show(record, content, embed=embed, file=file, view=view, ping=ping,
                                        keep_attachments=keep_attachments)

    async def _refresh_positions(self) -> None:
        """Queue positions moved: tell waiting users, gently (only those whose status changed matters)."""
        for job_id in self.queue.waiting()[:10]:
            record = await self.store.get_job(job_id)
            if record is not None and record.state == "queued":
                try:
                    await self._show_queued(record)
                except discord.HTTPException as err:
                    log.info("could not refresh position of %s: %s", record.id, err)

    # -- restart recovery ---------------------------------------------------------------------------
    async def recover(self) -> tuple[int, int]:
        """Requeue every job a previous run left queued or running, tell users of those that cannot be, and
        post results that were stored but never delivered (a stop that came between the two)."""
        resumed = lost = 0
        for record in await self.store.unfinished_jobs():
            self._updates[record.id] = StatusUpdates()
            record = await self.store.update_job(record.id, state="queued", started_at=None)
            try:
                await self._enqueue(record)
                await self._show_queued(record)
                resumed += 1
            except (FileNotFoundError, QueueFullError) as err:
                if isinstance(err, QueueFullError) and not self.queue.accepting:
                    break  # a stop came during start-up: this job and the rest stay for the next start
                lost += 1
                reason = (i18n.text("errors.input_lost_on_restart") if isinstance(err, FileNotFoundError)
                          else str(err))
                record = await self.store.update_job(record.id, state="failed", error=reason, finished_at=time.time())
                self.metrics.job_ended("failed", STORAGE if isinstance(err, FileNotFoundError) else QUEUE_FULL)
                told = (i18n.text("errors.input_lost_on_restart", record.locale) if isinstance(err, FileNotFoundError)
                        else i18n.error_text(err, record.locale))
                try:
                    await self.delivery.show(record, render.failed(record, told), view=None, ping=True)
                except discord.HTTPException as http_err:
                    log.warning("could not tell user of job %s: %s", record.id, http_err)
        for record in await self.store.undelivered_results(since=time.time() - REDELIVERY_WINDOW):
            png = await self.store.read_image(record.output_image)
            try:
                if png is None:
                    raise FileNotFoundError(record.output_image)
                await self._announce(record, png, StatusUpdates())
                resumed += 1
            except (OSError, discord.HTTPException) as err:
                log.warning("could not deliver the stored result of job %s: %s", record.id, err)
        if resumed or lost:
            log.info("restart recovery: %d job(s) resumed or delivered, %d could not be", resumed, lost)
        return resumed, lost


def failure_text(event: JobEvent, locale: str | None) -> str:
    """Why a job failed, in its language: the event's message key, else its English text (translated when
    it is a known engine message, e.g. from an older worker over Redis that sends no key)."""
    if event.error_key and event.error_key in i18n.catalogue(i18n.REFERENCE):
        return i18n.text(event.error_key, locale, **(event.error_params or {}))
    return i18n.translate_english(event.error, locale) if event.error else i18n.text("errors.unknown_error", locale)


def _smaller(png: bytes, limit: int) -> tuple[bytes, str]:
    return encode_under(load_image(png), limit)
