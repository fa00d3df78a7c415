"""Batching: a job's output must not depend on what else shares its batch."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_guidance, denoise, guide, make_image, start_one

from mgie_engine.images import prepare_image
from mgie_engine.inputs import Prompt
from mgie_engine.pipeline import MgiePipeline


def _pipe_image_embeds(models, seed: int) -> tuple[MgiePipeline, object, torch.Tensor]:
    """A pipeline, a 64x48 image and the prompt embeddings the LLM gives it: what a denoising test starts from."""
    pipe = MgiePipeline(models, max_side=64)
    image = prepare_image(make_image(64, 48, seed), 64)
    return pipe, image, guide(pipe, image, "make it snowy").prompt_embeds


@pytest.mark.parametrize("models_fixture", ["tiny_models", "tiny_models_babbling"])
def test_batched_decoding_equals_one_at_a_time(request, models_fixture):
    models = request.getfixturevalue(models_fixture)
    pipe = MgiePipeline(models, max_side=64)
    items = [
        (prepare_image(make_image(64, 48, 1), 64), "make the sky a sunset", ()),
        (prepare_image(make_image(40, 64, 2), 64), "turn the day into night, and add a moon over the lake", ()),
        (prepare_image(make_image(64, 64, 3), 64), "now add birds", (("make it red", "The car is red."),)),
    ]
    together = [g for g, _ in pipe.guidance([Prompt(*item) for item in items], use_cache=False)]
    for item, batched in zip(items, together, strict=True):
        alone = guide(pipe, *item)
        assert batched.new_token_ids == alone.new_token_ids
        assert batched.expressive_instruction == alone.expressive_instruction
        assert batched.stopped_early == alone.stopped_early
        torch.testing.assert_close(batched.prompt_embeds, alone.prompt_embeds, rtol=1e-4, atol=1e-5)


def test_batched_denoising_equals_one_at_a_time(tiny_models):
    """Jobs with their own seeds, CFGs (guided and not) and step counts, joining at different steps."""
    pipe, image, embeds = _pipe_image_embeds(tiny_models, 7)
    specs = [(1, 7.5, 1.5, 6), (2, 8.5, 0.7, 4), (3, 7.0, 2.0, 5)]
    alone = [denoise(pipe, image, embeds, *spec) for spec in specs]

    states = [start_one(pipe, image, embeds, *specs[0])]
    pipe.denoise_step(states)  # the first job is a step ahead when the others join
    states += [start_one(pipe, image, embeds, *spec) for spec in specs[1:]]
    while any(not s.done for s in states):
        pipe.denoise_step([s for s in states if not s.done])
    for state, expected in zip(states, alone, strict=True):
        # Different GEMM shapes round differently: equal up to float32 noise, not bit for bit.
        torch.testing.assert_close(state.latents, expected, rtol=1e-3, atol=1e-4)


def test_guided_jobs_take_the_fused_step_and_unguided_ones_the_scheduler(tiny_models):
    """The fused path must be the one the parity test checks for guided jobs, and agree with the scheduler's."""
    pipe, image, embeds = _pipe_image_embeds(tiny_models, 9)
    fused = start_one(pipe, image, embeds, 5, 7.5, 1.5, 6)
    assert fused.scalars is not None and fused.scalars.shape[0] == 6 and fused.generator is not None
    assert start_one(pipe, image, embeds, 5, 8.5, 0.7, 6).scalars is None  # unguided: the scheduler's path

    pipe.denoiser._fusable = False  # the same job through the scheduler's own step
    plain = start_one(pipe, image, embeds, 5, 7.5, 1.5, 6)
    assert plain.scalars is None
    while not fused.done:
        pipe.denoise_step([fused, plain])
    torch.testing.assert_close(fused.latents, plain.latents, rtol=1e-4, atol=1e-5)


def test_padding_a_job_bucket_leaves_the_jobs_results_alone(tiny_models):
    """On CUDA the fused step pads 3 jobs to a bucket of 4 (one graph per bucket); the padding is inert."""
    pipe, image, embeds = _pipe_image_embeds(tiny_models, 4)
    specs = [(1, 7.5, 1.5, 3), (2, 8.0, 1.2, 3), (3, 7.0, 2.0, 3)]
    plain = [start_one(pipe, image, embeds, *spec) for spec in specs]
    pipe.denoiser.graphs = True  # bucket padding as on CUDA, with the step itself run eagerly
    padded = [start_one(pipe, image, embeds, *spec) for spec in specs]
    while not padded[0].done:
        pipe.denoise_step(padded)
    pipe.denoiser.graphs = False
    while not plain[0].done:
        pipe.denoise_step(plain)
    assert len(pipe.denoiser._pads) == 1
    for a, b in zip(padded, plain, strict=True):
        torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-5)


def test_starting_jobs_together_equals_starting_each_alone(tiny_models):
    """Batched VAE encodes (grouped by image size) give each job the state it would get alone."""
    from mgie_engine.denoiser import DenoiseJob

    pipe = MgiePipeline(tiny_models, max_side=64)
    images = [prepare_image(make_image(*size, seed), 64) for size, seed in (((64, 48), 1), ((40, 64), 2), ((64, 48), 3))]
    embeds = guide(pipe, images[0], "make it snowy").prompt_embeds
    jobs = [DenoiseJob(image, embeds, seed, cfg, 1.5, 4, tag=seed) for seed, (image, cfg) in
            enumerate(zip(images, (7.5, 1.0, 8.0), strict=True))]
    together = pipe.start_denoising(jobs)
    for job, state in zip(jobs, together, strict=True):
        alone = start_one(pipe, job.image, job.prompt_embeds, job.seed, job.text_cfg, job.image_cfg, job.steps)
        assert state.tag == job.tag and state.guided == alone.guided
        torch.testing.assert_close(state.image_latents, alone.image_latents, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state.latents, alone.latents, rtol=0, atol=0)
    assert together[0].image_latents.shape != together[1].image_latents.shape  # two sizes, two encodes


def test_images_prepared_alone_on_other_threads_give_the_stages_what_batch_preprocessing_gives(tiny_models):
    """A worker prepares each input on its CPU threads (``MgiePipeline.prepare``); the pixels and the cache
    key must be exactly those the stages would compute from the images themselves."""
    from concurrent.futures import ThreadPoolExecutor

    pipe = MgiePipeline(tiny_models, max_side=64)
    images = [prepare_image(make_image(64, 48, seed), 64) for seed in range(3)]
    with ThreadPoolExecutor(3) as pool:
        prepared = list(pool.map(pipe.prepare, images))
    clip = tiny_models.vision_processor.preprocess(images, return_tensors="pt")["pixel_values"]
    assert torch.equal(torch.stack([p.clip_pixels for p in prepared]), clip)
    assert torch.equal(torch.stack([p.vae_pixels for p in prepared]), pipe.image_processor.preprocess(images))
    assert len({p.key for p in prepared}) == 3
    first, cached = cached_guidance(pipe, images[0], "make it snowy")
    again, cached_again = cached_guidance(pipe, prepared[0], "make it snowy")
    assert (cached, cached_again) == (False, True) and again is first

