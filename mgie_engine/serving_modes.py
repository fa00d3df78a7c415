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

Where the compile runs. When the card has room for a second copy of the models, child processes compile
first (compile_child.py: ``compile_phase`` "child"; several side by side where there is room, each its
share of the warm-up) while this process serves eagerly and compiles nothing (the device takes no turns
yet, so the eager pipeline records its own CUDA graphs); then the compile thread here runs the same
warm-up with hot caches (``compile_phase`` "in-process"): its graphs must be recorded in this process,
where they are replayed. A 24-48 GB card has no room for a child, and a warm cache needs none: the
compile thread then compiles from the start.

The compile thread and the GIL. Inductor lowers under a process-wide lock and triton compiles in its own
subprocesses, so the compile thread competes with the serving thread mostly for the GIL, and loses it
badly (the likeliest cause; the GPU run after this change measures it): on an H200
(bench/results/NVIDIA_H200-coldstart-b8-first.*, full-size models, MGIE_MAX_BATCH=8, first start) eager
edits took 15-105 s during the compile instead of ~3.6 s alone. torch releases the GIL around each op, so
a launch-bound eager step hands it over thousands of times, and each time waits for the CPU-bound compile
thread to drop it: up to ``sys.getswitchinterval()``, 5 ms by default. While the compile thread runs, the
interval is shortened (MGIE_COMPILE_SWITCH_INTERVAL, default 0.5 ms; restored after;
``shorter_switch_interval``), so each handover waits at most that long, at the cost of more switches for
the compile.
Even so, an H200 warm restart's eager edits took 6-29 s beside the in-process compile against 4.4 s alone
(bench/NOTES.md, "Stop 27"), so before each warm-up batch, and before the children start (their start slowed
a first start's first edit as much), the compile thread also gives way to the edits running
(``ServingModes.give_way``, up to MGIE_COMPILE_GIVE_WAY seconds): those queued during a restart finish at eager
speed first, and an edit never waits behind more than the one batch that began while it was queued.

What must not overlap is CUDA-graph capture with other work on the device: device_turns.py makes
recordings take turns with the serving loop's GPU work, and keeps the serving thread from recording while
the device compiles. When the compile thread starts after a child, the serving loop is already running:
the device is marked as compiling first, then the compile waits for the loop to finish the loop it is in
(or to be idle), so no loop that began unaware of the turns overlaps a recording. Inductor keeps its CUDA
graphs per thread, so the compile thread adopts the serving thread's cudagraph-tree state: the graphs it
records are the ones served afterwards, not recorded twice.

A compile that fails leaves the worker serving eagerly, and says so (log, ``mode``, ``compile_error``).
Compiles that happen while serving (a shape the warm-up did not cover) are counted per serving thread
through dynamo's compile-start callback (``compiles`` in the worker's info).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import device_turns
from .warm_up import WarmUpStopped

if TYPE_CHECKING:
    from .compile_child import ChildRuns
    from .pipeline import MgiePipeline

log = logging.getLogger(__name__)

EAGER = "eager"
COMPILING = "eager (compiling)"
COMPILED = "compiled"
COMPILE_FAILED = "eager (compile failed)"
IN_CHILD = "child"  # compile phases, while the mode is COMPILING
IN_PROCESS = "in-process"

# How long the in-process compile's first batch waits for edits to reach an idle loop: the bot's queue (or the
# Redis pool's dispatcher) hands over the jobs that waited for this worker right after it turns ready.
ARRIVALS_SECONDS = 3.0

_compiles: collections.Counter[int] = collections.Counter()  # thread ident -> dynamo compiles started in it
# Inductor's cudagraph trees announce each CUDA-graph recording through the same callback (about a second for a
# new shape of a compiled function, no compile): counted apart, so that "compiles" means compiles.
_recordings: collections.Counter[int] = collections.Counter()


def _count_compile(*args: object) -> None:
    trigger = getattr(args[0], "callback_trigger", None) if args else None
    counter = _recordings if getattr(trigger, "name", None) == "CUDAGRAPH_RECORDING" else _compiles
    counter[threading.get_ident()] += 1


def count_compiles() -> bool:
    """Count dynamo's compiles per thread from now on (False if torch cannot say). Idempotent; registers
    again after ``torch._dynamo.reset()``, which clears dynamo's callbacks."""
    try:
        from torch._dynamo.callback import callback_handler

        if _count_compile not in getattr(callback_handler, "start_callbacks", ()):
            callback_handler.register_start_callback(_count_compile)
    except Exception:
        log.warning("cannot count compiles during service (torch._dynamo.callback unavailable)", exc_info=True)
        return False
    return True


def compiles_in(thread: int | None) -> int:
    """Dynamo compiles started in ``thread`` since compiles were counted."""
    return _compiles[thread] if thread is not None else 0


def recordings_in(thread: int | None) -> int:
    """CUDA-graph recordings (of compiled functions) started in ``thread`` since compiles were counted."""
    return _recordings[thread] if thread is not None else 0


class ServingModes:
    """Which mode serves a worker's edits, and the compiled pipeline once it is ready to take over."""

    def __init__(self) -> None:
        self.mode = EAGER
        self.error: str | None = None  # why compiling failed
        self.compile_seconds: float | None = None
        self.serving_thread: int | None = None  # the batch loop's thread (its compiles are counted)
        # that thread's counts when it began serving (thread ids are reused)
        self._compiles_before = self._recordings_before = 0
        self.settled = threading.Event()  # set once the mode is final: no compile running
        self.stop = threading.Event()  # set at shutdown: the compile stops after its current warm-up batch
        self.thread: threading.Thread | None = None  # the compile thread
        self.phase: str | None = None  # while compiling: IN_CHILD, then IN_PROCESS
        self.child: ChildRuns | None = None  # the compile children, while they run
        self.child_outcome: str | None = None  # how the child ended, or why there was none
        self._compiled: MgiePipeline | None = None
        self._lock = threading.Lock()
        self._loops = threading.Condition()  # the serving loop's progress (wait_for_loop_boundary)
        self._loops_done = 0
        self._loop_idle = False
        self._loop_began = False  # the serving loop has said it is idle or busy at least once

    def serving_from(self, thread: int) -> None:
        """The batch loop runs in ``thread`` from now on: count its compiles from here."""
        self.serving_thread, self._compiles_before = thread, compiles_in(thread)
        self._recordings_before = recordings_in(thread)

    def loop_idle(self, idle: bool) -> None:
        """The serving loop waits for jobs (True: no GPU work until its next loop) or has them (False)."""
        with self._loops:
            self._loop_idle, self._loop_began = idle, True
            self._loops.notify_all()

    def loop_done(self) -> None:
        """The serving loop finished one loop's GPU work."""
        with self._loops:
            self._loops_done += 1
            self._loops.notify_all()

    def wait_for_loop_boundary(self) -> bool:
        """Until the serving loop has finished the loop it is in, or is idle (False: stopped meanwhile).
        Called after the device was marked as compiling: every later loop takes turns."""
        with self._loops:
            seen = self._loops_done
            while not (self._loop_idle or self._loops_done > seen):
                if self.stop.is_set():
                    return False
                self._loops.wait(0.2)
        return True

    def give_way(self, limit: float, arrivals: float = 0.0) -> float:
        """Wait while the serving loop has edits, at most ``limit`` seconds (or until stopped); the seconds
        waited. The compile thread calls it before each warm-up batch: edits that wait then (those queued
        during a restart, above all) run at eager speed, not three to five times slower beside the compile.
        ``arrivals``: first wait up to that long for edits to reach an idle loop (the bot's queue hands its
        waiting jobs over only once the worker is ready, a moment after the compile thread starts)."""
        started = time.monotonic()
        with self._loops:
            seen = self._loops_done
            self._wait_while(lambda: (self._loop_idle or not self._loop_began) and self._loops_done == seen,
                             started + min(arrivals, limit))
            self._wait_while(lambda: not self._loop_idle, started + limit)
        return time.monotonic() - started

    def _wait_while(self, condition: Callable[[], bool], until: float) -> None:
        """With ``_loops`` held: wait while ``condition`` holds, until the monotonic time ``until`` or a stop."""
        while condition() and not self.stop.is_set() and (left := until - time.monotonic()) > 0:
            self._loops.wait(min(left, 0.2))

    def kill_child(self) -> None:
        """Kill the compile child, if one runs (at shutdown)."""
        child = self.child
        if child is not None:
            child.kill()

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
        recordings = recordings_in(self.serving_thread) - self._recordings_before
        out: dict[str, Any] = {"mode": self.mode, "compiles": compiles, "graph_recordings": recordings}
        if self.mode == COMPILING and self.phase:
            out["compile_phase"] = self.phase
        if self.child_outcome:
            out["compile_child"] = self.child_outcome
        if self.error:
            out["compile_error"] = self.error
        if self.compile_seconds is not None:
            out["compile_seconds"] = round(self.compile_seconds, 1)
        return out


def compile_in_background(name: str, compiled: MgiePipeline, capacity: int, modes: ServingModes,
                          prepare_thread: Callable[[], None], cache_folder: Path | None,
                          child: ChildRuns | None = None, switch_interval: float = 0.0,
                          give_way: float = 0.0, park: bool = False) -> threading.Thread:
    """Start the compile thread: ``child`` first, if given (compile_child.py), then the warm-up on
    ``compiled`` in this process (taking device turns for its recordings, the GIL handed over every
    ``switch_interval`` seconds, each batch after up to ``give_way`` seconds of the loop's edits:
    ``ServingModes.give_way``; the children start after such a wait too), then the cache artifacts saved and the
    pipeline offered to the loop. With
    ``park`` the thread then never ends (``_park``).
    Call it from the serving thread, before it serves: without a child the device is marked as compiling
    at once, so the loop never starts a step that could overlap a recording without its turn."""
    count_compiles()
    device = compiled.models.device
    state = device_turns.cudagraph_state() if device.type == "cuda" else None
    turns: list[device_turns.DeviceTurn] = []
    if child is None:
        turns.append(device_turns.begin_background_compile(device))
    modes.compiling()
    modes.phase = IN_CHILD if child is not None else IN_PROCESS

    def end_turns() -> None:
        for turn in turns:
            device_turns.end_background_compile(device, turn)

    def main() -> None:
        started, waited = time.perf_counter(), []

        def give_way_to_edits() -> None:  # the first wait also gives the jobs queued during a restart time to arrive
            if give_way > 0:
                waited.append(modes.give_way(give_way, arrivals=0.0 if waited else ARRIVALS_SECONDS))

        compiled.stop_warm_up, compiled.before_warm_up_batch = modes.stop, give_way_to_edits
        try:
            if child is not None:
                give_way_to_edits()  # the children's start (imports, weights) slows the first edits 3-5x too
                if not _compile_in_child(name, child, modes):
                    raise WarmUpStopped
                turns.append(device_turns.begin_background_compile(device))
                if not modes.wait_for_loop_boundary():
                    raise WarmUpStopped
            turns[0].compile_thread = threading.get_ident()
            modes.phase = IN_PROCESS
            log.info("worker %s: serving eagerly while compiling for every class of shape (minutes on a first "
                     "start; the cache in %s keeps it short after)", name, cache_folder or "torch's default folder")
            prepare_thread()
            device_turns.adopt_cudagraph_state(state)
            with shorter_switch_interval(switch_interval):
                compiled.warm_up(capacity)
        except WarmUpStopped:
            log.info("worker %s: compiling stopped (shutting down)", name)
            end_turns()
            modes.compile_stopped()
            return
        except Exception as err:
            log.exception("worker %s: compiling failed; running without compiled steps (slower)", name)
            _undo_compile(compiled)
            end_turns()
            modes.compile_failed(err)
            return
        except BaseException as err:
            end_turns()
            modes.compile_failed(err)
            raise
        seconds = time.perf_counter() - started
        end_turns()
        log.info("worker %s: compiled in %.0f s (%.0f s of it waiting for edits); edits move to compiled kernels "
                 "at their next step", name, seconds, sum(waited))
        if cache_folder is not None:
            from .compile_cache import save_artifacts

            save_artifacts(cache_folder)
        modes.compiled_ready(compiled, seconds)
        if park:
            _park(modes)

    modes.thread = thread = threading.Thread(target=main, name=f"mgie-{name}-compile", daemon=True)
    thread.start()
    return thread


def _park(modes: ServingModes) -> None:
    """Keep the compile thread alive until the process exits, out of ``LocalWorker.join``'s list. For
    MGIE_COMPILE_AOT: on torch 2.11 (H200) every worker serving saved steps crashed after the thread that loaded
    them had ended, once within a second of its end (bench/NOTES.md, "Stop 28"); whether its end is the cause is
    not confirmed yet (bench/aot_gc_crash.py, ``compile-thread-parked``). An idle thread costs nothing."""
    modes.thread = None
    log.info("the compile thread stays (MGIE_COMPILE_AOT: its end is suspected in a crash; bench/NOTES.md)")
    threading.Event().wait()


def _compile_in_child(name: str, child: ChildRuns, modes: ServingModes) -> bool:
    """Run the compile children to their end while the serving loop serves eagerly. They compile into this
    worker's cache folder, so the in-process compile that follows finds their work there. False: the
    worker stopped meanwhile (the children are killed)."""
    from .compile_child import run_to_end

    modes.child = child
    outcome = run_to_end(child, modes.stop, f"worker {name}")
    modes.child = None
    if outcome is None:
        return False
    modes.child_outcome = outcome
    return True


_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


@contextlib.contextmanager
def shorter_switch_interval(seconds: float) -> Iterator[None]:
    """``sys.setswitchinterval(seconds)`` while inside (never longer than it was; 0: unchanged), restored
    when the last compile thread of the process leaves (several workers may compile at once)."""
    global _switch_users, _switch_saved
    if seconds <= 0:
        yield
        return
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(seconds, _switch_saved))
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


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
