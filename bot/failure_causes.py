"""Why a job failed, as one of a few fixed words: the ``cause`` label of the failures metric.

Never the error's text: a label takes a bounded set of values, or every distinct message becomes a new
time series in the host's Prometheus. Kept apart from :mod:`bot.metrics` so the queue can name causes
without importing the metrics library.
"""

from __future__ import annotations

BAD_INPUT = "bad_input"  # the image or the options cannot be edited (the user's to fix)
ENGINE_ERROR = "engine_error"  # the model or the GPU failed (out of memory, a device error, a bug)
WORKER_LOST = "worker_lost"  # the worker stopped responding mid-edit (the queue's watchdog gave up on it)
STORAGE = "storage"  # the bot's disk: the input image is gone, or the result could not be written
DEAD_LETTER = "dead_letter"  # Redis pool: the job stopped its workers too often and was set aside
QUEUE_FULL = "queue_full"  # a job a restart had to resume found the queue full
FAILURE_CAUSES = (BAD_INPUT, ENGINE_ERROR, WORKER_LOST, STORAGE, DEAD_LETTER, QUEUE_FULL)


def cause_of(err: BaseException) -> str:
    """The cause word for an exception that failed a job.

    An error names its cause in a ``failure_cause`` attribute (``mgie_engine.errors``: bad images and
    requests; the Redis pool's dead letters; a worker's error as it sent it); otherwise an ``OSError`` is
    the disk's and anything else an engine error.
    """
    declared = getattr(err, "failure_cause", None)
    if declared in FAILURE_CAUSES:
        return declared
    if isinstance(err, OSError):
        return STORAGE
    return ENGINE_ERROR
