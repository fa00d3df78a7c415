"""The worker thread's batch loop: admit new jobs, step every running job, finish those that are done.

Each loop admits new jobs (their language stage runs as one batch, their denoising starts as one),
takes one denoising step for every running job (one call per latent size), and VAE-decodes the jobs
that are done in groups, each group's decode queued before the one before it is collected. Failures
follow the fault policy in faults.py. While the compiled pipeline warms up in the background, each
loop's GPU work is one turn on the device, and the loop moves to the compiled pipeline at the top of the
loop after it is ready (serving_modes.py).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import PIL.Image

from . import device_turns
from .denoiser import DenoiseJob, DenoiseState
from .errors import JobCancelledError, MgieError
from .faults import fail, free_memory, is_out_of_memory, user_error
from .inputs import Prompt
from .language import Guidance
from .previews import PendingPreview, PreviewThrottle, encode_preview, start_preview
from .protocol import EditJob, EditOutcome, JobStage, WorkerState
from .vae import DECODE_BATCH

if TYPE_CHECKING:
    from .inputs import ImageInput
    from .worker import LocalWorker

log = logging.getLogger(__name__)

PROGRESS_EVERY = 20  # denoising progress events per job (the bot edits its message every 2 s anyway)


@dataclasses.dataclass(eq=False)
class Task:
    """One job inside a worker, from hand-in to delivery."""

    job: EditJob
    progress: Callable[..., None]  # (stage, step, total, preview=None)
    cancel: threading.Event | None
    future: concurrent.futures.Future
    image: ImageInput | None = None  # the decoded input; prepared for both stages once a model is loaded
    output_size: tuple[int, int] | None = None  # (width, height) the result is delivered at (None: as decoded)
    input_error: MgieError | None = None  # why the input cannot be edited (reported when the job is admitted)
    started: float = 0.0
    guidance: Guidance | None = None
    llm_cached: bool = False
    llm_seconds: float = 0.0
    state: DenoiseState | None = None  # while denoising
    flagged: bool = False
    previews: PreviewThrottle | None = None  # while denoising, for a job that asked for previews


class BatchLoop:
    """The body of one worker's thread (``run``), over the worker's inbox and pipeline."""

    def __init__(self, worker: LocalWorker) -> None:
        self.worker = worker

    @property
    def _name(self) -> str:
        return self.worker.name

    def run(self) -> None:
        """Until the inbox is stopped; jobs still running then end with ``JobCancelledError``."""
        worker = self.worker
        worker.modes.serving_from(threading.get_ident())
        active: list[Task] = []
        while True:
            idle = not active
            if idle:  # a compile starting now needs not wait for this loop (ServingModes.wait_for_loop_boundary)
                worker.modes.loop_idle(True)
            admitted = worker.inbox.take(block=idle, room=worker.capacity - len(active))
            if idle:
                worker.modes.loop_idle(False)
            worker.heartbeat = time.monotonic()
            if admitted is None:
                break
            if worker.state is not WorkerState.READY:
                for task in admitted:
                    fail(task.future, MgieError(f"The model is not available ({worker.error or 'still loading'})."))
                continue
            self._switch_mode()
            with device_turns.serving(worker.pipeline.models.device):
                active += self.admit(admitted)
                active = self._step(active)
            worker.modes.loop_done()
        for task in active:
            fail(task.future, JobCancelledError("The worker stopped."))

    def _switch_mode(self) -> None:
        """Serve with the compiled pipeline from this loop on, once its warm-up has run: running jobs take
        their next step compiled (a denoising state is the same for both)."""
        compiled = self.worker.modes.take_compiled()
        if compiled is not None:
            self.worker.pipeline = compiled
            log.info("worker %s: serving compiled from now on", self._name)

    # -- admitting: checks, the language stage, the start of denoising -------------------------------
    def admit(self, tasks: list[Task]) -> list[Task]:
        """Check, run the language model for all new jobs at once, and set up their denoising."""
        from .images import load_image
        from .inputs import PreparedImage
        from .pipeline import EditRequest, check_request

        pipe, ready = self.worker.pipeline, []
        for task in tasks:
            task.started = time.perf_counter()
            if task.future.set_running_or_notify_cancel() is False:
                continue
            try:
                if task.input_error is not None:
                    raise task.input_error
                request = check_request(EditRequest(image=None, instruction=task.job.instruction, seed=task.job.seed,
                                                    text_cfg=task.job.text_cfg, image_cfg=task.job.image_cfg,
                                                    steps=task.job.steps, history=task.job.history))
                if not isinstance(task.image, PreparedImage):  # decoded before the model was loaded
                    task.image = pipe.fit_and_prepare(task.image or load_image(task.job.image))
                task.output_size = task.image.delivered_size  # the fitted size; the working one may round it
                task.job = dataclasses.replace(task.job, instruction=request.instruction, history=request.history)
            except MgieError as err:
                fail(task.future, err)
                continue
            task.progress(JobStage.LANGUAGE, 0, 1)
            ready.append(task)
        if not ready:
            return []
        started = time.perf_counter()
        results = self._language(ready)
        llm_seconds = time.perf_counter() - started
        ready = [task for task, result in zip(ready, results, strict=True) if result is not None]
        results = [result for result in results if result is not None]
        if not ready:
            return []
        jobs = []
        for task, (guidance, cached) in zip(ready, results, strict=True):
            task.guidance, task.llm_cached, task.llm_seconds = guidance, cached, llm_seconds
            jobs.append(DenoiseJob(task.image, guidance.prompt_embeds, task.job.seed, task.job.text_cfg,
                                   task.job.image_cfg, task.job.steps, tag=task))
        states = self._start(jobs)
        admitted = []
        for task, state in zip(ready, states, strict=True):
            task.image = None  # its prepared pixels (megabytes a job) are no longer needed
            if state is None:
                continue
            task.state = state
            interval = self.worker.settings.preview_seconds
            if task.job.previews and interval > 0:
                task.previews = PreviewThrottle(interval)
            task.progress(JobStage.LANGUAGE, 1, 1)
            admitted.append(task)
        return admitted

    def _language(self, tasks: list[Task]) -> list[tuple[Guidance, bool] | None]:
        """The language stage for new jobs, as one batch; when the batch fails, each job runs alone, so
        only a job that fails alone fails (``None`` in its place), never the others it was batched with."""
        try:
            results = self.worker.pipeline.guidance([Prompt(t.image, t.job.instruction, t.job.history)
                                                     for t in tasks])
            self.worker.heartbeat = time.monotonic()
            return results
        except Exception as err:
            # logged before the memory is freed: the error is on record even if freeing it fails
            if len(tasks) == 1:
                log.exception("the language stage of job %s failed on %s", tasks[0].job.job_id, self._name)
                free_memory()
                fail(tasks[0].future, user_error(err))
                return [None]
            log.exception("language batch of %d jobs failed on %s; running them one by one", len(tasks), self._name)
            free_memory()
        return [self._language([task])[0] for task in tasks]

    def _start(self, jobs: list[DenoiseJob]) -> list[DenoiseState | None]:
        """Start denoising all jobs at once; if that fails, one by one, so only a job that fails alone
        fails (``None`` in its place)."""
        pipe = self.worker.pipeline
        try:
            return pipe.start_denoising(jobs)
        except Exception:
            log.exception("starting %d jobs together failed on %s; starting them one by one", len(jobs), self._name)
            free_memory()
        states: list[DenoiseState | None] = []
        for job in jobs:
            try:
                states.append(pipe.start_denoising([job])[0])
            except Exception as err:
                log.exception("could not start denoising job %s", job.tag.job.job_id)
                fail(job.tag.future, user_error(err))
                states.append(None)
        return states

    # -- stepping --------------------------------------------------------------------------------------
    def _step(self, active: list[Task]) -> list[Task]:
        """One denoising step for every running job; returns those still running."""
        still = []
        for task in active:
            if task.cancel is not None and task.cancel.is_set():
                fail(task.future, JobCancelledError("The edit was cancelled."))
            else:
                still.append(task)
        groups: dict[tuple[int, int], list[Task]] = {}
        for task in still:
            groups.setdefault(task.state.size, []).append(task)
        running = []
        for group in groups.values():
            finished = []
            for stepped in self._step_group(group):
                for task in stepped:
                    index, total = task.state.index, task.state.total
                    if index == total or index % max(1, total // PROGRESS_EVERY) == 0:
                        task.progress(JobStage.DENOISE, index, total)
                    (finished if task.state.done else running).append(task)
                    if not task.state.done and task.previews is not None and task.previews.ready():
                        self._preview(task)
            for task in finished:
                task.progress(JobStage.DECODE, 0, 1)
            self._finish_groups([finished[k:k + DECODE_BATCH] for k in range(0, len(finished), DECODE_BATCH)])
        return running

    def _preview(self, task: Task) -> None:
        """Queue a preview of the job's latents (GPU work of a few microseconds); it is encoded and sent
        with a progress event from a CPU thread. Best effort: a preview that fails is skipped."""
        state = task.state
        try:
            sigmas = getattr(state.scheduler, "sigmas", None)
            scale = (sigmas[state.index] ** 2 + 1) ** 0.5 if sigmas is not None and state.index < len(sigmas) else 1.0
            like = task.output_size[::-1] if task.output_size is not None else None  # (height, width)
            pending = start_preview(state.latents, scale, like=like)
            self.worker.cpu.submit(_send_preview, task, pending, state.index, state.total)
        except Exception:
            log.warning("preview of job %s failed", task.job.job_id, exc_info=True)

    def _step_group(self, group: list[Task]) -> list[list[Task]]:
        """One UNet call for the group. Out of memory: free what we can and retry each job alone once,
        so one big batch costs a slower step rather than everyone's edit; a job that fails alone fails."""
        pipe = self.worker.pipeline
        try:
            pipe.denoise_step([t.state for t in group])
            self.worker.heartbeat = time.monotonic()
            return [group]
        except Exception as err:
            log.exception("denoising step failed on %s (%d jobs)", self._name, len(group))
            free_memory()
            if len(group) == 1 or not is_out_of_memory(err):
                for task in group:
                    fail(task.future, user_error(err))
                return []
        survivors = []
        for task in group:
            try:
                pipe.denoise_step([task.state])
                survivors.append([task])
            except Exception as err:
                log.exception("job %s failed alone too on %s", task.job.job_id, self._name)
                free_memory()
                fail(task.future, user_error(err))
        self.worker.heartbeat = time.monotonic()
        return survivors

    # -- finishing: VAE decode, safety check, PNG ------------------------------------------------------
    def _finish_groups(self, groups: list[list[Task]]) -> None:
        """VAE-decode groups of finished jobs, each group's decode queued before the one before it is
        collected (``decode_queued``); a group that fails is decoded again one job at a time."""
        queued: list[tuple[list[Task], Callable[[], list[PIL.Image.Image]]]] = []
        for group in groups:
            try:
                queued.append((group, self.worker.pipeline.decode_queued([t.state.latents for t in group])))
            except Exception as err:
                self._decode_failed(group, err)
                continue
            if len(queued) > 1:
                self._collect(*queued.pop(0))
        for group, collect in queued:
            self._collect(group, collect)

    def _collect(self, group: list[Task], collect: Callable[[], list[PIL.Image.Image]]) -> None:
        try:
            images = collect()
        except Exception as err:
            self._decode_failed(group, err)
            return
        self._hand_over(group, images)

    def _decode_failed(self, group: list[Task], err: Exception) -> None:
        """A group's decode failed: a job alone gets the error; several are decoded again one by one."""
        if len(group) == 1:
            log.exception("decoding job %s failed", group[0].job.job_id)
            fail(group[0].future, user_error(err))
            return
        log.exception("decoding %d jobs together failed; decoding them one by one", len(group))
        free_memory()
        for task in group:
            self._finish_groups([[task]])

    def _hand_over(self, tasks: list[Task], images: list[PIL.Image.Image]) -> None:
        """The optional safety check, then each result's PNG encoded and delivered off the GPU thread."""
        safety_check = self.worker.safety_check
        for task, image in zip(tasks, images, strict=True):
            try:
                task.flagged = bool(safety_check(image)) if safety_check is not None else False
            except Exception as err:
                log.exception("the safety check of job %s failed", task.job.job_id)
                fail(task.future, user_error(err))
                continue
            task.state = None  # free the latents now; the PNG is encoded off the GPU thread
            try:
                self.worker.cpu.submit(_deliver, task, image)
            except RuntimeError:  # shutting down: no pool any more, finish here
                _deliver(task, image)


def _send_preview(task: Task, pending: PendingPreview, step: int, total: int) -> None:
    """Encode a preview and send it with a progress event (on a CPU thread); never once the job has ended."""
    try:
        data = encode_preview(pending.wait())
    except Exception:
        log.warning("encoding the preview of job %s failed", task.job.job_id, exc_info=True)
        return
    if not task.future.done():
        task.progress(JobStage.DENOISE, step, total, preview=data)


def _deliver(task: Task, image: PIL.Image.Image) -> None:
    """Resize the result back to the fitted size (from the working grid, ``images.snap_size``), encode its
    PNG and end the job's future with its outcome (on a CPU thread: the resize costs milliseconds)."""
    from .png import encode_png

    try:
        if task.output_size is not None and image.size != task.output_size:
            image = image.resize(task.output_size, PIL.Image.Resampling.LANCZOS)
        png = encode_png(image)
    except Exception as err:
        fail(task.future, user_error(err))
        return
    seconds = time.perf_counter() - task.started
    if not task.future.done():
        task.future.set_result(EditOutcome(
            job_id=task.job.job_id, png=png, expressive_instruction=task.guidance.expressive_instruction,
            width=image.width, height=image.height, seconds=seconds,
            timings={"llm": task.llm_seconds, "total": seconds}, llm_cached=task.llm_cached, flagged=task.flagged))
