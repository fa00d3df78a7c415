"""A GPU worker: loads the models once, then runs edits one at a time on its own thread.

The bot talks to workers only through :class:`EditJob`, progress callbacks and :class:`EditOutcome`
(plain data: bytes in, bytes out), so a worker on another host behind a stream is a drop-in later.
GPU work never runs on the event loop: heartbeats stay on time while an edit runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import JobCancelledError, MgieError
from .settings import EngineSettings

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class EditJob:
    job_id: str
    # The encoded input image, or the path of a file holding it (the bot's queued jobs: a path keeps a
    # waiting job's memory small, and the file is already decoded and fitted once at intake).
    image: bytes | str | os.PathLike[str]
    instruction: str
    seed: int
    text_cfg: float
    image_cfg: float
    steps: int
    history: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class JobProgress:
    job_id: str
    stage: str  # "language" | "denoise" | "decode"
    step: int
    total: int


@dataclasses.dataclass(frozen=True)
class EditOutcome:
    job_id: str
    png: bytes
    expressive_instruction: str
    width: int
    height: int
    seconds: float
    timings: dict[str, float]
    llm_cached: bool
    flagged: bool = False  # the optional safety check flagged the output


ProgressCallback = Callable[[JobProgress], None]
BATCH_WINDOW = 0.5  # at most this long an idle worker waits for jobs whose input is still being decoded
# Input decoding and preprocessing, PNG encoding, beside the GPU thread (most of it in C that drops the GIL):
# a burst's 32 inputs must be ready before its language batch starts. Two cores stay for the GPU thread and
# the event loop.
CPU_THREADS = max(2, min(12, (os.cpu_count() or 2) - 2))
PROGRESS_EVERY = 20  # denoising progress events per job (the bot edits its message every 2 s anyway)


@dataclasses.dataclass(eq=False)
class _Task:
    job: EditJob
    progress: Callable[[str, int, int], None]
    cancel: threading.Event | None
    future: concurrent.futures.Future
    started: float = 0.0
    image: Any = None
    llm_cached: bool = False
    expressive: str = ""
    llm_seconds: float = 0.0
    state: Any = None
    flagged: bool = False


class LocalWorker:
    """One device, one thread, many jobs: denoising steps of all running jobs share UNet calls.

    ``start()`` returns at once; models load on the worker thread, and jobs wait in its inbox. Each
    loop admits new jobs (their LLM stage runs as one batch), takes one denoising step for every
    running job (one UNet call per latent size), and finishes the jobs that are done.
    """

    def __init__(self, settings: EngineSettings, name: str = "gpu0",
                 loader: Callable[[EngineSettings], Any] | None = None, max_batch: int | None = None) -> None:
        self.settings, self.name = settings, name
        self._loader = loader
        self.capacity = max_batch or settings.max_batch
        self._inbox: queue.Queue[_Task | None] = queue.Queue()
        self._cpu = concurrent.futures.ThreadPoolExecutor(max_workers=CPU_THREADS, thread_name_prefix=f"mgie-{name}-cpu")
        self._preparing = 0  # jobs handed to run() whose input is still being decoded
        self._preparing_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.state = WorkerState.LOADING
        self.error: str | None = None
        self.pipeline: Any = None
        self.loaded_at: float | None = None
        self.heartbeat = time.monotonic()  # last time the worker made progress; the queue's watchdog reads it
        self.jobs_run = 0
        self.fault_hook: Callable[[str, list[str]], None] | None = None
        self.safety_check: Callable[[Any], bool] | None = None  # image -> flagged; set at load when enabled

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"mgie-{self.name}", daemon=True)
        self._thread.start()

    def _use_device(self) -> None:
        """Make this thread's current CUDA device the worker's, so nothing lands on GPU 0 by default."""
        if self.settings.device.startswith("cuda"):
            import torch

            torch.cuda.set_device(self.settings.torch_device())

    def _load(self) -> None:
        from .models import load_models

        started = time.perf_counter()
        try:
            if self.settings.compile and self.settings.compile_cache_dir:
                # Read by inductor when it compiles: kernels compiled before a restart are reused after it.
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(self.settings.compile_cache_dir)
            models = (self._loader or load_models)(self.settings)
            self.pipeline = self._new_pipeline(models, compile_unet=self.settings.compile)
            if self.pipeline.compiles:
                self._warm_up(models)
            if self.settings.safety_checker:
                from .safety import load_safety_checker

                self.safety_check = load_safety_checker(self.settings, models.device, models.dtype)
        except Exception as err:  # any load failure ends in a state the bot can report
            self.state, self.error = WorkerState.FAILED, str(err) if isinstance(err, MgieError) else repr(err)
            log.exception("worker %s failed to load the models", self.name)
        else:
            self.state, self.loaded_at = WorkerState.READY, time.time()
            log.info("worker %s ready on %s in %.1f s", self.name, models.device, time.perf_counter() - started)
        finally:
            self._ready.set()

    def _new_pipeline(self, models: Any, compile_unet: bool) -> Any:
        from .pipeline import MgiePipeline

        return MgiePipeline(models, max_side=self.settings.max_side, compile_unet=compile_unet,
                            offload=self.settings.offload)

    def _warm_up(self, models: Any) -> None:
        """Compile now, while the bot says "warming up", not in the first users' edits. A compiler that
        fails here would fail every job: run uncompiled instead (slower), and say so."""
        log.info("worker %s: compiling for every class of shape (8 minutes or more the first time on an H100; "
                 "MGIE_COMPILE_CACHE_DIR keeps the kernels across restarts)", self.name)
        started = time.perf_counter()
        try:
            self.pipeline.warm_up(self.capacity)
        except Exception:
            log.exception("worker %s: compiling failed; running without compiled steps (slower)", self.name)
            self._free_memory()
            self.pipeline = self._new_pipeline(models, compile_unet=False)
        else:
            log.info("worker %s: compiled in %.0f s", self.name, time.perf_counter() - started)

    async def wait_ready(self) -> WorkerState:
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait)
        return self.state

    @property
    def random_weights(self) -> bool:
        return bool(self.pipeline and self.pipeline.models.random_weights)

    async def run(self, job: EditJob, on_progress: ProgressCallback | None = None,
                  cancel: threading.Event | None = None) -> EditOutcome:
        """Run one edit; progress callbacks arrive on the caller's event loop."""
        loop = asyncio.get_running_loop()

        def progress(stage: str, step: int, total: int) -> None:
            if on_progress is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(on_progress, JobProgress(job.job_id, stage, step, total))
                except RuntimeError:  # the loop closed meanwhile: nobody is listening any more
                    pass

        future: concurrent.futures.Future = concurrent.futures.Future()
        task = _Task(job=job, progress=progress, cancel=cancel, future=future)
        # Decoding and resizing the input is CPU work: do it here, beside the GPU thread, not on it.
        with self._preparing_lock:
            self._preparing += 1
        try:
            task.image = await loop.run_in_executor(self._cpu, self._prepare_input, job)
        except BaseException:
            with self._preparing_lock:
                self._preparing -= 1
            raise
        with self._preparing_lock:  # at once, so the worker never sees it neither preparing nor queued
            self._inbox.put(task)
            self._preparing -= 1
        return await asyncio.wrap_future(future)

    def _prepare_input(self, job: EditJob) -> Any:
        """Decode and fit the input, then do both stages' CPU preprocessing (``MgiePipeline.prepare``)."""
        from .images import load_image

        try:
            image = load_image(job.image)
            return self.pipeline.fit_and_prepare(image) if self.pipeline is not None else image
        except MgieError as err:
            return err

    # -- the worker thread ---------------------------------------------------------------------------
    def _main(self) -> None:
        _cudagraphs_in_this_thread()
        self._use_device()
        self._load()
        active: list[_Task] = []
        while True:
            self.busy = bool(active)
            admitted = self._take(block=not active, room=self.capacity - len(active))
            self.heartbeat = time.monotonic()
            if admitted is None:
                break
            if self.state is not WorkerState.READY:
                for task in admitted:
                    _fail(task, MgieError(f"The model is not available ({self.error or 'still loading'})."))
                continue
            active += self._admit(admitted)
            active = self._step(active)
        for task in active:
            _fail(task, JobCancelledError("The worker stopped."))

    def _take(self, block: bool, room: int) -> list[_Task] | None:
        """New jobs for this loop: those queued, and when idle, first a wait for one. A job alone starts at
        once; but while jobs already submitted are still being decoded, the worker waits for them (up to
        BATCH_WINDOW), so a burst starts as one batch instead of a job alone followed by the rest."""
        tasks: list[_Task] = []
        if block:
            item = self._inbox.get()
            if item is None:
                return None
            tasks.append(item)
        deadline = time.monotonic() + BATCH_WINDOW
        while len(tasks) < room:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                with self._preparing_lock:
                    preparing, arrived = self._preparing, not self._inbox.empty()
                if arrived:  # came in just now
                    continue
                remaining = deadline - time.monotonic()
                if not (block and preparing and remaining > 0):
                    break
                try:
                    item = self._inbox.get(timeout=min(remaining, 0.01))
                except queue.Empty:
                    continue
            if item is None:  # shutting down: the jobs taken with it won't run
                for task in tasks:
                    _fail(task, JobCancelledError("The worker stopped."))
                return None
            tasks.append(item)
        return tasks

    def _admit(self, tasks: list[_Task]) -> list[_Task]:
        """Decode, run the language model for all new jobs at once, and set up their denoising."""
        from .images import load_image
        from .pipeline import DenoiseJob, EditRequest, PreparedImage, check_request

        pipe, ready = self.pipeline, []
        for task in tasks:
            task.started = time.perf_counter()
            if task.future.set_running_or_notify_cancel() is False:
                continue
            try:
                if isinstance(task.image, MgieError):
                    raise task.image
                request = check_request(EditRequest(image=None, instruction=task.job.instruction, seed=task.job.seed,
                                                    text_cfg=task.job.text_cfg, image_cfg=task.job.image_cfg,
                                                    steps=task.job.steps, history=task.job.history))
                if not isinstance(task.image, PreparedImage):  # decoded before the model was loaded
                    task.image = pipe.fit_and_prepare(task.image or load_image(task.job.image))
                task.job = dataclasses.replace(task.job, instruction=request.instruction, history=request.history)
            except MgieError as err:
                _fail(task, err)
                continue
            task.progress("language", 0, 1)
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
            task.expressive, task.llm_cached, task.llm_seconds = guidance.expressive_instruction, cached, llm_seconds
            jobs.append(DenoiseJob(task.image, guidance.prompt_embeds, task.job.seed, task.job.text_cfg,
                                   task.job.image_cfg, task.job.steps, tag=task))
        try:
            self._fault("start", ready)
            states = pipe.start_denoising_many(jobs)
        except Exception:  # start them one by one, so only a job that fails alone fails
            log.exception("starting %d jobs together failed on %s; starting them one by one", len(jobs), self.name)
            self._free_memory()
            states = []
            for job in jobs:
                try:
                    self._fault("start", [job.tag])
                    states.append(pipe.start_denoising_many([job])[0])
                except Exception as err:
                    log.exception("could not start denoising job %s", job.tag.job.job_id)
                    _fail(job.tag, _user_error(err))
                    states.append(None)
        admitted = []
        for task, state in zip(ready, states, strict=True):
            task.image = None  # its prepared pixels (megabytes a job) are no longer needed
            if state is None:
                continue
            task.state = state
            task.progress("language", 1, 1)
            admitted.append(task)
            self.jobs_run += 1
        return admitted

    def _language(self, tasks: list[_Task]) -> list[tuple[Any, bool] | None]:
        """The language stage for new jobs, as one batch; when the batch fails, each job runs alone, so
        only a job that fails alone fails (``None`` in its place), never the others it was batched with."""
        try:
            self._fault("language", tasks)
            results = self.pipeline.guidance_many([(t.image, t.job.instruction, t.job.history) for t in tasks])
            self.heartbeat = time.monotonic()
            return results
        except Exception as err:
            self._free_memory()
            if len(tasks) == 1:
                log.exception("the language stage of job %s failed on %s", tasks[0].job.job_id, self.name)
                _fail(tasks[0], _user_error(err))
                return [None]
            log.exception("language batch of %d jobs failed on %s; running them one by one", len(tasks), self.name)
        return [self._language([task])[0] for task in tasks]

    def _step(self, active: list[_Task]) -> list[_Task]:
        """One denoising step for every running job; returns those still running."""
        from .pipeline import DECODE_BATCH

        still = []
        for task in active:
            if task.cancel is not None and task.cancel.is_set():
                _fail(task, JobCancelledError("The edit was cancelled."))
            else:
                still.append(task)
        groups: dict[tuple[int, int], list[_Task]] = {}
        for task in still:
            groups.setdefault(task.state.size, []).append(task)
        running = []
        for group in groups.values():
            finished = []
            for done_group in self._step_group(group):
                for task in done_group:
                    index, total = task.state.index, task.state.total
                    if index == total or index % max(1, total // PROGRESS_EVERY) == 0:
                        task.progress("denoise", index, total)
                    (finished if task.state.done else running).append(task)
            for task in finished:
                task.progress("decode", 0, 1)
            self._finish_groups([finished[k:k + DECODE_BATCH] for k in range(0, len(finished), DECODE_BATCH)])
        return running

    def _finish_groups(self, groups: list[list[_Task]]) -> None:
        """VAE-decode groups of finished jobs, each group's decode queued before the one before it is
        collected (``decode_queued``); a group that fails is decoded again one job at a time."""
        queued: list[tuple[list[_Task], Callable[[], list[Any]]]] = []
        for group in groups:
            try:
                self._fault("decode", group)
                queued.append((group, self.pipeline.decode_queued([t.state.latents for t in group])))
            except Exception as err:
                self._decode_failed(group, err)
                continue
            if len(queued) > 1:
                self._collect(*queued.pop(0))
        for group, collect in queued:
            self._collect(group, collect)

    def _collect(self, group: list[_Task], collect: Callable[[], list[Any]]) -> None:
        try:
            images = collect()
        except Exception as err:
            self._decode_failed(group, err)
            return
        self._hand_over(group, images)

    def _decode_failed(self, group: list[_Task], err: Exception) -> None:
        """A group's decode failed: a job alone gets the error; several are decoded again one by one."""
        if len(group) == 1:
            log.exception("decoding job %s failed", group[0].job.job_id)
            _fail(group[0], _user_error(err))
            return
        log.exception("decoding %d jobs together failed; decoding them one by one", len(group))
        self._free_memory()
        for task in group:
            self._finish_groups([[task]])

    def _step_group(self, group: list[_Task]) -> list[list[_Task]]:
        """One UNet call for the group. Out of memory: free what we can and retry each job alone once,
        so one big batch costs a slower step rather than everyone's edit; a job that fails alone fails."""
        try:
            self._fault("step", group)
            self.pipeline.denoise_step([t.state for t in group])
            self.heartbeat = time.monotonic()
            return [group]
        except Exception as err:
            log.exception("denoising step failed on %s (%d jobs)", self.name, len(group))
            self._free_memory()
            if len(group) == 1 or not _is_out_of_memory(err):
                for task in group:
                    _fail(task, _user_error(err))
                return []
        survivors = []
        for task in group:
            try:
                self._fault("retry", [task])
                self.pipeline.denoise_step([task.state])
                survivors.append([task])
            except Exception as err:
                log.exception("job %s failed alone too on %s", task.job.job_id, self.name)
                self._free_memory()
                _fail(task, _user_error(err))
        self.heartbeat = time.monotonic()
        return survivors

    def _fault(self, stage: str, tasks: list[_Task]) -> None:
        """Test hook: lets tests inject GPU faults (out of memory, CUDA errors, hangs) at a stage."""
        if self.fault_hook is not None:
            self.fault_hook(stage, [t.job.job_id for t in tasks])

    def _free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _hand_over(self, tasks: list[_Task], images: list[Any]) -> None:
        """The optional safety check, then each result's PNG encoded and delivered off the GPU thread."""
        for task, image in zip(tasks, images, strict=True):
            try:
                task.flagged = bool(self.safety_check(image)) if self.safety_check is not None else False
            except Exception as err:
                log.exception("the safety check of job %s failed", task.job.job_id)
                _fail(task, _user_error(err))
                continue
            task.state = None  # free the latents now; the PNG is encoded off the GPU thread
            try:
                self._cpu.submit(self._deliver, task, image)
            except RuntimeError:  # shutting down: no pool any more, finish here
                self._deliver(task, image)

    def _deliver(self, task: _Task, image: Any) -> None:
        from .images import encode_png

        try:
            png = encode_png(image)
        except Exception as err:
            _fail(task, _user_error(err))
            return
        seconds = time.perf_counter() - task.started
        if not task.future.done():
            task.future.set_result(EditOutcome(
                job_id=task.job.job_id, png=png, expressive_instruction=task.expressive, width=image.width,
                height=image.height, seconds=seconds, timings={"llm": task.llm_seconds, "total": seconds},
                llm_cached=task.llm_cached, flagged=task.flagged))

    def info(self) -> dict[str, Any]:
        """Device and memory, for /mgie status."""
        out: dict[str, Any] = {"name": self.name, "state": self.state.value, "error": self.error,
                               "max_batch": self.capacity}
        if self.pipeline is None:
            return out
        import torch

        device = self.pipeline.models.device
        out["device"] = str(device)
        out["dtype"] = str(self.pipeline.models.dtype).removeprefix("torch.")
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            out["memory"] = f"{(total - free) / 2**30:.1f} / {total / 2**30:.1f} GiB"
        return out

    def shutdown(self) -> None:
        self._inbox.put(None)
        self._cpu.shutdown(wait=False, cancel_futures=True)


class WorkerPool:
    """Every local worker, one per device: what the bot sees of the engine."""

    def __init__(self, workers: list[LocalWorker]) -> None:
        if not workers:
            raise ValueError("a pool needs at least one worker")
        self.workers = workers

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> WorkerPool:
        return cls([LocalWorker(dataclasses.replace(settings, device=d), name=d) for d in settings.device_list()])

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    @property
    def state(self) -> WorkerState:
        states = {w.state for w in self.workers}
        if WorkerState.READY in states:
            return WorkerState.READY
        return WorkerState.LOADING if WorkerState.LOADING in states else WorkerState.FAILED

    @property
    def error(self) -> str | None:
        return next((w.error for w in self.workers if w.error), None)

    @property
    def random_weights(self) -> bool:
        return any(w.random_weights for w in self.workers)

    def info(self) -> list[dict[str, Any]]:
        return [w.info() for w in self.workers]

    def replace(self, worker: LocalWorker) -> LocalWorker:
        """A fresh worker (same device and settings) for one that stopped responding; it loads again."""
        fresh = LocalWorker(worker.settings, name=f"{worker.name}+", loader=worker._loader,
                            max_batch=worker.capacity)
        fresh.fault_hook = None
        self.workers[self.workers.index(worker)] = fresh
        fresh.start()
        return fresh

    def shutdown(self) -> None:
        for worker in self.workers:
            worker.shutdown()


def _cudagraphs_in_this_thread() -> None:
    """Compiled models replay CUDA graphs kept in thread-local state, which PyTorch before 2.13 sets up
    only for threads it starts itself; set it up for this worker thread the same way."""
    import collections

    import torch

    try:
        from torch._inductor import cudagraph_trees as trees
    except ImportError:
        return
    if hasattr(trees, "_initialize_tls") or torch._C._is_key_in_tls("tree_manager_containers"):
        return  # PyTorch initializes it lazily itself
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = collections.defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", trees.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", trees.local.tree_manager_locks)


def _fail(task: _Task, err: BaseException) -> None:
    if not task.future.done():
        task.future.set_exception(err)


def _is_out_of_memory(err: BaseException) -> bool:
    return "out of memory" in str(err).lower()


def _user_error(err: BaseException) -> MgieError:
    """Errors from inside the models become a message fit for the user; details go to the log."""
    if isinstance(err, MgieError):
        return err
    if _is_out_of_memory(err):
        return MgieError("The GPU ran out of memory for this edit; try a smaller image or fewer steps.")
    return MgieError(f"Something went wrong on the GPU ({type(err).__name__}); the error is logged.")
