"""Every local worker, one per device: what the bot sees of the engine."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from .protocol import WorkerState
from .settings import EngineSettings
from .worker import LocalWorker


class WorkerPool:
    """The local workers, their combined state, and fresh workers for ones that stopped responding."""

    def __init__(self, workers: list[LocalWorker]) -> None:
        if not workers:
            raise ValueError("a pool needs at least one worker")
        self.workers = workers

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> WorkerPool:
        """One worker per configured device."""
        return cls([LocalWorker(dataclasses.replace(settings, device=d), name=d) for d in settings.device_list()])

    def start(self) -> None:
        """Start every worker loading."""
        for worker in self.workers:
            worker.start()

    @property
    def state(self) -> WorkerState:
        """READY when any worker is, LOADING while any loads, else FAILED."""
        states = {w.state for w in self.workers}
        if WorkerState.READY in states:
            return WorkerState.READY
        return WorkerState.LOADING if WorkerState.LOADING in states else WorkerState.FAILED

    @property
    def error(self) -> str | None:
        """The first worker error, if any."""
        return next((w.error for w in self.workers if w.error), None)

    @property
    def random_weights(self) -> bool:
        """Whether any worker runs the random-weight tiny checkpoints."""
        return any(w.random_weights for w in self.workers)

    def info(self) -> list[dict[str, Any]]:
        """Each worker's ``info()``."""
        return [w.info() for w in self.workers]

    def replace(self, worker: LocalWorker) -> LocalWorker:
        """A fresh worker (same device and settings) for one that stopped responding; it loads again."""
        fresh = LocalWorker(worker.settings, name=f"{worker.name}+", loader=worker.loader, max_batch=worker.capacity)
        self.workers[self.workers.index(worker)] = fresh
        fresh.start()
        return fresh

    def shutdown(self) -> None:
        """Stop every worker."""
        for worker in self.workers:
            worker.shutdown()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s in all for every worker's thread to end."""
        deadline = time.monotonic() + timeout
        return all([worker.join(max(0.0, deadline - time.monotonic())) for worker in self.workers])
