"""The kept compile cache: one folder per (torch, triton, GPU, compile options, engine shapes), reused
across restarts, and torch's portable cache artifacts saved in it after a successful warm-up.

A persistent inductor/triton cache skips kernel generation on a warm start (the FX-graph and AOTAutograd
caches skip most of lowering), but dynamo still traces. The folder's name is a hash of everything that
makes cached code invalid or useless, so an upgrade of torch or a new card starts a fresh folder instead
of mixing kernels. ``artifacts.bin`` holds ``torch.compiler.save_cache_artifacts()``: inductor,
AOTAutograd, autotuning and dynamic-shape (PGO) entries in one file that can be copied to another host
with the same versions and card (``mgie-worker --precompile`` writes it ahead of time).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .settings import EngineSettings

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ARTIFACTS_FILE = "artifacts.bin"
KEY_VERSION = 1  # bump when the engine's compiled functions change in a way the inputs below miss


def _package_version(*names: str) -> str:
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "none"


def key_inputs(settings: EngineSettings, device: torch.device, capacity: int) -> dict[str, Any]:
    """What the folder's name hashes: versions, the card, the compile options and the engine's shapes."""
    import torch

    from .compilation import STATIC_STEP_OPTIONS, UNET_COMPILE_OPTIONS
    from .decoding import LAYER_COMPILE_OPTIONS
    from .denoiser import JOB_BUCKETS

    gpu = "cpu"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{props.name} sm_{props.major}{props.minor}"
    inputs = {"key_version": KEY_VERSION, "torch": torch.__version__, "cuda": torch.version.cuda,
              "triton": _package_version("triton", "pytorch-triton"), "gpu": gpu,
              "options": {"unet": UNET_COMPILE_OPTIONS, "static_step": STATIC_STEP_OPTIONS,
                          "layer": LAYER_COMPILE_OPTIONS},
              "dtype": str(settings.torch_dtype(device)), "max_side": settings.max_side,
              "jobs_bucket": next((b for b in JOB_BUCKETS if b >= capacity), capacity)}
    if settings.compile_aot:
        # Saved steps compile other graphs than torch.compile's steps: a folder filled one way looks warm to the
        # other (no compile child) and then compiles everything in-process (over 9 minutes on an H200,
        # bench/NOTES.md "Stop 27 on the H200"). Only added when on: other folders keep their names.
        inputs["steps"] = "ahead of time"
    if settings.size_step is not None:
        # Another working grid may move the home square (images.snap_size), whose static step the warm-up compiles;
        # only added when set, so auto's folders keep their names.
        inputs["size_step"] = settings.size_step
    return inputs


def cache_key(inputs: dict[str, Any]) -> str:
    """A short stable hash of ``key_inputs``."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_root(settings: EngineSettings) -> Path:
    """MGIE_COMPILE_CACHE_DIR, else ``<MGIE_DATA_DIR>/compile-cache``."""
    root = settings.compile_cache_dir or os.path.join(settings.data_dir, "compile-cache")
    return Path(root).expanduser().resolve()


def cache_folder(settings: EngineSettings, device: torch.device, capacity: int) -> Path:
    """This worker's folder: ``<root>/<key>``."""
    return cache_root(settings) / cache_key(key_inputs(settings, device, capacity))


def use_cache_folder(folder: Path) -> None:
    """Point inductor and triton at ``folder`` (before anything compiles) with the FX-graph and
    AOTAutograd caches on. The environment is the process's: workers of one process on cards of one
    kind share the folder; on a host with mixed cards run one ``mgie-worker`` per GPU instead."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    try:
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config

        inductor_config.fx_graph_cache = True
        functorch_config.enable_autograd_cache = True
    except Exception:  # older torch: the environment variables above are what it reads
        log.debug("could not switch the FX-graph/AOTAutograd caches on through their configs", exc_info=True)
    log.info("compile cache: %s", folder)


def load_artifacts(folder: Path) -> bool:
    """Put a saved ``artifacts.bin`` back into torch's caches before compiling; a missing file is a
    first start, a bad or stale one is logged and ignored (the compile then fills the cache afresh)."""
    path = folder / ARTIFACTS_FILE
    if not path.is_file():
        log.info("no saved compile artifacts in %s yet (first start: compiling takes minutes)", folder)
        return False
    try:
        import torch

        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as err:
        log.warning("ignoring the compile artifacts in %s (%s: %s)", path, type(err).__name__, err)
        return False
    if info is None:
        log.warning("ignoring the compile artifacts in %s (torch found none it can use)", path)
        return False
    counts = {kind: len(entries) for kind, entries in getattr(info, "artifacts", {}).items()}
    log.info("loaded compile artifacts from %s: %s", path, counts or "none")
    return True


def save_artifacts(folder: Path, name: str = ARTIFACTS_FILE) -> Path | None:
    """Write torch's portable cache artifacts of this process's compiles to ``folder/artifacts.bin`` (or
    ``name``: a compile child's share) atomically; None when torch has none to give. Never raises: a full
    disk costs the next start time, not this worker."""
    path = folder / name
    try:
        import torch

        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            log.info("torch has no compile artifacts to save")
            return None
        data, _info = saved
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except Exception:
        log.warning("could not save the compile artifacts to %s", path, exc_info=True)
        return None
    log.info("saved compile artifacts (%.1f MB) to %s", len(data) / 2**20, path)
    return path
