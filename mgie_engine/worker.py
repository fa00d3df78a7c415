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
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import MgieError
from .settings import EngineSettings

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class EditJob:
    job_id: str
    image: bytes  # the encoded input image, as uploaded
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


ProgressCallback = Callable[[JobProgress], None]


class LocalWorker:
    """One device, one thread. ``start()`` returns at once; models load in the background."""

    def __init__(self, settings: EngineSettings, name: str = "gpu0",
                 loader: Callable[[EngineSettings], Any] | None = None) -> None:
        self.settings, self.name = settings, name
        self._loader = loader
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mgie-{name}")
        self._ready = threading.Event()
        self.state = WorkerState.LOADING
        self.error: str | None = None
        self.pipeline: Any = None
        self.loaded_at: float | None = None

    def start(self) -> concurrent.futures.Future:
        return self._executor.submit(self._load)

    def _load(self) -> None:
        from .models import load_models
        from .pipeline import MgiePipeline

        started = time.perf_counter()
        try:
            models = (self._loader or load_models)(self.settings)
            self.pipeline = MgiePipeline(models, max_side=self.settings.max_side)
        except Exception as err:  # any load failure ends in a state the bot can report
            self.state, self.error = WorkerState.FAILED, str(err) if isinstance(err, MgieError) else repr(err)
            log.exception("worker %s failed to load the models", self.name)
        else:
            self.state, self.loaded_at = WorkerState.READY, time.time()
            log.info("worker %s ready on %s in %.1f s", self.name, models.device, time.perf_counter() - started)
        finally:
            self._ready.set()

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
            if on_progress is not None:
                loop.call_soon_threadsafe(on_progress, JobProgress(job.job_id, stage, step, total))

        return await loop.run_in_executor(self._executor, self._run, job, progress, cancel)

    def _run(self, job: EditJob, progress: Callable[[str, int, int], None],
             cancel: threading.Event | None) -> EditOutcome:
        from .images import encode_png, load_image
        from .pipeline import EditRequest

        if self.state is not WorkerState.READY:
            raise MgieError(f"The model is not available ({self.error or 'still loading'}).")
        started = time.perf_counter()
        image = load_image(job.image)
        result = self.pipeline(EditRequest(image=image, instruction=job.instruction, seed=job.seed,
                                           text_cfg=job.text_cfg, image_cfg=job.image_cfg, steps=job.steps,
                                           history=job.history), progress=progress, cancel=cancel)
        png = encode_png(result.image)
        return EditOutcome(job_id=job.job_id, png=png, expressive_instruction=result.expressive_instruction,
                           width=result.width, height=result.height, seconds=time.perf_counter() - started,
                           timings=result.timings, llm_cached=result.llm_cached)

    def info(self) -> dict[str, Any]:
        """Device and memory, for /mgie status."""
        out: dict[str, Any] = {"name": self.name, "state": self.state.value, "error": self.error}
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
        self._executor.shutdown(wait=False, cancel_futures=True)
