"""A worker's two modes: it serves edits eagerly as soon as its weights are loaded, compiles in the
background, and moves its jobs to the compiled kernels when they are ready.

The worker holds two pipelines on the same models (lifecycle.py): an eager one, and a compiled one (the
same stages built with ``compile_unet``, whose ``torch.compile`` functions compile at first use). The
compiled one is built first, since it puts the VAE in channels-last memory, and a CUDA graph recorded
before that would read freed weights. A compile thread runs the production warm-up (warm_up.py) on the
compiled pipeline while the batch loop serves with the eager one; when the warm-up has run, the loop
takes the compiled pipeline at the top of its next iteration (``take_compiled``). A denoising state is
plain tensors and per-job schedules, the same for both, so a job that is running then takes its next step
compiled: the switch is at a step boundary, and no job waits for it. The guidance cache is shared.

Why a thread in this process, not a separate compile process: a second process would load the 7B
weights again (a second copy in GPU memory, which a 24-48 GB card does not have) and its graphs could not
be replayed here; the in-process warm-up is what makes the graphs. Inductor lowers under a process-wide
lock and triton compiles in its own subprocesses, so the compile thread mostly competes with the serving
thread for the GIL (eager steps are launch bound: they run slower while compiling, never stop). What
must not overlap is CUDA-graph capture with other work on the device: device_turns.py makes recordings
take turns with the serving loop's GPU work, and keeps the serving thread from recording while the
device compiles. Inductor keeps its CUDA graphs per thread, so the compile thread adopts the serving
thread's cudagraph-tree state: the graphs it records are the ones served afterwards, not recorded twice.

A compile that fails leaves the worker serving eagerly, and says so (log, ``mode``, ``compile_error``).
Compiles that happen while serving (a shape the warm-up did not cover) are counted per serving thread
through dynamo's compile-start callback (``compiles`` in the worker's info).
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import device_turns
from .warm_up import WarmUpStopped

if TYPE_CHECKING:
    from .pipeline import MgiePipeline

log = logging.getLogger(__name__)

EAGER = "eager"
COMPILING = "eager (compiling)"
COMPILED = "compiled"
COMPILE_FAILED = "eager (compile failed)"

_compiles: collections.Counter[int] = collections.Counter()  # thread ident -> dynamo compiles started in it


def _count_compile(*_args: object) -> None:
    _compiles[threading.get_ident()] += 1


@functools.cache
def count_compiles() -> bool:
    """Count dynamo's compiles per thread from now on (once per process; False if torch cannot say)."""
    try:
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(_count_compile)
    except Exception:
        log.warning("cannot count compiles during service (torch._dynamo.callback unavailable)", exc_info=True)
        return False
    return True


def compiles_in(thread: int | None) -> int:
    """Dynamo compiles started in ``thread`` since compiles were counted."""
    return _compiles[thread] if thread is not None else 0


class ServingModes:
    """Which mode serves a worker's edits, and the compiled pipeline once it is ready to take over."""

    def __init__(self) -> None:
        self.mode = EAGER
        self.error: str | None = None  # why compiling failed
        self.compile_seconds: float | None = None
        self.serving_thread: int | None = None  # the batch loop's thread (its compiles are counted)
        self._compiles_before = 0  # that thread's count when it began serving (thread ids are reused)
        self.settled = threading.Event()  # set once the mode is final: no compile running
        self.stop = threading.Event()  # set at shutdown: the compile stops after its current warm-up batch
        self.thread: threading.Thread | None = None  # the compile thread
        self._compiled: MgiePipeline | None = None
        self._lock = threading.Lock()

    def serving_from(self, thread: int) -> None:
        """The batch loop runs in ``thread`` from now on: count its compiles from here."""
        self.serving_thread, self._compiles_before = thread, compiles_in(thread)

    def eager_only(self) -> None:
        """No background compile: the one pipeline serves (eager, or compiled without a warm-up)."""
        self.settled.set()

    def compiling(self) -> None:
        self.mode = COMPILING
        self.settled.clear()

    def compiled_ready(self, pipeline: MgiePipeline, seconds: float) -> None:
        with self._lock:
            self._compiled, self.mode, self.compile_seconds = pipeline, COMPILED, seconds
        self.settled.set()

    def compile_failed(self, err: BaseException) -> None:
        self.mode, self.error = COMPILE_FAILED, f"{type(err).__name__}: {err}"[:300]
        self.settled.set()

    def compile_stopped(self) -> None:
        self.mode = EAGER
        self.settled.set()

    def take_compiled(self) -> MgiePipeline | None:
        """The compiled pipeline, once, when it is ready (the batch loop calls this between iterations)."""
        if self._compiled is None:
            return None
        with self._lock:
            pipeline, self._compiled = self._compiled, None
        return pipeline

    def info(self) -> dict[str, Any]:
        """For /mgie status, the Redis heartbeat and the load test: mode, compiles during service."""
        compiles = compiles_in(self.serving_thread) - self._compiles_before
        out: dict[str, Any] = {"mode": self.mode, "compiles": compiles}
        if self.error:
            out["compile_error"] = self.error
        if self.compile_seconds is not None:
            out["compile_seconds"] = round(self.compile_seconds, 1)
        return out


def compile_in_background(name: str, compiled: MgiePipeline, capacity: int, modes: ServingModes,
                          prepare_thread: Callable[[], None], cache_folder: Path | None) -> threading.Thread:
    """Start the compile thread: the warm-up on ``compiled`` (taking device turns for its recordings),
    then the cache artifacts saved and the pipeline offered to the loop. Call it from the serving thread,
    before it serves: the device is marked as compiling at once, so the loop never starts a step that
    could overlap a recording without its turn."""
    count_compiles()
    device = compiled.models.device
    state = device_turns.cudagraph_state() if device.type == "cuda" else None
    turn = device_turns.begin_background_compile(device)
    modes.compiling()

    def main() -> None:
        turn.compile_thread = threading.get_ident()
        log.info("worker %s: serving eagerly while compiling for every class of shape (minutes on a first "
                 "start; the cache in %s keeps it short after)", name, cache_folder or "torch's default folder")
        started = time.perf_counter()
        compiled.stop_warm_up = modes.stop
        try:
            prepare_thread()
            device_turns.adopt_cudagraph_state(state)
            compiled.warm_up(capacity)
        except WarmUpStopped:
            log.info("worker %s: compiling stopped (shutting down)", name)
            device_turns.end_background_compile(device, turn)
            modes.compile_stopped()
            return
        except Exception as err:
            log.exception("worker %s: compiling failed; running without compiled steps (slower)", name)
            _undo_compile(compiled)
            device_turns.end_background_compile(device, turn)
            modes.compile_failed(err)
            return
        except BaseException as err:
            device_turns.end_background_compile(device, turn)
            modes.compile_failed(err)
            raise
        seconds = time.perf_counter() - started
        device_turns.end_background_compile(device, turn)
        log.info("worker %s: compiled in %.0f s; edits move to compiled kernels at their next step", name, seconds)
        if cache_folder is not None:
            from .compile_cache import save_artifacts

            save_artifacts(cache_folder)
        modes.compiled_ready(compiled, seconds)

    modes.thread = thread = threading.Thread(target=main, name=f"mgie-{name}-compile", daemon=True)
    thread.start()
    return thread


def _undo_compile(compiled: MgiePipeline) -> None:
    """After a failed compile: free its memory and give the eager VAE back its faster layout, in the
    device's turn (the serving loop is between steps)."""
    import torch

    from .faults import free_memory

    models = compiled.models
    with device_turns.serving(models.device):
        try:
            if models.device.type == "cuda":
                from torch._inductor.cudagraph_trees import reset_cudagraph_trees

                reset_cudagraph_trees()
                models.vae.to(memory_format=torch.contiguous_format)
        except Exception:
            log.warning("could not undo the compiled pipeline's set-up", exc_info=True)
        free_memory()
