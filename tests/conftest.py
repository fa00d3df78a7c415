"""Shared fixtures: tiny checkpoints written once per session and the engines loaded on them."""

from __future__ import annotations

import os

# Under pytest-xdist every core already runs a worker; torch's default of one OpenMP thread per core would put
# two threads on each core, and their spin-waits make small ops 10-50x slower. Set before anything imports torch
# (the bot and CLI subprocesses that tests start inherit it).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402

from mgie_engine.settings import EngineSettings  # noqa: E402


def tiny_settings(paths, **overrides) -> EngineSettings:
    return EngineSettings(ckpt_dir=str(paths.mgie), ip2p=str(paths.ip2p), clip=str(paths.clip), device="cpu",
                          **overrides)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """Tiny checkpoints whose LLM answers with a sentence, [IMG0]..[IMG7] and </s>, like the real one."""
    from mgie_engine.tiny import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny-planted"), seed=0, plant_visual_tokens=True)


@pytest.fixture(scope="session")
def tiny_paths_babbling(tmp_path_factory):
    """Tiny checkpoints whose LLM never emits [IMG0]: the demo's fallback path, all 96 tokens."""
    from mgie_engine.tiny import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny-babbling"), seed=1, plant_visual_tokens=False)


@pytest.fixture(scope="session")
def tiny_models(tiny_paths):
    from mgie_engine.models import load_models

    return load_models(tiny_settings(tiny_paths))


@pytest.fixture(scope="session")
def tiny_models_babbling(tiny_paths_babbling):
    from mgie_engine.models import load_models

    return load_models(tiny_settings(tiny_paths_babbling))


def make_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """A smooth gradient plus noise: some structure, different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), (x + y) / max(width + height - 2, 1)], -1)
    pixels = np.clip(base * 200 + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels, "RGB")


@pytest.fixture(autouse=True, scope="session")
def _offline_hub():
    """Tests never reach the Hub: a missing file must fail fast with our message, not hang on a timeout."""
    import os

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


# -- one job through the pipeline's batched calls (the pipeline itself only takes lists) -----------------
def guide(pipe, image, instruction: str, history=(), cancel=None):
    """One prompt's guidance, decoded afresh (never from the cache)."""
    from mgie_engine.inputs import Prompt

    return pipe.guidance([Prompt(image, instruction, history)], cancel, use_cache=False)[0][0]


def cached_guidance(pipe, image, instruction: str, history=()):
    """One prompt's (guidance, whether it came from the cache)."""
    from mgie_engine.inputs import Prompt

    return pipe.guidance([Prompt(image, instruction, history)])[0]


def prompt_inputs(pipe, image, instruction: str, history=()):
    from mgie_engine.inputs import Prompt

    return pipe.prompt_inputs([Prompt(image, instruction, history)])[0]


def start_one(pipe, image, prompt_embeds, seed, text_cfg, image_cfg, steps):
    from mgie_engine.denoiser import DenoiseJob

    return pipe.start_denoising([DenoiseJob(image, prompt_embeds, seed, text_cfg, image_cfg, steps)])[0]


def denoise(pipe, image, prompt_embeds, seed, text_cfg, image_cfg, steps):
    """One job's final latents, stepped alone."""
    state = start_one(pipe, image, prompt_embeds, seed, text_cfg, image_cfg, steps)
    while not state.done:
        pipe.denoise_step([state])
    return state.latents


# Tests that keep both cores busy on their own (inductor compiles, the benchmark scripts' subprocesses) or that
# time the bot's answers under load (the soak, the lifecycle, the 500-request admission test, the Redis pool's
# processes) run one after another on one pytest-xdist worker
# (`-n auto --dist loadgroup`), so that none of them starves another; the rest share the other worker(s).
# A file, or one test of a file ("file::test"): the warm-up's compile count traces with dynamo on one core (75 s),
# so it runs beside the group, and only its inductor compile joins it.
# Not in effect with pytest 9.2 and pytest-xdist 3.8: loadgroup spreads even statically marked tests over the
# workers (checked with a three-test group on two workers), so today these share both workers with the rest.
_ONE_AT_A_TIME = {"test_bench_scripts.py", "test_soak.py", "test_bot_lifecycle.py", "test_bot_redis_pool.py",
                  "test_redis_worker.py", "test_bench_redis.py", "test_bot_admission.py", "test_bot_redis_previews.py",
                  "test_warm_up.py::test_compiled_vae_functions_match_eager"}


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one pytest-xdist worker more than the cores this process may use. Many tests spend seconds
    waiting on the processes they start (workers, the bot, redis-server) or on their timeouts; on the 2-core CI
    machine three workers ran the suite in 468 s against 530 s for two."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores + 1


def pytest_collection_modifyitems(config, items):
    for item in items:
        if {item.path.name, f"{item.path.name}::{item.originalname}"} & _ONE_AT_A_TIME:
            item.add_marker(pytest.mark.xdist_group("one-at-a-time"))
