"""A worker's start: the worker thread's CUDA set-up, loading the models, and the compile warm-up."""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .settings import EngineSettings

if TYPE_CHECKING:
    from .models import MgieModels
    from .pipeline import MgiePipeline

log = logging.getLogger(__name__)

SafetyCheck = Callable[[Any], bool]  # image -> flagged


def prepare_thread(settings: EngineSettings) -> None:
    """Set up the calling (worker) thread for its device: CUDA graph state, and the current device."""
    _cudagraphs_in_this_thread()
    if settings.device.startswith("cuda"):  # so nothing lands on GPU 0 by default
        import torch

        torch.cuda.set_device(settings.torch_device())


def load(settings: EngineSettings, name: str, capacity: int, loader: Callable[[EngineSettings], MgieModels] | None,
         publish: Callable[[MgiePipeline], None]) -> SafetyCheck | None:
    """Load the models and build the pipeline (compiled and warmed up when settings ask for it), handing
    each pipeline built to ``publish`` at once (inputs arriving during the warm-up are prepared for it);
    returns the optional safety check. Raises whatever loading raises."""
    from .models import load_models

    if settings.compile and settings.compile_cache_dir:
        # Read by inductor when it compiles: kernels compiled before a restart are reused after it.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(settings.compile_cache_dir)
    models = (loader or load_models)(settings)
    pipeline = new_pipeline(settings, models, compile_unet=settings.compile)
    publish(pipeline)
    if pipeline.compiles:
        _warm_up(settings, name, capacity, models, pipeline, publish)
    if settings.safety_checker:
        from .safety import load_safety_checker

        return load_safety_checker(settings, models.device, models.dtype)
    return None


def new_pipeline(settings: EngineSettings, models: MgieModels, compile_unet: bool) -> MgiePipeline:
    """A pipeline on loaded models with the worker's settings."""
    from .pipeline import MgiePipeline

    return MgiePipeline(models, max_side=settings.max_side, compile_unet=compile_unet, offload=settings.offload)


def _warm_up(settings: EngineSettings, name: str, capacity: int, models: MgieModels, pipeline: MgiePipeline,
             publish: Callable[[MgiePipeline], None]) -> None:
    """Compile now, while the bot says "warming up", not in the first users' edits. A compiler that
    fails here would fail every job: run uncompiled instead (slower), and say so."""
    from .faults import free_memory

    log.info("worker %s: compiling for every class of shape (8 minutes or more the first time on an H100; "
             "MGIE_COMPILE_CACHE_DIR keeps the kernels across restarts)", name)
    started = time.perf_counter()
    try:
        pipeline.warm_up(capacity)
    except Exception:
        log.exception("worker %s: compiling failed; running without compiled steps (slower)", name)
        free_memory()
        publish(new_pipeline(settings, models, compile_unet=False))
    else:
        log.info("worker %s: compiled in %.0f s", name, time.perf_counter() - started)


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
