"""A worker's inbox: jobs handed in, and a count of those whose input is still being decoded."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .errors import JobCancelledError
from .faults import fail

if TYPE_CHECKING:
    from .worker_loop import Task

BATCH_WINDOW = 0.5  # at most this long an idle worker waits for jobs whose input is still being decoded


class Inbox:
    """Tasks for the worker thread; ``None`` put in it stops the thread."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Task | None] = queue.Queue()
        self._preparing = 0  # jobs handed to run() whose input is still being decoded
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Count a job as on its way while its input is decoded (``take`` waits for it)."""
        with self._lock:
            self._preparing += 1
        try:
            yield
        except BaseException:
            with self._lock:
                self._preparing -= 1
            raise

    def put_prepared(self, task: Task) -> None:
        """Hand in a job counted by ``preparing``: at once, so it is never seen neither preparing nor queued."""
        with self._lock:
            self.queue.put(task)
            self._preparing -= 1

    def stop(self) -> None:
        """Make the worker thread stop after its current loop."""
        self.queue.put(None)

    def take(self, block: bool, room: int) -> list[Task] | None:
        """New jobs for this loop: those queued, and when idle, first a wait for one. A job alone starts at
        once; but while jobs already submitted are still being decoded, the worker waits for them (up to
        BATCH_WINDOW), so a burst starts as one batch instead of a job alone followed by the rest.
        ``None``: the inbox was stopped (jobs taken with the stop signal are failed, not lost)."""
        tasks: list[Task] = []
        if block:
            item = self.queue.get()
            if item is None:
                return None
            tasks.append(item)
        deadline = time.monotonic() + BATCH_WINDOW
        while len(tasks) < room:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                with self._lock:
                    preparing, arrived = self._preparing, not self.queue.empty()
                if arrived:  # came in just now
                    continue
                remaining = deadline - time.monotonic()
                if not (block and preparing and remaining > 0):
                    break
                try:
                    item = self.queue.get(timeout=min(remaining, 0.01))
                except queue.Empty:
                    continue
            if item is None:  # shutting down: the jobs taken with it won't run
                for task in tasks:
                    fail(task.future, JobCancelledError("The worker stopped."))
                return None
            tasks.append(item)
        return tasks
