"""A compiling worker warms up at load so that no user's edit waits a minute for a compile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import make_image
from torch._dynamo.testing import CompileCounter

from mgie_engine.compilation import always_pass_upsample_size
from mgie_engine.denoiser import DenoiseJob
from mgie_engine.images import prepare_image
from mgie_engine.inputs import Prompt
from mgie_engine.pipeline import MgiePipeline
from mgie_engine.vae import DECODE_BATCH, vae_functions

# name -> (stage, attribute) of the compiled functions; unet: unguided jobs' calls
COMPILED = {"_guided_step": ("denoiser", "_guided_step"), "_home_step": ("denoiser", "_static_step"),
            "unet": ("denoiser", "unet"), "_vae_encode": ("vae", "_encode"), "_vae_decode": ("vae", "_decode")}


def _edit_batch(pipe: MgiePipeline, count: int, size: tuple[int, int], guided: bool = True) -> None:
    images = [prepare_image(make_image(*size, seed=i), pipe.max_side) for i in range(count)]
    guidance = pipe.guidance([Prompt(image, "make it snowy") for image in images], use_cache=False)
    states = pipe.start_denoising([DenoiseJob(image, g.prompt_embeds, i, 7.5, 1.5 if guided else 0.5, 2)
                                   for i, (image, (g, _)) in enumerate(zip(images, guidance, strict=True))])
    while not states[0].done:
        pipe.denoise_step(states)
    for start in range(0, count, DECODE_BATCH):  # as the worker decodes
        pipe.decode([s.latents for s in states[start:start + DECODE_BATCH]])


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # said on switching oneDNN off
def test_after_the_warm_up_no_users_shape_compiles_again(tiny_models):
    """Counts dynamo's compiles of the pipeline's own step and VAE functions (a counting backend in place
    of inductor): the warm-up compiles each, and later job counts and image sizes compile nothing.

    Without oneDNN: on a CPU it is picked for convolutions by batch and image size, guards that CUDA's
    cuDNN convolutions do not have."""
    torch._dynamo.reset()
    pipe = MgiePipeline(tiny_models, max_side=128)
    counters = {name: CompileCounter() for name in COMPILED}
    for name, counter in counters.items():  # the home step is static, as on a GPU
        stage, attribute = getattr(pipe, COMPILED[name][0]), COMPILED[name][1]
        setattr(stage, attribute, torch.compile(getattr(stage, attribute), backend=counter,
                                                dynamic=False if "home" in name else None))
    home_calls = []
    home_step = pipe.denoiser._static_step
    pipe.denoiser._static_step = lambda *tensors: home_calls.append(tuple(tensors[0].shape)) or home_step(*tensors)
    widths = []  # prompt widths the decoder sees (unpadded here; CUDA pads them to a multiple of 64)
    decode = pipe.language.decoder.decode
    pipe.language.decoder.decode = lambda ids, *args, **kwargs: widths.append(ids.shape[1]) or decode(ids, *args, **kwargs)
    upsamplers = tiny_models.unet.num_upsamplers
    always_pass_upsample_size(tiny_models.unet)
    try:
        with torch.backends.mkldnn.flags(enabled=False):
            pipe.warm_up(max_jobs=24)
            after_warm_up = {name: c.frame_count for name, c in counters.items()}
            assert all(after_warm_up.values()), after_warm_up
            assert after_warm_up["_home_step"] == 2  # one job and 24, each static
            # The decoder's compiled layers (CUDA only) meet two 64-token width buckets during the warm-up.
            assert max(widths) - min(widths) >= 64, widths
            for count, size in ((1, (128, 128)), (1, (96, 128)), (1, (128, 72)), (3, (128, 72)), (2, (64, 128)),
                                (22, (72, 64)), (1, (56, 120)), (4, (24, 40)), (24, (128, 128)), (3, (128, 128))):
                home_calls.clear()
                _edit_batch(pipe, count, size)
                assert {name: c.frame_count for name, c in counters.items()} == after_warm_up, (count, size)
                # the home shape at a job count the warm-up ran takes the static step; all else the symbolic one
                assert bool(home_calls) == (size == (128, 128) and count in (1, 24)), (count, size)
            for count, size in ((1, (128, 128)), (3, (96, 128)), (1, (72, 128)), (2, (128, 128))):
                _edit_batch(pipe, count, size, guided=False)
                assert {name: c.frame_count for name, c in counters.items()} == after_warm_up, (count, size)
    finally:
        tiny_models.unet.num_upsamplers = upsamplers
        torch._dynamo.reset()


def test_passing_the_upsample_size_always_changes_no_output(tiny_models):
    unet = tiny_models.unet
    before = unet.num_upsamplers
    try:
        for height, width in ((8, 8), (8, 6), (5, 7)):  # latents; the tiny UNet upsamples once (factor 2)
            sample = torch.randn(3, unet.config.in_channels, height, width)
            t, cond = torch.full((3,), 500.0), torch.randn(3, 77, unet.config.cross_attention_dim)
            with torch.inference_mode():
                unet.num_upsamplers = before
                stock = unet(sample, t, encoder_hidden_states=cond, return_dict=False)[0]
                always_pass_upsample_size(unet)
                passed = unet(sample, t, encoder_hidden_states=cond, return_dict=False)[0]
            assert torch.equal(stock, passed)
    finally:
        unet.num_upsamplers = before


def test_compiled_vae_functions_match_eager(tiny_models):
    vae = tiny_models.vae
    eager_encode, eager_decode = vae_functions(vae, compiled=False)
    encode, decode = vae_functions(vae, compiled=True)
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            pixels = torch.rand(2, 3, 64, 48) * 2 - 1
            latents = eager_encode(pixels)
            torch.testing.assert_close(encode(pixels), latents, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(decode(latents), eager_decode(latents), rtol=1e-4, atol=1e-4)
    finally:
        torch._dynamo.reset()


def test_a_lone_unguided_job_is_padded_to_the_three_row_graph_so_it_never_needs_a_batch_of_one(tiny_models):
    """Compiled (``graphs``), the UNet call pads one row to three: the same symbolic graph as two unguided
    jobs, so no batch-of-one compile (minutes on a GPU) is needed for the rare unguided edit."""
    pipe = MgiePipeline(tiny_models, max_side=64)
    denoiser = pipe.denoiser
    seen = []

    def unet(sample, timestep, encoder_hidden_states, return_dict):
        seen.append(sample.shape[0])
        return (sample[:, :4] * 2,)

    denoiser.graphs, denoiser.unet = True, unet
    sample = torch.randn(1, 8, 8, 8)
    out = denoiser._unet_call(sample, torch.tensor([500]), torch.randn(1, 5, 32))
    assert seen == [3] and torch.equal(out, sample[:, :4] * 2)
    denoiser._unet_call(torch.randn(2, 8, 8, 8), torch.tensor([500, 500]), torch.randn(2, 5, 32))
    assert seen == [3, 3]  # two jobs: the same bucket
