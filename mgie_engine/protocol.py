"""What crosses the worker boundary: jobs in, progress and outcomes out, and the worker protocol itself.

All plain data (bytes in, bytes out), so a worker on another host behind a stream is a drop-in: the bot's
queue (bot/queue.py) needs nothing of a worker but :class:`Worker`.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable


class WorkerState(enum.Enum):
    """Where a worker is in its life: loading, ready, or failed to load."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class JobStage(enum.StrEnum):
    """The stage a progress event reports; compares equal to its value ("denoise" == JobStage.DENOISE)."""

    LANGUAGE = "language"
    DENOISE = "denoise"
    DECODE = "decode"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class EditJob:
    """One edit as the bot hands it to a worker."""

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
    previews: bool = False  # send a small preview of the image with progress every few seconds (previews.py)


@dataclasses.dataclass(frozen=True)
class JobProgress:
    """How far a job is: ``step`` of ``total`` in ``stage``; ``preview`` a small JPEG of the image so far
    (only for jobs that asked for previews, every few seconds)."""

    job_id: str
    stage: JobStage
    step: int
    total: int
    preview: bytes | None = None


@dataclasses.dataclass(frozen=True)
class EditOutcome:
    """A finished edit: the PNG and what made it."""

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


@runtime_checkable
class Worker(Protocol):
    """A worker as the queue sees it: local (worker.py) or, later, on another host."""

    name: str
    capacity: int  # jobs it runs at once
    state: WorkerState
    error: str | None  # why it failed to load, if it did
    heartbeat: float  # time.monotonic() of its last progress; the queue's watchdog reads it

    def start(self) -> None:
        """Begin loading; returns at once (``wait_ready`` says when it is done)."""

    async def wait_ready(self) -> WorkerState:
        """Until loading has finished (ready) or failed."""

    async def run(self, job: EditJob, on_progress: ProgressCallback | None = None,
                  cancel: threading.Event | None = None) -> EditOutcome:
        """Run one edit; setting ``cancel`` ends it with ``JobCancelledError``."""

    def info(self) -> dict[str, Any]:
        """Device and memory, for /mgie status."""

    def shutdown(self) -> None:
        """Stop taking jobs; the jobs it holds end with ``JobCancelledError``."""

    def join(self, timeout: float) -> bool:
        """After ``shutdown``: wait (blocking) up to ``timeout`` s for its threads to end; whether they did."""
