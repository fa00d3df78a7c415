"""A worker's start: the worker thread's CUDA set-up, loading the models, and the compile warm-up (in the
background, while the eager pipeline serves: serving_modes.py; first in a child process when the card has
room for one: compile_child.py)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .serving_modes import ServingModes, compile_in_background, count_compiles
from .settings import EngineSettings

if TYPE_CHECKING:
    import torch

    from .compile_child import ChildLauncher, ChildRuns
    from .models import MgieModels
    from .pipeline import MgiePipeline

log = logging.getLogger(__name__)

SafetyCheck = Callable[[Any], bool]  # image -> flagged


def prepare_thread(settings: EngineSettings) -> None:
    """Set up the calling (worker) thread for its device: CUDA graph state, and the current device. Nothing
    to do off CUDA (there it would only import inductor: a second on the CPU VM)."""
    if settings.torch_device().type != "cuda":
        return
    _cudagraphs_in_this_thread()
    if settings.device.startswith("cuda"):  # so nothing lands on GPU 0 by default
        import torch

        torch.cuda.set_device(settings.torch_device())


def load(settings: EngineSettings, name: str, capacity: int, loader: Callable[[EngineSettings], MgieModels] | None,
         publish: Callable[[MgiePipeline], None], modes: ServingModes | None = None,
         child_launcher: ChildLauncher | None = None) -> SafetyCheck | None:
    """Load the models and publish the pipeline that serves first. When the worker compiles (MGIE_COMPILE,
    ``EngineSettings.compile_on``), that is an eager pipeline, and the compiled one warms up in the
    background (serving_modes.py; ``modes`` says which serves), after a compile child when one fits
    (MGIE_COMPILE_CHILD; ``child_launcher`` says how to start it). Returns the optional safety check.
    Raises whatever loading raises."""
    from .models import load_models

    modes = modes or ServingModes()
    device = settings.torch_device()
    compile_on = settings.compile_on(device)
    models = (loader or load_models)(settings)
    # The compiled pipeline first: it sets the models up for compiled kernels (memory layouts) before the
    # eager one records any CUDA graph of them. Nothing compiles before its first call.
    pipeline = new_pipeline(settings, models, compile_unet=compile_on)
    folder = None
    if compile_on and (pipeline.compiles or device.type == "cuda"):  # (offload: the decoder's layers)
        count_compiles()
        folder = prepare_compile_cache(settings, device, capacity)
        use_saved_steps(settings, pipeline, folder)
    if pipeline.compiles:
        eager = new_pipeline(settings, models, compile_unet=False)
        eager.language.cache = pipeline.language.cache  # one guidance cache whichever mode serves
        publish(eager)
        child = plan_compile_child(settings, models, capacity, folder, child_launcher, modes,
                                   custom_models=loader is not None)
        compile_in_background(name, pipeline, capacity, modes, lambda: prepare_thread(settings), folder,
                              child=child, switch_interval=settings.compile_switch_interval,
                              give_way=settings.compile_give_way, park=settings.compile_aot)
    else:
        publish(pipeline)
        modes.eager_only()
    if settings.safety_checker:
        from .safety import load_safety_checker

        return load_safety_checker(settings, models.device, models.dtype)
    return None


def plan_compile_child(settings: EngineSettings, models: MgieModels, capacity: int, folder: Path | None,
                       launcher: ChildLauncher | None, modes: ServingModes,
                       custom_models: bool = False) -> ChildRuns | None:
    """The compile children to run first, or None: MGIE_COMPILE_CHILD, the free device memory against the
    weights' size, a warm cache (compile_child.decide); as many side by side as there are independent
    warm-up groups and room (``compile_child.how_many``, MGIE_COMPILE_CHILDREN). They need the kept cache
    folder to share, and models they can load themselves from the settings: not a custom loader's (the
    benches'), unless the caller gives the children's ``launcher`` too."""
    from . import compile_child
    from .compile_cache import ARTIFACTS_FILE
    from .warm_up import compile_groups

    free = weights = None
    if folder is None:
        use, why = False, "no compile cache folder to share"
    elif custom_models and launcher is None:
        use, why = False, "the models come from a custom loader, which a child cannot run"
    else:
        free = compile_child.free_bytes(models.device) if settings.compile_child is None else None
        weights = compile_child.model_bytes(models) if free is not None else 0
        use, why = compile_child.decide(settings.compile_child, weights, free, (folder / ARTIFACTS_FILE).is_file())
    if not use:
        log.info("compiling in this process (no compile child: %s)", why)
        modes.child_outcome = f"not used: {why}"
        return None
    groups = compile_groups(settings.max_side, capacity, saved_steps=settings.compile_aot)
    count = compile_child.how_many(settings.compile_children, len(groups), weights or 0, free,
                                   compile_child.host_cores())
    log.info("compiling in %d child process(es) first (%s)", count, why)
    threads = compile_child.compile_threads_each(count)
    return compile_child.ChildRuns([
        compile_child.ChildRun(launcher or compile_child.ChildLauncher(), settings, capacity, folder, batches=share,
                               index=i, compile_threads=threads)
        for i, share in enumerate(compile_child.shares(groups, count))])


def new_pipeline(settings: EngineSettings, models: MgieModels, compile_unet: bool) -> MgiePipeline:
    """A pipeline on loaded models with the worker's settings. Its working grid (MGIE_SIZE_STEP) follows the
    worker, not ``compile_unet``: a job the eager pipeline prepares may take its next steps compiled, and the
    compile children must warm up the shapes the worker will serve."""
    from .pipeline import MgiePipeline

    step = settings.working_step(settings.compile_on(models.device), models.vae_scale_factor)
    return MgiePipeline(models, max_side=settings.max_side, compile_unet=compile_unet, offload=settings.offload,
                        size_step=step)


def use_saved_steps(settings: EngineSettings, pipeline: MgiePipeline, folder: Path | None) -> None:
    """With MGIE_COMPILE_AOT, the compiled pipeline's denoising steps are compiled ahead of time into the kept
    cache folder, or loaded from it (saved_steps.py)."""
    if settings.compile_aot and folder is not None and pipeline.compiles:
        from .saved_steps import SavedSteps, without_recursive_dict_tag_guards

        if without_recursive_dict_tag_guards():
            log.info("dynamo's recursive dict-tag guards turned off for the saved steps (as torch 2.12 does)")
        pipeline.denoiser.saved = SavedSteps(folder, pipeline.models.unet)
        log.warning("MGIE_COMPILE_AOT=1 is experimental: denoising steps compiled ahead of time are saved in and "
                    "loaded from %s. On torch 2.11 (H200) workers serving them crashed in garbage collection; "
                    "see bench/NOTES.md before relying on it", pipeline.denoiser.saved.folder)


def prepare_compile_cache(settings: EngineSettings, device: torch.device, capacity: int,
                          folder: Path | None = None) -> Path | None:
    """Point torch at this worker's kept compile cache (or ``folder``) and load its saved artifacts
    (compile_cache.py); None, logged, when the folder cannot be used (the compile then uses torch's
    default folder)."""
    from .compile_cache import cache_folder, load_artifacts, use_cache_folder

    try:
        folder = folder or cache_folder(settings, device, capacity)
        use_cache_folder(folder)
    except Exception:
        log.warning("cannot use the compile cache folder; compiling without a kept cache", exc_info=True)
        return None
    load_artifacts(folder)
    return folder


def precompile(settings: EngineSettings, capacity: int | None = None,
               loader: Callable[[EngineSettings], MgieModels] | None = None, folder: Path | None = None,
               only: Collection[int] | None = None, artifacts: str | None = None, children: bool = False,
               child_launcher: ChildLauncher | None = None) -> Path:
    """``mgie-worker --precompile`` and the compile child: load the models, run the production warm-up
    compiled (in this thread, nothing served; ``only``: those warm-up batches, a child's share), save the
    cache artifacts (as ``artifacts`` in ``folder``, by default artifacts.bin in this worker's cache
    folder); returns the artifact file. With ``children`` (``--precompile``), compile children fill the
    cache side by side first where the card has room, as a worker's first start does (compile_child.py),
    and the warm-up here then runs on hot caches. Raises on any failure, and when this device does not
    compile (the CPU, offload)."""
    from .compile_cache import ARTIFACTS_FILE, save_artifacts
    from .errors import MgieError
    from .models import load_models

    capacity = capacity or settings.max_batch
    prepare_thread(settings)
    device = settings.torch_device()
    if not settings.compile_on(device):
        raise MgieError(f"nothing to precompile: a worker on {device} does not compile (MGIE_COMPILE, "
                        "MGIE_OFFLOAD)")
    folder = prepare_compile_cache(settings, device, capacity, folder)
    if folder is None:
        raise MgieError("cannot use the compile cache folder (see the log)")
    models = (loader or load_models)(settings)
    pipeline = new_pipeline(settings, models, compile_unet=True)
    if not pipeline.compiles:
        raise MgieError(f"nothing to precompile: the pipeline on {device} runs without compiled steps")
    use_saved_steps(settings, pipeline, folder)
    started = time.perf_counter()
    if children:
        runs = plan_compile_child(settings, models, capacity, folder, child_launcher, ServingModes(),
                                  custom_models=loader is not None)
        if runs is not None:
            from .compile_child import run_to_end

            run_to_end(runs, threading.Event(), "precompile")
    pipeline.warm_up(capacity, only)
    log.info("precompiled in %.0f s", time.perf_counter() - started)
    name = artifacts or ARTIFACTS_FILE
    path = save_artifacts(folder, name)
    if path is None:
        raise MgieError(f"the compile left no cache artifacts to save in {folder / name}")
    return path


def _cudagraphs_in_this_thread() -> None:
    """Compiled models replay CUDA graphs kept in thread-local state, which PyTorch before 2.13 sets up
    only for threads it starts itself; set it up for this worker thread the same way."""
    import torch

    try:
        from torch._inductor import cudagraph_trees as trees
    except ImportError:
        return
    if hasattr(trees, "_initialize_tls") or torch._C._is_key_in_tls("tree_manager_containers"):
        return  # PyTorch initializes it lazily itself
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = collections.defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", trees.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", trees.local.tree_manager_locks)
