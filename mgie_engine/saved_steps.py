"""The denoising steps (the fused guided step, the unguided UNet call) compiled ahead of time, saved in the kept
compile cache and loaded by later starts instead of traced again (MGIE_COMPILE_AOT=1; issue 20, "short warm restarts").

On a warm restart every class of shape is re-traced by dynamo although inductor's caches hit: 149 s for the
warm-up's seven classes on an H200 (bench/NOTES.md, "Start-up and load"). torch can compile a function ahead
of time (``torch.compile(...).aot_compile``), save it (``save_compiled_function``) and load it in a fresh
process (``torch.compiler.load_compiled_function``), with no trace. On a CPU that cost 2.6 s against 7.9 s
for the home-shape step, and one load against three re-traces for the symbolic one (bench/aot_step.py).

Three kinds: ``static``, the fused guided step at the home shape, one per padded job count; ``symbolic``, the fused
guided step for every other shape; ``plain``, the UNet call of unguided jobs (symbolic too).

- The UNet travels as external data: the loaded step reads the live module's weights.
- Only tensor guards are kept (the module's guards cannot be saved). So the symbolic step, compiled once at
  two jobs (a symbolic size never stands for 1), serves every other job count and size without the guards
  that make ``torch.compile`` compile apart; each class it serves is checked once against the eager step
  when first met (``CHECK_TOLERANCE``), and a class that differs goes back to ``torch.compile``.
- Loaded steps are called with unmarked tensors (a dynamic mark absent at compile time fails a guard).
- Any failure to compile, save, load or match falls back to ``torch.compile`` for that step or class, and
  says so in the log: a worker never stops serving for this.

Step files live in ``<cache folder>/steps/<unet hash>/``; the cache folder's name already covers torch, the
card and the compile options, and the UNet's config hash covers the model. A compile child writes them, and
the worker that started it loads them in its in-process warm-up. Off by default and experimental: on an H200
(torch 2.11) a warm restart reached compiled speed in 100 s instead of ~180 s at the same speed, but every process
serving saved steps crashed in garbage collection (bench/NOTES.md, "Stop 27"; bench/aot_gc_crash.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .compilation import STATIC_STEP_OPTIONS, UNET_COMPILE_OPTIONS, mark_sizes_dynamic
from .denoiser import guided_euler_ancestral_step

log = logging.getLogger(__name__)

STEPS_DIR = "steps"
CHECK_TOLERANCE = 0.02  # largest relative L2 difference from the eager step a class may show (fp16 kernels differ)

Step = Callable[..., torch.Tensor]


def unet_key(unet: torch.nn.Module) -> str:
    """A short hash of the UNet's architecture (its config): a saved step is only valid for the same one."""
    config = dict(getattr(unet, "config", {}) or {})
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def without_recursive_dict_tag_guards() -> bool:
    """Turn dynamo's recursive dict-tag guards off where this torch has them on (2.11; True: it did). They keep
    raw pointers to tensors, and upstream turned them off in 2.12 after segfaults, some at interpreter exit
    (pytorch/pytorch#181873). Every H200 process that served saved steps on torch 2.11 died in garbage collection
    (bench/NOTES.md, "Stop 27"); whether these guards are the cause is what bench/aot_gc_crash.py settles."""
    config = torch._dynamo.config
    if not getattr(config, "use_recursive_dict_tags_for_guards", False):
        return False
    config.use_recursive_dict_tags_for_guards = False
    return True


def _function(kind: str, unet: torch.nn.Module) -> Step:
    """What a saved step holds, and the eager reference it is checked against: a closure whose one free
    variable is ``unet`` (the external data's name at save and load)."""
    if kind == "plain":
        def call(sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return unet(sample, timestep, encoder_hidden_states=cond, return_dict=False)[0]

        return call

    def step(*tensors: torch.Tensor) -> torch.Tensor:
        return guided_euler_ancestral_step(unet, *tensors)

    return step


def _name(kind: str, args: tuple[torch.Tensor, ...]) -> str:
    """A saved step's file name: the static step's carries its job count."""
    return f"static-{args[0].shape[0]}" if kind == "static" else kind


def _guard_filter() -> Callable:
    keep = getattr(torch.compiler, "keep_tensor_guards_unsafe", None)
    return keep or torch.compiler.skip_all_guards_unsafe


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A copy with the same dispatch keys (inference tensor or not): the saved step's guards check them."""
    with torch.inference_mode(t.is_inference()):
        return t.clone()


def _relative_difference(out: torch.Tensor, reference: torch.Tensor) -> float:
    diff = (out.float() - reference.float()).norm()
    return float(diff / reference.float().norm().clamp_min(1e-6))


class SavedSteps:
    """A denoiser's steps compiled ahead of time: the home-shape step per padded job count, one symbolic step
    for every other shape, and the unguided jobs' UNet call. ``run`` takes a batch's step through it, or returns None where the
    denoiser should use its ``torch.compile`` step (a failure, or a class that did not match the eager step).

    ``backend`` and ``options`` are inductor's on a GPU; tests pass a lighter backend."""

    def __init__(self, folder: Path, unet: torch.nn.Module, backend: str = "inductor",
                 options: dict[str, dict[str, Any]] | None = None) -> None:
        self.folder = folder / STEPS_DIR / unet_key(unet)
        self.unet = unet
        self.backend = backend
        self.options = options if options is not None else {"static": STATIC_STEP_OPTIONS,
                                                            "symbolic": UNET_COMPILE_OPTIONS,
                                                            "plain": UNET_COMPILE_OPTIONS}
        self._steps: dict[str, Step] = {}
        self._failed: set[str] = set()  # steps that could not be had: torch.compile serves them
        self._checked: dict[tuple, bool] = {}  # class of shape -> whether the saved step matched the eager one
        self._lock = threading.Lock()  # the serving thread and a compile thread may meet a step at once
        self.loaded: list[str] = []  # what came from files (the log and the tests read it)
        self.compiled: list[str] = []  # what was compiled here and saved

    def file(self, name: str) -> Path:
        return self.folder / f"{name}.bin"

    def run(self, kind: str, args: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """This batch's ``kind`` of step (static, symbolic or plain) through the saved function (``step``); None:
        run it with ``torch.compile`` instead (none saved for it, or the call failed, e.g. a tensor guard: then
        never again for its class)."""
        fn = self.step(kind, args)
        if fn is None:
            return None
        if args[0].is_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return fn(*args)
        except Exception as err:
            name = _name(kind, args)
            log.warning("the saved %s step failed for a batch of %d at %dx%d latents (%s: %s); torch.compile serves "
                        "that class from now on", name, args[0].shape[0], *args[0].shape[-2:], type(err).__name__,
                        str(err)[:300])
            with self._lock:
                self._checked[(name, args[0].shape[0], tuple(args[0].shape[-2:]))] = False
            return None

    def step(self, kind: str, args: tuple[torch.Tensor, ...]) -> Step | None:
        """The saved step for this batch (``guided_euler_ancestral_step``'s tensors, or the UNet call's for
        ``plain``; unmarked), loading or compiling it on first use; None: use ``torch.compile``."""
        jobs, size, name = args[0].shape[0], tuple(args[0].shape[-2:]), _name(kind, args)
        with self._lock:
            fn = self._steps.get(name)
            if fn is None:
                if name in self._failed:
                    return None
                if kind != "static" and jobs < 2 and not self.file(name).is_file():
                    # compiled at one job the symbolic step would be specialised to it (dynamo never lets a
                    # symbolic size stand for 1): torch.compile serves this batch, and a wider one saves it
                    return None
                fn = self._get(name, kind, args)
                if fn is None:
                    self._failed.add(name)
                    return None
                self._steps[name] = fn
            key = (name, jobs, size)
            if key not in self._checked:
                self._checked[key] = self._matches_eager(fn, kind, name, args)
            return fn if self._checked[key] else None

    def _get(self, name: str, kind: str, args: tuple[torch.Tensor, ...]) -> Step | None:
        path = self.file(name)
        if path.is_file():
            try:
                fn = self._load(path, kind)
            except Exception as err:
                log.warning("saved step %s cannot be loaded (%s: %s); compiling it again", path, type(err).__name__,
                            str(err)[:300])
            else:
                self.loaded.append(name)
                log.info("loaded the %s step compiled ahead of time (%s)", name, path)
                return fn
        try:
            self._compile_and_save(path, kind, args)
            fn = self._load(path, kind)  # the same function a later start gets, called the same way
        except Exception as err:
            log.warning("could not compile the %s step ahead of time (%s: %s); torch.compile serves it", name,
                        type(err).__name__, str(err)[:300])
            return None
        self.compiled.append(name)
        log.info("compiled the %s step ahead of time and saved it to %s", name, path)
        return fn

    def _compile_and_save(self, path: Path, kind: str, args: tuple[torch.Tensor, ...]) -> None:
        if hasattr(torch._dynamo.config, "enable_aot_compile"):  # torch 2.11 has it behind this flag
            torch._dynamo.config.enable_aot_compile = True
        example = tuple(_copy(t) for t in args)  # marked for the compile only: the caller's stay unmarked
        static = kind == "static"
        if not static:
            mark_sizes_dynamic(*example)
        options = {**self.options[kind], "guard_filter_fn": _guard_filter()}
        compiled = torch.compile(_function(kind, self.unet), backend=self.backend, fullgraph=True,
                                 dynamic=False if static else None, options=options).aot_compile((example, {}))
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            compiled.save_compiled_function(str(tmp), external_data={"unet": self.unet})
            os.replace(tmp, path)  # compile children may write the same step: whole files only
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _load(self, path: Path, kind: str) -> Step:
        # The file does not hold the compile options: inductor's post-compile steps (the CUDA-graph wrapper)
        # read them from its config while it loads, so they are set for the load (and only for it).
        options = self.options[kind] if self.backend == "inductor" else {}
        import torch._inductor.config as inductor_config

        with inductor_config.patch(options), open(path, "rb") as fh:
            return torch.compiler.load_compiled_function(fh, f_globals=globals(), external_data={"unet": self.unet})

    def _matches_eager(self, fn: Step, kind: str, name: str, args: tuple[torch.Tensor, ...]) -> bool:
        """Once per class of shape: the saved step against the eager one on this batch's tensors."""
        try:
            reference = _function(kind, self.unet)(*args)
            if args[0].is_cuda:
                torch.compiler.cudagraph_mark_step_begin()
            out = fn(*args).clone()
        except Exception as err:
            log.warning("the saved %s step fails for a batch of %d at %dx%d latents (%s: %s); torch.compile serves "
                        "that class", name, args[0].shape[0], *args[0].shape[-2:], type(err).__name__,
                        str(err)[:300])
            return False
        difference = _relative_difference(out, reference)
        if difference > CHECK_TOLERANCE:
            log.warning("the saved %s step differs from the eager one for a batch of %d at %dx%d latents (%.3g); "
                        "torch.compile serves that class", name, args[0].shape[0], *args[0].shape[-2:], difference)
            return False
        return True
