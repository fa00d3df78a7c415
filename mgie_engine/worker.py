"""A GPU worker: loads the models once, then runs many jobs at once on its own thread.

The bot talks to workers only through the types in protocol.py (plain data: bytes in, bytes out), so a
worker on another host behind a stream is a drop-in later. GPU work never runs on the event loop:
heartbeats stay on time while an edit runs. The thread's loop is worker_loop.py; loading, lifecycle.py;
serving eagerly while compiling in the background, serving_modes.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import MgieError
from .inbox import Inbox
from .lifecycle import SafetyCheck, load, prepare_thread
from .protocol import EditJob, EditOutcome, JobProgress, JobStage, ProgressCallback, WorkerState
from .serving_modes import ServingModes
from .settings import EngineSettings
from .worker_loop import BatchLoop, Task

if TYPE_CHECKING:
    from .compile_child import ChildLauncher
    from .inputs import ImageInput
    from .models import MgieModels
    from .pipeline import MgiePipeline

log = logging.getLogger(__name__)

# Input decoding and preprocessing, PNG encoding, beside the GPU thread (most of it in C that drops the GIL):
# a burst's 32 inputs must be ready before its language batch starts. Two cores stay for the GPU thread and
# the event loop.
CPU_THREADS = max(2, min(12, (os.cpu_count() or 2) - 2))


class LocalWorker:
    """One device, one thread, many jobs: denoising steps of all running jobs share UNet calls.

    ``start()`` returns at once; models load on the worker thread, and jobs wait in its inbox. Implements
    ``protocol.Worker``.
    """

    def __init__(self, settings: EngineSettings, name: str = "gpu0",
                 loader: Callable[[EngineSettings], MgieModels] | None = None, max_batch: int | None = None,
                 compile_child: ChildLauncher | None = None) -> None:
        self.settings, self.name = settings, name
        self.loader = loader
        self.compile_child = compile_child  # how to start a compile child (compile_child.py); None: the default
        self.capacity = max_batch or settings.max_batch
        self.inbox = Inbox()
        # This worker's own CPU threads: shutting down cancels the input work still queued for it.
        self.cpu = concurrent.futures.ThreadPoolExecutor(max_workers=CPU_THREADS, thread_name_prefix=f"mgie-{name}-cpu")
        self.loop = BatchLoop(self)
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.state = WorkerState.LOADING
        self.error: str | None = None
        self.pipeline: MgiePipeline | None = None  # the one serving now (eager while the compiled one warms up)
        self.modes = ServingModes()
        self.heartbeat = time.monotonic()  # last time the worker made progress; the queue's watchdog reads it
        self.safety_check: SafetyCheck | None = None  # set at load when enabled

    def start(self) -> None:
        """Start the worker thread; the models load on it (``wait_ready`` says when they have)."""
        self._thread = threading.Thread(target=self._main, name=f"mgie-{self.name}", daemon=True)
        self._thread.start()

    async def wait_ready(self) -> WorkerState:
        """Until the models have loaded (READY) or failed to (FAILED, with ``error`` saying why)."""
        await asyncio.get_running_loop().run_in_executor(None, self._ready.wait)
        return self.state

    async def wait_compiled(self) -> str:
        """Until the background compile has ended (at once when there is none); returns the mode
        (``serving_modes``: "compiled", "eager (compile failed)", "eager")."""
        await asyncio.get_running_loop().run_in_executor(None, self.modes.settled.wait)
        return self.modes.mode

    @property
    def random_weights(self) -> bool:
        """Whether this worker runs the random-weight tiny checkpoints."""
        return bool(self.pipeline and self.pipeline.models.random_weights)

    async def run(self, job: EditJob, on_progress: ProgressCallback | None = None,
                  cancel: threading.Event | None = None) -> EditOutcome:
        """Run one edit; progress callbacks arrive on the caller's event loop."""
        loop = asyncio.get_running_loop()

        def progress(stage: JobStage, step: int, total: int, preview: bytes | None = None) -> None:
            if on_progress is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(on_progress, JobProgress(job.job_id, stage, step, total, preview))
                except RuntimeError:  # the loop closed meanwhile: nobody is listening any more
                    pass

        future: concurrent.futures.Future = concurrent.futures.Future()
        task = Task(job=job, progress=progress, cancel=cancel, future=future)
        # Decoding and resizing the input is CPU work: do it here, beside the GPU thread, not on it.
        with self.inbox.preparing():
            try:
                task.image = await loop.run_in_executor(self.cpu, self._prepare_input, job)
            except MgieError as err:
                task.input_error = err
        self.inbox.put_prepared(task)
        return await asyncio.wrap_future(future)

    def _prepare_input(self, job: EditJob) -> ImageInput:
        """Decode and fit the input, then do both stages' CPU preprocessing (``MgiePipeline.prepare``)."""
        from .images import load_image

        image = load_image(job.image)
        return self.pipeline.fit_and_prepare(image) if self.pipeline is not None else image

    def _main(self) -> None:
        prepare_thread(self.settings)
        self._load()
        self.loop.run()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.safety_check = load(self.settings, self.name, self.capacity, self.loader, self._use_pipeline,
                                     self.modes, self.compile_child)
        except Exception as err:  # any load failure ends in a state the bot can report
            self.state, self.error = WorkerState.FAILED, str(err) if isinstance(err, MgieError) else repr(err)
            log.exception("worker %s failed to load the models", self.name)
            self.modes.stop.set()  # a compile started before the failure stops too
            self.modes.kill_child()
            self.modes.eager_only()
        else:
            self.state = WorkerState.READY
            log.info("worker %s ready on %s in %.1f s", self.name, self.pipeline.models.device,
                     time.perf_counter() - started)
        finally:
            self._ready.set()

    def _use_pipeline(self, pipeline: MgiePipeline) -> None:
        self.pipeline = pipeline

    def info(self) -> dict[str, Any]:
        """Device, memory and mode (eager, compiling, compiled; compiles during service), for /mgie status."""
        out: dict[str, Any] = {"name": self.name, "state": self.state.value, "error": self.error,
                               "max_batch": self.capacity}
        if self.pipeline is None:
            return out
        out.update(self.modes.info())
        import torch

        device = self.pipeline.models.device
        out["device"] = str(device)
        out["dtype"] = str(self.pipeline.models.dtype).removeprefix("torch.")
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            out["memory"] = f"{(total - free) / 2**30:.1f} / {total / 2**30:.1f} GiB"
        return out

    def shutdown(self) -> None:
        """Stop the thread after its current step, and a background compile after its current warm-up
        batch (a compile child at once); queued input work is cancelled."""
        self.inbox.stop()
        self.modes.stop.set()
        self.modes.kill_child()
        self.cpu.shutdown(wait=False, cancel_futures=True)

    def join(self, timeout: float) -> bool:
        """Wait for the worker thread to end its current step and stop (and the compile thread, if any). A
        process must not exit while a thread is inside a torch call: that aborts it ("terminate called
        without an active exception")."""
        deadline = time.monotonic() + timeout
        self.modes.kill_child()
        threads = [t for t in (self._thread, self.modes.thread) if t is not None]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)
