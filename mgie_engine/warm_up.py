"""The load-time warm-up: throwaway edits that compile every class of shape a worker will meet."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

import PIL.Image

from .denoiser import DenoiseJob
from .inputs import Prompt
from .vae import DECODE_BATCH

if TYPE_CHECKING:
    from .pipeline import MgiePipeline

log = logging.getLogger(__name__)


class WarmUpStopped(Exception):
    """The worker is shutting down: the warm-up stopped between two batches (``MgiePipeline.stop_warm_up``)."""


# The warm-up's prompts: a short one, and (second batch) one over 64 tokens longer, a full-length instruction
# after an earlier turn. On CUDA prompts are padded to a multiple of 64 tokens, so the decoder's compiled
# layers meet a second prompt width during the warm-up and not at a user's first long prompt.
WARM_UP_PROMPTS = (
    ("make it brighter", ()),
    ("replace the grey winter sky behind the old stone bridge with a warm orange and pink sunset, add soft "
     "golden light on the water, keep the people walking on the bridge and the trees on both banks as they "
     "are, and make the lamps along the railing glow as if evening has just begun", (
         ("make it brighter", "The photo is brighter, with more light on the bridge and the water."),)),
)


def warm_up_batches(side: int, max_jobs: int) -> list[tuple[int, tuple[int, int], bool]]:
    """(job count, image size, guided) of ``warm_up``'s batches.

    Guided jobs (the fused step): the home shape (a ``side`` square) alone and at ``max_jobs``, for the
    static step; then, for the symbolic one, two and one jobs at another size (a symbolic size never
    stands for 1), and ``max_jobs`` at a small size (a UNet batch of 64 rows or more takes other code in
    diffusers' upsampler: a guard). Unguided jobs (a CFG of 1, or an image CFG below 1) take the plain
    UNet call: two jobs, then one.
    """
    square, other = (side, side), (side * 3 // 4 // 8 * 8, side * 5 // 8 // 8 * 8)
    if max_jobs == 1:
        guided, plain = [(1, square), (1, other)], [(1, other)]
    else:
        guided = [(1, square), (max_jobs, square), (2, other), (1, other)] + [(max_jobs, (64, 64))] * (max_jobs > 2)
        plain = [(2, other), (1, other)]
    return [(n, size, True) for n, size in guided] + [(n, size, False) for n, size in plain]


def compile_groups(side: int, max_jobs: int, saved_steps: bool = False) -> list[tuple[int, ...]]:
    """``warm_up_batches``' indices in groups that can compile in separate processes (compile_child.py).

    Every guided batch is a compile of its own and a group alone: a static-step batch (static sizes, one job
    count each), and each symbolic one, whose graph is the same whether or not another class compiled before
    it in the process (a batch of one is always its own compile; the small size recompiles after the first
    size). The unguided batches stay together (a lone one is padded to the same UNet batch). Every group
    also compiles the VAE and the decoder's layers on its way: small compiles, repeated in parallel.
    Longest first, the small-size batch last: with fewer children than groups it goes to the first child
    (``compile_child.shares``). H200 (results/NVIDIA_H200-coldstart-b8-first-5-children.*): 153 s and 171 s
    for the static step at one and eight jobs, 253 s and 230 s for the symbolic step at two jobs and one,
    240 s for the unguided call; the small-size batch took over 100 s after the two-job one in one child.

    With ``saved_steps`` (MGIE_COMPILE_AOT, saved_steps.py) the symbolic step is compiled once, ahead of time, at
    its first batch of two jobs or more, and serves the other symbolic batches after it: those batches form one
    group, in warm-up order, first (the longest).
    """
    batches = warm_up_batches(side, max_jobs)
    if saved_steps:
        static = [(k,) for k, (_n, size, guided) in enumerate(batches) if guided and size == (side, side)]
        symbolic = tuple(k for k, (_n, _size, guided) in enumerate(batches) if guided and (k,) not in static)
        plain = tuple(k for k, (_n, _size, guided) in enumerate(batches) if not guided)
        return [*([symbolic] if symbolic else []), *static, *([plain] if plain else [])]
    small = [(k,) for k, (n, size, guided) in enumerate(batches) if guided and size == (64, 64) != (side, side)]
    guided = [(k,) for k, (_n, _size, is_guided) in enumerate(batches) if is_guided and (k,) not in small]
    plain = tuple(k for k, (_n, _size, is_guided) in enumerate(batches) if not is_guided)
    return [*guided, *([plain] if plain else []), *small]


def warm_up(pipe: MgiePipeline, max_jobs: int = 1, only: Collection[int] | None = None) -> None:
    """Throwaway batches of two steps each (``warm_up_batches``) that compile every class of shape a
    worker taking up to ``max_jobs`` jobs a step will meet. After it, new shapes only record CUDA graphs
    (about a second), and no user's edit waits minutes for a compile (tests/engine/test_warm_up.py).
    ``only``: just those batches (a compile child's share, ``compile_groups``)."""
    pipe.denoiser.static_jobs = {1, pipe.denoiser.padded(max_jobs)}
    batches = warm_up_batches(pipe.max_side, max_jobs)
    for k, (count, size, guided) in enumerate(batches):
        if only is not None and k not in only:
            continue
        if pipe.before_warm_up_batch is not None:
            pipe.before_warm_up_batch()
        if pipe.stop_warm_up is not None and pipe.stop_warm_up.is_set():
            raise WarmUpStopped(f"stopped before warm-up batch {k + 1}/{len(batches)}")
        started = time.perf_counter()
        images = [pipe.fit_and_prepare(PIL.Image.new("RGB", size, (40 * i, 90, 160))) for i in range(count)]
        instruction, history = WARM_UP_PROMPTS[k == 1]
        guidance = pipe.guidance([Prompt(image, instruction, history) for image in images], use_cache=False)
        states = pipe.start_denoising([DenoiseJob(image, g.prompt_embeds, i, 7.5 if guided else 1.0, 1.5, 2)
                                       for i, (image, (g, _)) in enumerate(zip(images, guidance, strict=True))])
        while not states[0].done:
            pipe.denoise_step(states)
        for start in range(0, count, DECODE_BATCH):
            pipe.decode([s.latents for s in states[start:start + DECODE_BATCH]])
        # A self-hoster watches minutes of this on a first start: say how far it is.
        log.info("warm-up %d/%d: %d %s job(s) at %dx%d in %.0f s", k + 1, len(batches), count,
                 "guided" if guided else "unguided", *size, time.perf_counter() - started)
