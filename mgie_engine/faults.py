"""The worker's fault policy: what a user is told when the GPU fails, and what one failure may cost.

A batched call that fails is retried one job at a time (out of memory in a denoising step: each job
alone, once), so only a job that fails alone fails, never the others it was batched with. Errors from
inside the models reach the user as a short message; the details go to the log.
"""

from __future__ import annotations

import concurrent.futures
import gc

from .errors import MgieError


def fail(future: concurrent.futures.Future, err: BaseException) -> None:
    """End a job's future with ``err``, unless it already ended."""
    if not future.done():
        future.set_exception(err)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error (CUDA's or the allocator's message)."""
    return "out of memory" in str(err).lower()


def user_error(err: BaseException) -> MgieError:
    """Errors from inside the models become a message fit for the user; details go to the log."""
    if isinstance(err, MgieError):
        return err
    if is_out_of_memory(err):
        return MgieError("The GPU ran out of memory for this edit; try a smaller image or fewer steps.",
                         key="engine.gpu_out_of_memory")
    return MgieError(f"Something went wrong on the GPU ({type(err).__name__}); the error is logged.",
                     key="engine.gpu_failed", error=type(err).__name__)


def free_memory() -> None:
    """After a failure: collect garbage and give cached CUDA blocks back, so a retry finds room."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
