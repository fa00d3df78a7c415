"""Live previews: the latent -> RGB map, its throttle, and a worker that sends them only when asked."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import make_image

from mgie_engine.previews import (
    LATENT_RGB,
    PREVIEW_SIDE,
    PreviewThrottle,
    encode_preview,
    latent_rgb,
    preview_size,
    start_preview,
)
from mgie_engine.protocol import EditJob, JobStage
from mgie_engine.settings import EngineSettings
from mgie_engine.worker import LocalWorker


def _channel(k: int, value: float, h: int = 8, w: int = 6) -> torch.Tensor:
    latents = torch.zeros(1, 4, h, w)
    latents[0, k] = value
    return latents


@pytest.mark.parametrize("k", range(4))
def test_each_latent_channel_pushes_its_published_colour(k):
    rgb = latent_rgb(_channel(k, 1.0)).float()
    zero = latent_rgb(torch.zeros(1, 4, 8, 6)).float()
    assert torch.all(zero == 128)  # a zero latent is mid grey
    shift = (rgb - zero).mean(dim=(0, 1)).numpy()
    expected = np.array(LATENT_RGB[k]) * 127.5
    assert np.allclose(shift, expected, atol=1.0)


def test_the_fourth_channel_negative_is_yellow_and_scale_divides_the_noise():
    rgb = latent_rgb(_channel(3, -1.0)).float().mean(dim=(0, 1))
    assert rgb[0] > 128 and rgb[1] > 128 and rgb[2] > 200  # -L4: R, G up; B most (0.72)
    calm = latent_rgb(_channel(3, -1.0), noise_scale=10.0).float().mean(dim=(0, 1))
    assert torch.all((calm - 128).abs() < (rgb - 128).abs())


def test_size_is_the_longest_side_with_the_aspect_kept():
    assert preview_size(64, 64) == (PREVIEW_SIDE, PREVIEW_SIDE)
    assert preview_size(48, 64) == (192, 256) and preview_size(6, 8) == (192, 256)
    assert latent_rgb(torch.randn(1, 4, 6, 8)).shape == (192, 256, 3)
    assert latent_rgb(torch.randn(1, 4, 200, 100)).shape == (256, 128, 3)  # large latents shrink
    pixels = start_preview(torch.randn(1, 4, 6, 8)).wait()
    image = PIL.Image.open(io.BytesIO(encode_preview(pixels)))
    assert image.format == "JPEG" and image.size == (256, 192)


def test_throttle_is_due_every_interval_from_the_start():
    now = [100.0]
    throttle = PreviewThrottle(3.0, clock=lambda: now[0])
    seen = []
    for _ in range(100):
        now[0] += 0.25
        seen.append(throttle.ready())
    assert seen.count(True) == 8  # 25 s of steps: due at 3, 6, ..., 24 s
    assert seen.index(True) == 11  # not before 3 s of denoising
    now[0] = 1000.0
    assert throttle.ready() and not throttle.ready()  # a long stall gives one preview, not a burst


def _job(job_id: str, previews: bool, steps: int) -> EditJob:
    buf = io.BytesIO()
    make_image(64, 48, 3).save(buf, format="PNG")
    return EditJob(job_id=job_id, image=buf.getvalue(), instruction="make it snowy", seed=3, text_cfg=7.5,
                   image_cfg=1.5, steps=steps, previews=previews)


async def test_worker_sends_previews_only_to_jobs_that_asked(tiny_models):
    settings = EngineSettings(device="cpu", max_side=64, preview_seconds=0.01)
    worker = LocalWorker(settings, loader=lambda _s: tiny_models, max_batch=2)
    worker.start()
    await worker.wait_ready()
    with_previews, without = [], []
    try:
        await asyncio.gather(worker.run(_job("p" * 32, True, 40), with_previews.append),
                             worker.run(_job("q" * 32, False, 40), without.append))
    finally:
        worker.shutdown()
    previews = [p for p in with_previews if p.preview is not None]
    assert previews and not any(p.preview for p in without)
    for p in previews:
        assert p.stage is JobStage.DENOISE and 0 < p.step < p.total == 40
        image = PIL.Image.open(io.BytesIO(p.preview))
        assert image.size == (256, 192)  # the 64x48 input's aspect


async def test_a_worker_set_to_zero_sends_none(tiny_models):
    worker = LocalWorker(EngineSettings(device="cpu", max_side=64, preview_seconds=0), loader=lambda _s: tiny_models)
    worker.start()
    await worker.wait_ready()
    seen = []
    try:
        await worker.run(_job("r" * 32, True, 20), seen.append)
    finally:
        worker.shutdown()
    assert seen and not any(p.preview for p in seen)


def test_the_interval_setting_is_checked():
    from mgie_engine.errors import SettingsError

    assert EngineSettings.from_env({}).preview_seconds == 3.0
    assert EngineSettings.from_env({"MGIE_PREVIEW_SECONDS": "0"}).preview_seconds == 0.0
    assert EngineSettings.from_env({"MGIE_PREVIEW_SECONDS": "1.5"}).preview_seconds == 1.5
    for bad in ("-1", "soon", "nan"):
        with pytest.raises(SettingsError, match="MGIE_PREVIEW_SECONDS"):
            EngineSettings.from_env({"MGIE_PREVIEW_SECONDS": bad})
