"""The engine against the reference flow (Apple's demo on stock pieces): same tokens, same image.

Every speed-up must keep this file green.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cached_guidance, denoise, guide, make_image, prompt_inputs
from reference import demo_prompt, reference_edit, reference_generate

from mgie_engine.conversation import build_edit_prompt
from mgie_engine.images import prepare_image
from mgie_engine.pipeline import EditRequest, MgiePipeline

CASES = [
    # (image size, image seed, instruction, seed, text_cfg, image_cfg, steps)
    ((64, 48), 0, "make the sky a sunset", 13331, 7.5, 1.5, 8),
    ((40, 72), 1, "turn the day into night", 7, 7.0, 2.0, 6),
    ((56, 56), 2, "give him a beard", 123456789, 8.5, 0.7, 5),  # image_cfg < 1: diffusers turns guidance off
    ((80, 32), 3, "remove the text, then sharpen it", 0, 1.0, 1.5, 4),  # text_cfg 1: no guidance either
]


def _assert_same_image(a, b, atol: int = 1) -> None:
    x, y = np.asarray(a).astype(int), np.asarray(b).astype(int)
    assert x.shape == y.shape
    assert np.abs(x - y).max() <= atol, f"max pixel difference {np.abs(x - y).max()}"


@pytest.mark.parametrize("models_fixture", ["tiny_models", "tiny_models_babbling"])
@pytest.mark.parametrize("case", CASES, ids=[c[2][:12] for c in CASES])
def test_engine_matches_reference(request, models_fixture, case):
    models = request.getfixturevalue(models_fixture)
    size, image_seed, instruction, seed, text_cfg, image_cfg, steps = case
    pipe = MgiePipeline(models, max_side=64)
    source = make_image(*size, seed=image_seed)
    result = pipe(EditRequest(image=source, instruction=instruction, seed=seed, text_cfg=text_cfg,
                              image_cfg=image_cfg, steps=steps))
    prepared = prepare_image(source, 64, models.vae_scale_factor)
    ref = reference_edit(models, prepared, instruction, seed, text_cfg, image_cfg, steps)

    guidance, cached = cached_guidance(pipe, prepared, instruction)
    assert cached
    # The engine stops at [IMG7]; the reference runs on to </s> or 96 tokens. Up to the stop they agree.
    assert list(guidance.new_token_ids) == ref.new_token_ids[:len(guidance.new_token_ids)]
    if guidance.stopped_early:
        assert ref.new_token_ids[len(guidance.new_token_ids) - 1] == models.token_ids.img[-1]
    else:
        assert list(guidance.new_token_ids) == ref.new_token_ids
    assert result.expressive_instruction == ref.expressive_instruction
    torch.testing.assert_close(guidance.prompt_embeds, ref.prompt_embeds, rtol=1e-4, atol=1e-5)
    latents = denoise(pipe, prepared, guidance.prompt_embeds, seed, text_cfg, image_cfg, steps)
    # The engine's own decoder and fused guided step do the reference's arithmetic: float32 noise, nothing more.
    torch.testing.assert_close(latents, ref.latents, rtol=1e-3, atol=2e-4)
    assert (result.width, result.height) == prepared.size
    _assert_same_image(result.image, ref.image)


def test_planted_checkpoint_exercises_early_stop(tiny_models):
    pipe = MgiePipeline(tiny_models, max_side=64)
    guidance, _ = cached_guidance(pipe, make_image(64, 64, 5), "make the frame red")
    img = tiny_models.token_ids.img
    assert guidance.stopped_early
    assert list(guidance.new_token_ids[-8:]) == list(img)
    assert guidance.expressive_instruction  # a sentence before [IMG0], cleaned


def test_babbling_checkpoint_exercises_fallback(tiny_models_babbling):
    pipe = MgiePipeline(tiny_models_babbling, max_side=64)
    guidance, _ = cached_guidance(pipe, make_image(64, 64, 5), "make the frame red")
    assert not guidance.stopped_early
    assert tiny_models_babbling.token_ids.img[0] not in guidance.new_token_ids
    assert len(guidance.new_token_ids) == 96


def test_prompt_is_the_demos_byte_for_byte(tiny_models):
    for instruction in ("make the sky a sunset", "it's \"quoted\" and 日本語"):
        assert build_edit_prompt(instruction, tiny_models.num_patches) == demo_prompt(instruction, tiny_models.num_patches)


@pytest.mark.parametrize("models_fixture", ["tiny_models", "tiny_models_babbling"])
def test_history_prompt_matches_stock_generate(request, models_fixture):
    """With earlier turns in the prompt, the engine's decoding still equals stock generate's."""
    models = request.getfixturevalue(models_fixture)
    pipe = MgiePipeline(models, max_side=64)
    image = prepare_image(make_image(48, 64, 9), 64, models.vae_scale_factor)
    history = (("make the sky a sunset", "The sky turns orange."), ("add birds", "Birds fly in the sky."))
    guidance = guide(pipe, image, "make it night", history)
    ids, embeds = prompt_inputs(pipe, image, "make it night", history)
    seq, states = reference_generate(models, ids, embeds)
    assert list(guidance.new_token_ids) == seq[len(ids):len(ids) + len(guidance.new_token_ids)]
    torch.testing.assert_close(guidance.prompt_embeds, models.edit_head(states.unsqueeze(0), models.img_embeds),
                               rtol=1e-4, atol=1e-5)
    # The history changes what the model reads, so it must change what it writes back.
    plain = guide(pipe, image, "make it night")
    assert not torch.equal(plain.prompt_embeds, guidance.prompt_embeds)


def test_seed_means_the_same_as_in_diffusers(tiny_models):
    pipe = MgiePipeline(tiny_models, max_side=64)
    source = make_image(64, 64, 3)
    a = pipe(EditRequest(image=source, instruction="make it snowy", seed=42, steps=3))
    b = pipe(EditRequest(image=source, instruction="make it snowy", seed=42, steps=3))
    c = pipe(EditRequest(image=source, instruction="make it snowy", seed=43, steps=3))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert b.llm_cached and c.llm_cached


def test_a_cancelled_decode_stops_with_the_cancel_error(tiny_models_babbling):
    import threading

    from mgie_engine.errors import JobCancelledError

    cancel = threading.Event()
    cancel.set()
    pipe = MgiePipeline(tiny_models_babbling, max_side=64)
    with pytest.raises(JobCancelledError):
        guide(pipe, make_image(64, 64, 2), "make it night", cancel=cancel)


def test_decoded_pixels_are_exactly_diffusers_postprocess(tiny_models):
    """The engine turns decoded pixels into bytes on the device; the bytes must be diffusers' own."""
    pipe = MgiePipeline(tiny_models, max_side=64)
    latents = torch.randn(3, 4, 6, 8, generator=torch.Generator().manual_seed(0)) * 3  # values past [-1, 1] too
    images = pipe.decode([latents])
    with torch.inference_mode():
        decoded = tiny_models.vae.decode(latents / tiny_models.vae.config.scaling_factor, return_dict=False)[0]
    expected = pipe.image_processor.postprocess(decoded, output_type="pil")
    assert [im.size for im in images] == [(64, 48)] * 3
    for ours, theirs in zip(images, expected, strict=True):
        assert ours.mode == theirs.mode == "RGB"
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
