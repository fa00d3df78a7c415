"""Compiling in a child process while the worker serves eagerly, when the card has room for it.

Why: on an H200 (bench/results/NVIDIA_H200-coldstart-b8-first.*: full-size models, MGIE_MAX_BATCH=8, first
start, empty cache), eager edits served while the in-process compile thread ran took 15-105 s instead of
~3.6 s alone, and the compile's first two warm-up batches took 160 s and 183 s. torch's bindings release
the GIL around every op, so the launch-bound serving thread gives it up thousands of times a step and
must win it back from the CPU-bound compile thread each time (up to ``sys.getswitchinterval()``, 5 ms).
A child process has a GIL of its own.

So when the free GPU memory holds a second copy of the models plus headroom (MGIE_COMPILE_CHILD=auto; 1
forces it, 0 never), the worker starts ``python -m mgie_engine.compile_child`` right after its weights
load: the child runs ``lifecycle.precompile`` with the worker's settings into the worker's compile cache
folder and exits 0 once its cache artifacts are written, while the worker serves eagerly and compiles nothing.

Several children, side by side. Each compile of a UNet step takes minutes of one CPU core (tracing and
lowering are single-threaded), and the warm-up has several that do not depend on each other: the static
step at one job and at the batch limit, the symbolic guided step at each of its classes, the unguided
call (``warm_up.compile_groups``). Where the memory holds more copies of the models (each child needs its
weights plus ``EXTRA_CHILD_BYTES``, beside the worker's ``HEADROOM_BYTES``) the worker starts one child per
group, up to MGIE_COMPILE_CHILDREN (0: as many as fit, and one per ``CORES_PER_CHILD`` cores), each
running only its groups' warm-up batches into the same cache folder, with the host's cores shared out
among their triton compile workers. Groups left over go round-robin. H200 host (16 cores), full-size
models, MGIE_MAX_BATCH=8 (results/NVIDIA_H200-coldstart-b8-first-*-children.*): four children took over
466 s and five over 360 s (the symbolic classes were still paired up), six slowed every compile by about
a quarter and had not finished at 265 s; the longest single compile took 253 s.

The child never outlives the worker: it runs in its own process group, killed whole (inductor's compile
workers too) when the worker shuts down, and it asks the kernel to SIGKILL it when its parent dies
(``PR_SET_PDEATHSIG``; elsewhere a watchdog thread), so a SIGKILLed worker leaves no orphan on the GPU.
The parent starts it from the compile thread, which waits for it: the death signal follows the thread
that started the child, and that thread lives as long as the child does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .settings import EngineSettings

if TYPE_CHECKING:
    import torch

    from .models import MgieModels

log = logging.getLogger(__name__)

SETTINGS_ENV = "MGIE_COMPILE_CHILD_SETTINGS"  # the worker's EngineSettings as JSON
CAPACITY_ENV = "MGIE_COMPILE_CHILD_CAPACITY"  # jobs per UNet call the warm-up covers
FOLDER_ENV = "MGIE_COMPILE_CHILD_FOLDER"  # the worker's compile cache folder
PARENT_ENV = "MGIE_COMPILE_CHILD_PARENT"  # the worker's pid: the child dies with it
BATCHES_ENV = "MGIE_COMPILE_CHILD_BATCHES"  # the warm-up batches this child runs ("0,2,3"); unset: all
INDEX_ENV = "MGIE_COMPILE_CHILD_INDEX"  # which child this is (its log and artifact file names)
LOG_FILE = "compile-child-{}.log"  # .format(index)
ARTIFACTS_FILE = "artifacts-child-{}.bin"  # a child's own artifacts: only the worker writes artifacts.bin
TIMEOUT_S = 3600.0  # a first compile at MGIE_MAX_BATCH=32 took over 9 minutes in-process; this is a hang
# Room for the child: its copy of the weights, and for its warm-up's activations and CUDA-graph pools (and
# the worker's own serving beside it) half as much again plus 8 GiB. The full-size models are ~15.5 GiB, so
# a child needs ~31 GiB free after the worker loaded: an 80 GB card has it, a 24-48 GB one compiles in-process.
HEADROOM_FRACTION = 0.5
HEADROOM_BYTES = 8 * 2**30
# Side by side, each child needs its weights plus this (its warm-up's activations and graph pools), and the
# worker keeps HEADROOM_BYTES for serving: on an H200 five children beside an MGIE_MAX_BATCH=8 worker peaked
# at 109 GB of 143 (~17 GiB each for 15.5 GiB of weights; results/NVIDIA_H200-coldstart-b8-first-5-children).
EXTRA_CHILD_BYTES = 2 * 2**30
# Compiling is CPU-bound (tracing and lowering in each child, triton in its workers): on the H200's 16-core host
# five children compiled each class about as fast as four (static step 153/171 s against 148/172), six took 204/199 s.
CORES_PER_CHILD = 3
TAIL_CHARS = 2000
_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(frozen=True)
class ChildLauncher:
    """How the worker starts its compile child: the command (default: this module) and its time limit."""

    command: tuple[str, ...] | None = None
    timeout: float = TIMEOUT_S

    def argv(self) -> list[str]:
        return list(self.command) if self.command else [sys.executable, "-m", "mgie_engine.compile_child"]


@dataclasses.dataclass(frozen=True)
class ChildOutcome:
    """How a child run ended: ``ok`` when it exited 0; ``returncode`` None when it overran its time."""

    ok: bool
    seconds: float
    returncode: int | None
    tail: str
    count: int = 1  # children it stands for (ChildRuns: the first failure, else the longest)

    def describe(self) -> str:
        """One line for the log and the worker's info."""
        if self.ok:
            return f"done in {self.seconds:.0f} s" + (f" ({self.count} processes)" if self.count > 1 else "")
        if self.returncode is None:
            how = f"killed after its {self.seconds:.0f} s time limit"
        elif self.returncode < 0:
            how = f"killed by signal {-self.returncode} after {self.seconds:.0f} s"
        else:
            how = f"exit {self.returncode} after {self.seconds:.0f} s"
        last = " ".join(self.tail.strip().splitlines()[-1:])[:200]
        return f"failed: {how}" + (f" ({last})" if last else "")


def model_bytes(models: MgieModels) -> int:
    """Bytes of the loaded weights (parameters and buffers, each tensor once): what a child loads again."""
    seen: set[int] = set()
    total = 0
    for module in (models.llm, models.projector, models.vision, models.edit_head, models.unet, models.vae):
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def room_needed(weights: int) -> int:
    """Free device memory a child needs beside the worker, for ``weights`` bytes of models."""
    return int(weights * (1 + HEADROOM_FRACTION)) + HEADROOM_BYTES


def free_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` now (``torch.cuda.mem_get_info``); None off CUDA or when torch cannot say."""
    if device.type != "cuda":
        return None
    import torch

    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except Exception:
        log.warning("cannot read the free memory of %s", device, exc_info=True)
        return None


def how_many(limit: int, groups: int, weights: int, free: int | None, cores: int | None = None) -> int:
    """Children to start once ``decide`` said yes: one per warm-up group (``groups``), at most ``limit``
    (MGIE_COMPILE_CHILDREN; 0: no limit) and, where the free memory is known (auto), as many as it holds
    beside the worker's serving headroom and one per ``CORES_PER_CHILD`` of the host's ``cores``."""
    count = min(groups, limit) if limit > 0 else groups
    if free is not None:
        count = min(count, int(max(0, free - HEADROOM_BYTES) // (weights + EXTRA_CHILD_BYTES)))
        if cores:
            count = min(count, cores // CORES_PER_CHILD)
    return max(1, count)


def shares(groups: list[tuple[int, ...]], count: int) -> list[tuple[int, ...]]:
    """``groups`` dealt round-robin to ``count`` children: each child's warm-up batches, in order. The groups
    come longest first with the cheapest last (``warm_up.compile_groups``), so the first child, which gets
    the last group, pairs it with a shorter one."""
    return [tuple(sorted(k for group in groups[i::count] for k in group)) for i in range(count)]


def decide(setting: bool | None, weights: int, free: int | None, warm_cache: bool) -> tuple[bool, str]:
    """Whether to compile in a child (MGIE_COMPILE_CHILD: True, False or None for auto), and why."""
    if setting is False:
        return False, "off (MGIE_COMPILE_CHILD=0)"
    if setting is True:
        return True, "on (MGIE_COMPILE_CHILD=1)"
    if warm_cache:
        return False, "the compile cache is warm"
    if free is None:
        return False, "no free-memory figure for this device"
    need = room_needed(weights)
    if free < need:
        return False, f"{free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed"
    return True, f"{free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed"


class ChildRun:
    """One compile child: started, waited for (with the worker's stop event and the time limit), killed."""

    def __init__(self, launcher: ChildLauncher, settings: EngineSettings, capacity: int, folder: Path,
                 batches: tuple[int, ...] | None = None, index: int = 0, compile_threads: int | None = None) -> None:
        self.launcher, self.settings, self.capacity, self.folder = launcher, settings, capacity, folder
        self.batches, self.index, self.compile_threads = batches, index, compile_threads
        self.log_path = folder / LOG_FILE.format(index)
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self._lock = threading.Lock()
        self._killed = False

    def start(self) -> int:
        """Start the child (its output goes to ``log_path``); returns its pid. Raises OSError."""
        package_root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])])
        env = {**os.environ, "PYTHONPATH": path, SETTINGS_ENV: json.dumps(dataclasses.asdict(self.settings)),
               CAPACITY_ENV: str(self.capacity), FOLDER_ENV: str(self.folder), PARENT_ENV: str(os.getpid()),
               INDEX_ENV: str(self.index)}
        if self.batches is not None:
            env[BATCHES_ENV] = ",".join(map(str, self.batches))
        if self.compile_threads and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
            env["TORCHINDUCTOR_COMPILE_THREADS"] = str(self.compile_threads)
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._killed:
                raise OSError("the worker is shutting down")
            with open(self.log_path, "wb") as out:
                self.proc = subprocess.Popen(self.launcher.argv(), stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.started = time.monotonic()
        return self.proc.pid

    def wait(self, stop: threading.Event, poll: float = 0.2) -> ChildOutcome | None:
        """Until the child exits, overruns its time (killed), or ``stop`` is set (killed; returns None)."""
        assert self.proc is not None, "start() first"
        deadline = self.started + self.launcher.timeout
        while True:
            try:
                code = self.proc.wait(timeout=poll)
                break
            except subprocess.TimeoutExpired:
                if stop.is_set():
                    self.kill()
                    return None
                if time.monotonic() >= deadline:
                    self.kill()
                    return ChildOutcome(False, time.monotonic() - self.started, None, self.tail())
        seconds = time.monotonic() - self.started
        self._kill_group()  # inductor's compile workers, should any be left
        return ChildOutcome(code == 0, seconds, code, self.tail())

    def kill(self) -> None:
        """Kill the child and its process group now (idempotent; before ``start`` it keeps it from starting)."""
        with self._lock:
            self._killed = True
            proc = self.proc
        if proc is None:
            return
        self._kill_group()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            log.warning("the compile child (pid %d) did not end within 5 s of SIGKILL", proc.pid)

    def _kill_group(self) -> None:
        if self.proc is None:
            return
        try:
            if hasattr(os, "killpg"):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own group (start_new_session): pgid == pid
            else:
                self.proc.kill()
        except (ProcessLookupError, PermissionError):
            pass

    def tail(self) -> str:
        """The end of the child's output."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, fh.seek(0, os.SEEK_END) - TAIL_CHARS))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""


class ChildRuns:
    """Several compile children side by side (each its share of the warm-up), as one: started together,
    waited for until the last ends, killed together."""

    def __init__(self, runs: list[ChildRun]) -> None:
        self.runs = runs

    def start(self) -> list[int]:
        """Start every child; their pids. Raises OSError (the ones already started are killed)."""
        try:
            return [run.start() for run in self.runs]
        except OSError:
            self.kill()
            raise

    def wait(self, stop: threading.Event) -> ChildOutcome | None:
        """Until every child has ended (None: ``stop`` was set, all killed). Ok if all were; otherwise the
        first failure's outcome, so the log and the worker's info say which and why."""
        outcomes = []
        for run in self.runs:
            outcome = run.wait(stop)
            if outcome is None:
                self.kill()
                return None
            outcomes.append(outcome)
        failed = [o for o in outcomes if not o.ok]
        longest = max(outcomes, key=lambda o: o.seconds)
        return dataclasses.replace(failed[0] if failed else longest, count=len(outcomes))

    def kill(self) -> None:
        for run in self.runs:
            run.kill()


def run_to_end(runs: ChildRuns, stop: threading.Event, who: str) -> str | None:
    """Start the children and wait for every one (``who`` names the caller in the log); how they ended, for
    the worker's info, or None when ``stop`` was set meanwhile (they are killed). Whatever a child could not
    do, the in-process warm-up that follows does."""
    try:
        pids = runs.start()
    except OSError as err:
        if stop.is_set():
            return None
        log.warning("%s: could not start the compile children (%s); compiling in this process", who, err)
        return f"failed: could not start ({err})"
    log.info("%s: %d compile child process(es) (pid %s) compile side by side; their output: %s", who, len(pids),
             ", ".join(map(str, pids)), runs.runs[0].folder)
    outcome = runs.wait(stop)
    if outcome is None:
        return None
    if outcome.ok:
        log.info("%s: the compile children finished in %.0f s; compiling in this process from their cache",
                 who, outcome.seconds)
    else:
        log.warning("%s: a compile child %s; compiling in this process what it left. Its output ended with:\n%s",
                    who, outcome.describe(), outcome.tail)
    return outcome.describe()


def host_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def compile_threads_each(count: int) -> int:
    """Triton compile workers per child: the host's cores shared out among ``count`` children."""
    return max(1, host_cores() // count)


def die_with_parent(parent: int) -> None:
    """Have this process SIGKILLed when ``parent`` dies: ``PR_SET_PDEATHSIG`` on Linux, else a watchdog
    thread; exits at once if the parent is already gone."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    except (OSError, AttributeError):
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="mgie-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # it died before the request took effect
        os._exit(1)


def main() -> int:
    """The child: precompile with the worker's settings into its folder; 0 once the artifacts are saved."""
    from .unused_packages import skip_unused_packages

    skip_unused_packages()  # before the model libraries' first import
    die_with_parent(int(os.environ.get(PARENT_ENV) or os.getppid()))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = EngineSettings(**json.loads(os.environ[SETTINGS_ENV]))
        capacity, folder = int(os.environ[CAPACITY_ENV]), Path(os.environ[FOLDER_ENV])
        batches = os.environ.get(BATCHES_ENV)
        only = tuple(int(k) for k in batches.split(",") if k) if batches is not None else None
        log.info("compile child %s: warm-up batches %s", os.environ.get(INDEX_ENV, "0"), batches or "all")
        from .lifecycle import precompile

        path = precompile(settings, capacity, folder=folder, only=only,
                          artifacts=ARTIFACTS_FILE.format(os.environ.get(INDEX_ENV, "0")))
    except Exception:
        log.exception("compiling in the child process failed")
        return 1
    log.info("compile child: cache artifacts saved to %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
