"""The fair job queue: round-robin across users, caps, positions and ETAs, dispatch to workers.

This is the bot-side half of the queue interface (submit, progress events, result, cancel). Fair
scheduling stays here when workers move to other hosts; workers only ever see one job at a time.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from mgie_engine.errors import JobCancelledError, MgieError
from mgie_engine.protocol import EditJob, EditOutcome, JobProgress, JobStage, Worker

from .failure_causes import WORKER_LOST, cause_of

log = logging.getLogger(__name__)


class QueueFullError(MgieError):
    """The whole queue is at its cap."""


class EventKind(enum.StrEnum):
    """What happened to a job, as the queue reports it to the bot."""

    STARTED = "started"
    PROGRESS = "progress"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REQUEUED = "requeued"  # its worker stopped responding before it began painting


@dataclasses.dataclass(frozen=True)
class JobEvent:
    job_id: str
    kind: EventKind
    progress: JobProgress | None = None
    outcome: EditOutcome | None = None
    error: str | None = None  # English, as logged and stored
    error_key: str | None = None  # the message's catalogue key and params (bot/i18n), to tell the user
    error_params: dict | None = None
    cause: str | None = None  # FAILED: why, as a word of bot.failure_causes (the metrics' label)
    waited: float | None = None  # STARTED: seconds the job waited in the queue


@dataclasses.dataclass
class _Entry:
    job: EditJob
    user_id: int
    enqueued_at: float
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    assigned_at: float = 0.0
    denoising_started: bool = False  # redoing it elsewhere would not be the same edit any more


class FairQueue:
    """Per-user FIFOs served round-robin: a user with 3 jobs waits behind one job of each other user."""

    def __init__(self) -> None:
        self._queues: dict[int, collections.deque[_Entry]] = {}
        self._turns: collections.deque[int] = collections.deque()  # users in serving order

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def push(self, entry: _Entry, front: bool = False) -> None:
        """Queue a job at the back of its user's line; ``front`` (a job given back by a failed worker) puts it
        first among its user's jobs instead, never ahead of other users' turns: a user with jobs waiting keeps
        their place in the round, and one with none gets back the turn the job was taken on, at the front."""
        queue = self._queues.setdefault(entry.user_id, collections.deque())
        if not queue:
            if front:
                self._turns.appendleft(entry.user_id)
            else:
                self._turns.append(entry.user_id)
        if front:
            queue.appendleft(entry)
        else:
            queue.append(entry)

    def pop(self) -> _Entry | None:
        if not self._turns:
            return None
        user = self._turns.popleft()
        queue = self._queues[user]
        entry = queue.popleft()
        if queue:
            self._turns.append(user)
        else:
            del self._queues[user]
        return entry

    def remove(self, job_id: str) -> _Entry | None:
        for user, queue in self._queues.items():
            for entry in queue:
                if entry.job.job_id == job_id:
                    queue.remove(entry)
                    if not queue:
                        del self._queues[user]
                        self._turns.remove(user)
                    return entry
        return None

    def order(self) -> list[_Entry]:
        """The order jobs would be served in if nothing else arrived."""
        queues = {u: list(q) for u, q in self._queues.items()}
        turns, out = collections.deque(self._turns), []
        while turns:
            user = turns.popleft()
            out.append(queues[user].pop(0))
            if queues[user]:
                turns.append(user)
        return out

    def pending_for(self, user_id: int) -> int:
        return len(self._queues.get(user_id, ()))


EventHandler = Callable[[JobEvent], Awaitable[None] | None]


class JobQueue:
    """submit / cancel / position / eta, and events for everything that happens to a job."""

    def __init__(self, workers: list[Worker], on_event: EventHandler, max_total: int = 100,
                 default_seconds: float = 30.0, stall_timeout: float = 300.0,
                 replace_worker: Callable[[Worker], Worker] | None = None) -> None:
        self.workers = list(workers)
        self.stall_timeout = stall_timeout
        self.replace_worker = replace_worker
        self.on_event = on_event
        self.max_total = max_total
        self.default_seconds = default_seconds
        self._queue = FairQueue()
        self._wakeup = asyncio.Event()
        self._running: dict[str, _Entry] = {}
        self._started: dict[str, float] = {}
        self._durations: collections.deque[float] = collections.deque(maxlen=50)
        self._tasks: list[asyncio.Task] = []
        self._accepting = True
        self._stopped = False  # after stop(): jobs the workers still end are left as the database has them
        self._ready: list[Worker] = []
        self._load: collections.Counter[int] = collections.Counter()
        self._assigned: dict[str, tuple[Worker, asyncio.Task]] = {}
        self._reserved: collections.Counter[int] = collections.Counter()  # places held by accepted requests

    # -- the interface ------------------------------------------------------------------------------
    def submit(self, job: EditJob, user_id: int, *, reserved: bool = False) -> int:
        """Queue a job; returns its 1-based position. Raises QueueFullError at the global cap.

        ``reserved``: the job fills a place its request reserved (see :mod:`bot.admission`), which the
        caller gives back once this returns; the cap was checked when the place was taken.
        """
        if not self._accepting:
            raise QueueFullError("The bot is restarting; please try again in a minute.", key="errors.restarting")
        if not reserved and self.taken >= self.max_total:
            raise QueueFullError(f"The queue is full ({self.max_total} edits waiting); please try again later.",
                                 key="errors.queue_full", max_total=self.max_total)
        self._queue.push(_Entry(job=job, user_id=user_id, enqueued_at=time.monotonic()))
        self._wakeup.set()
        return self.position(job.job_id) or 1

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job at once, or a running one at its next step."""
        if self._queue.remove(job_id) is not None:
            self._emit(JobEvent(job_id, EventKind.CANCELLED))
            return True
        entry = self._running.get(job_id)
        if entry is not None:
            entry.cancel.set()
            return True
        return False

    def position(self, job_id: str) -> int | None:
        """1-based place among waiting jobs; 0 while running; None when unknown."""
        if job_id in self._running:
            return 0
        for i, entry in enumerate(self._queue.order()):
            if entry.job.job_id == job_id:
                return i + 1
        return None

    def eta(self, job_id: str) -> float | None:
        """Seconds until the job is done, from recent edit times."""
        pos = self.position(job_id)
        if pos is None:
            return None
        per_job = self.average_seconds()
        left_running = [max(per_job - (time.monotonic() - t), 1.0) for t in self._started.values()]
        if pos == 0:
            return max(per_job - (time.monotonic() - self._started.get(job_id, time.monotonic())), 1.0)
        slots = max(sum(w.capacity for w in self.workers), 1)
        ahead = (pos - 1) // slots
        return (min(left_running) if len(left_running) >= slots else 0.0) + (ahead + 1) * per_job

    def average_seconds(self) -> float:
        return sum(self._durations) / len(self._durations) if self._durations else self.default_seconds

    def waiting(self) -> list[str]:
        """Job ids in the order they will be served."""
        return [entry.job.job_id for entry in self._queue.order()]

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> list[str]:
        return list(self._running)

    @property
    def taken(self) -> int:
        """Places counted against ``max_total``: waiting jobs plus places reserved for accepted requests."""
        return len(self._queue) + sum(self._reserved.values())

    def pending_for(self, user_id: int) -> int:
        """The user's waiting, running and reserved jobs: what the per-user cap counts."""
        running = sum(e.user_id == user_id for e in self._running.values())
        return self._queue.pending_for(user_id) + running + self._reserved[user_id]

    def reserve(self, user_id: int) -> None:
        """Hold a place for a request of ``user_id`` that passed its checks but is not queued yet."""
        self._reserved[user_id] += 1

    def unreserve(self, user_id: int) -> None:
        """Give a reserved place back (its job is queued now, or its request failed)."""
        if self._reserved[user_id] <= 1:
            self._reserved.pop(user_id, None)
        else:
            self._reserved[user_id] -= 1

    # -- dispatch -----------------------------------------------------------------------------------
    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._dispatch(), name="mgie-dispatch"))
        self._tasks.append(asyncio.create_task(self._watchdog(), name="mgie-watchdog"))
        for worker in self.workers:
            self._tasks.append(asyncio.create_task(self._watch_ready(worker), name=f"mgie-ready-{worker.name}"))

    async def stop(self) -> None:
        self._accepting = False
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def stop_accepting(self) -> None:
        self._accepting = False

    @property
    def accepting(self) -> bool:
        return self._accepting

    def wake(self) -> None:
        """Workers' capacity changed (a remote pool's worker joined or left): look for jobs to release."""
        self._wakeup.set()

    async def all_ready(self) -> None:
        """Until every worker has finished loading (or failed to)."""
        while len(self._ready) < len(self.workers):
            await asyncio.sleep(0.01)

    async def _watch_ready(self, worker: Worker) -> None:
        await worker.wait_ready()  # ready, or failed: a failed worker answers each job with its error
        self._ready.append(worker)
        self._wakeup.set()

    async def _dispatch(self) -> None:
        """Hand the fair queue's next job to the least busy worker that has room, until none has."""
        running: set[asyncio.Task] = set()
        try:
            while True:
                free = [w for w in self._ready if self._load[id(w)] < w.capacity]
                entry = self._queue.pop() if free else None
                if entry is None:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                worker = min(free, key=lambda w: self._load[id(w)] / w.capacity)
                self._load[id(worker)] += 1
                entry.assigned_at = time.monotonic()
                task = asyncio.create_task(self._run_one(worker, entry), name=f"mgie-job-{entry.job.job_id[:8]}")
                self._assigned[entry.job.job_id] = (worker, task)
                running.add(task)
                task.add_done_callback(lambda t, w=worker: self._job_left(t, w, running))
        finally:
            for task in running:
                task.cancel()

    def _job_left(self, task: asyncio.Task, worker: Worker, running: set) -> None:
        running.discard(task)
        self._load[id(worker)] -= 1
        self._wakeup.set()

    # -- the watchdog -------------------------------------------------------------------------------
    async def _watchdog(self) -> None:
        """A worker that makes no progress for `stall_timeout` while it has jobs is given up on."""
        while True:
            await asyncio.sleep(max(min(self.stall_timeout / 4, 5.0), 0.05))
            now = time.monotonic()
            for worker in list(self._ready):
                mine = [self._running.get(j) for j, (w, _) in self._assigned.items() if w is worker]
                mine = [e for e in mine if e is not None]
                if not mine:
                    continue
                since = max(worker.heartbeat, min(e.assigned_at for e in mine))
                if now - since > self.stall_timeout:
                    self._give_up(worker)

    def _give_up(self, worker: Worker) -> None:
        log.error("worker %s made no progress for %.0f s; taking its jobs away", worker.name, self.stall_timeout)
        self._ready.remove(worker)
        for job_id, (owner, task) in list(self._assigned.items()):
            if owner is not worker:
                continue
            task.cancel()
            del self._assigned[job_id]
            entry = self._running.pop(job_id, None)
            self._started.pop(job_id, None)
            if entry is None:
                continue
            if entry.denoising_started:
                self._emit(JobEvent(job_id, EventKind.FAILED, error="The GPU worker stopped responding in the middle of "
                                                             "this edit. Please try again.",
                                    error_key="errors.worker_stalled", cause=WORKER_LOST))
            else:
                entry.cancel, entry.enqueued_at = threading.Event(), time.monotonic()
                self._queue.push(entry, front=True)
                self._emit(JobEvent(job_id, EventKind.REQUEUED))
        worker.shutdown()
        if self.replace_worker is not None:
            new = self.replace_worker(worker)
            self.workers[self.workers.index(worker)] = new
            self._tasks.append(asyncio.create_task(self._watch_ready(new), name=f"mgie-ready-{new.name}"))
        self._wakeup.set()

    async def _run_one(self, worker: Worker, entry: _Entry) -> None:
        job_id = entry.job.job_id
        self._running[job_id] = entry
        self._started[job_id] = time.monotonic()
        self._emit(JobEvent(job_id, EventKind.STARTED, waited=time.monotonic() - entry.enqueued_at))
        def progress(p: JobProgress) -> None:
            if p.stage is JobStage.DENOISE:
                entry.denoising_started = True
            self._emit(JobEvent(job_id, EventKind.PROGRESS, progress=p))

        try:
            outcome = await worker.run(entry.job, progress, entry.cancel)
        except JobCancelledError:
            self._emit(JobEvent(job_id, EventKind.CANCELLED))
        except MgieError as err:
            self._emit(JobEvent(job_id, EventKind.FAILED, error=str(err), error_key=err.key, error_params=err.params,
                                cause=cause_of(err)))
        except asyncio.CancelledError:
            raise  # the watchdog took the job away (it reports what happens next), or shutdown
        except Exception as err:  # a bug or a device fault must not kill the dispatcher
            log.exception("job %s failed on %s", job_id, worker.name)
            self._emit(JobEvent(job_id, EventKind.FAILED, error=f"Something went wrong on the GPU ({type(err).__name__}).",
                                error_key="errors.job_crashed", error_params={"error": type(err).__name__},
                                cause=cause_of(err)))
        else:
            self._durations.append(outcome.seconds)
            self._emit(JobEvent(job_id, EventKind.DONE, outcome=outcome))
        finally:
            owner = self._assigned.get(job_id)
            if owner is not None and owner[1] is asyncio.current_task():  # not taken away by the watchdog
                del self._assigned[job_id]
                self._running.pop(job_id, None)
                self._started.pop(job_id, None)

    def _emit(self, event: JobEvent) -> None:
        if self._stopped:  # shutting down: a job the worker ends now ("the worker stopped") resumes next start
            return
        result = self.on_event(event)
        if asyncio.iscoroutine(result):
            task = asyncio.ensure_future(result)
            task.add_done_callback(_log_task_error)


def _log_task_error(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("job event handler failed", exc_info=task.exception())
