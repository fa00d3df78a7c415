"""The working grid (MGIE_SIZE_STEP): edits run at sizes snapped to a coarse grid, so a compiling worker
records few CUDA graphs, and results come back at the fitted size, as without the grid."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
from conftest import make_image

from mgie_engine.images import load_image, prepare_image
from mgie_engine.lifecycle import new_pipeline
from mgie_engine.pipeline import EditRequest, MgiePipeline
from mgie_engine.previews import preview_size
from mgie_engine.protocol import EditJob, JobStage
from mgie_engine.settings import EngineSettings
from mgie_engine.worker import LocalWorker

OFF_GRID = (56, 40)  # fitted as it is at a 64 px max side; on a 32 px grid it is worked on at 64x32
WORKING = (64, 32)


def _edit(pipe: MgiePipeline, image: PIL.Image.Image, steps: int = 3, seed: int = 7):
    return pipe(EditRequest(image=image, instruction="make it snowy", seed=seed, steps=steps))


@pytest.fixture(scope="module")
def grid_pipe(tiny_models):
    return MgiePipeline(tiny_models, max_side=64, size_step=32)


def test_an_off_grid_image_is_edited_on_the_grid_and_delivered_at_its_fitted_size(tiny_models, grid_pipe):
    source = make_image(*OFF_GRID, seed=5)
    fitted = prepare_image(source, 64, tiny_models.vae_scale_factor)
    prepared = grid_pipe.fit_and_prepare(source)
    assert prepared.size == WORKING and prepared.delivered_size == fitted.size == OFF_GRID
    sizes = []
    step = grid_pipe.denoise_step
    grid_pipe.denoise_step = lambda states: sizes.extend(s.size for s in states) or step(states)
    try:
        result = _edit(grid_pipe, source)
    finally:
        del grid_pipe.denoise_step
    factor = tiny_models.vae_scale_factor
    assert set(sizes) == {(WORKING[1] // factor, WORKING[0] // factor)}  # the latents: (height, width)
    assert result.image.size == (result.width, result.height) == OFF_GRID


def test_a_size_on_the_grid_and_no_grid_change_nothing(tiny_models, grid_pipe):
    today = MgiePipeline(tiny_models, max_side=64)
    assert today.size_step == tiny_models.vae_scale_factor
    for source in (make_image(*OFF_GRID, seed=5), make_image(*WORKING, seed=6)):
        expected = np.asarray(_edit(today, source).image)
        for pipe in (MgiePipeline(tiny_models, max_side=64, size_step=None),
                     MgiePipeline(tiny_models, max_side=64, size_step=tiny_models.vae_scale_factor)):
            assert np.array_equal(np.asarray(_edit(pipe, source).image), expected)
    on_grid = make_image(*WORKING, seed=6)
    assert grid_pipe.fit_and_prepare(on_grid).output_size is None
    assert np.array_equal(np.asarray(_edit(grid_pipe, on_grid).image), np.asarray(_edit(today, on_grid).image))


def test_the_step_is_a_multiple_of_the_vae_factor_and_moves_the_home_square(tiny_models):
    pipe = MgiePipeline(tiny_models, max_side=60, size_step=12)  # 12 px: rounded up to 16
    assert pipe.size_step == 16
    # fitted, a 60 px square is 56 px, snapped 48 (the cap): the static step's home is the snapped square
    assert pipe.fit_and_prepare(make_image(60, 60)).size == (48, 48)
    assert pipe.denoiser._home_latents == (6, 6)


def test_a_workers_pipelines_share_its_grid(tiny_models):
    settings = EngineSettings(device="cpu", max_side=512, compile=True)  # compiles: the coarse auto grid
    assert {new_pipeline(settings, tiny_models, compile_unet=c).size_step for c in (True, False)} == {32}
    eager = EngineSettings(device="cpu", max_side=512)  # a CPU worker does not compile: the VAE's grid
    assert new_pipeline(eager, tiny_models, compile_unet=False).size_step == tiny_models.vae_scale_factor
    chosen = EngineSettings(device="cpu", max_side=512, size_step=64)
    assert new_pipeline(chosen, tiny_models, compile_unet=False).size_step == 64


def _png(image: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


async def test_a_worker_on_the_grid_delivers_the_fitted_size_and_previews_its_shape(tiny_models):
    settings = EngineSettings(device="cpu", max_side=64, size_step=32, preview_seconds=0.01)
    worker = LocalWorker(settings, loader=lambda _s: tiny_models, max_batch=2)
    source = make_image(*OFF_GRID, seed=3)
    job = EditJob(job_id="g" * 32, image=_png(source), instruction="make it snowy", seed=3, text_cfg=7.5,
                  image_cfg=1.5, steps=40, previews=True)
    shapes = []
    forward = tiny_models.unet.forward

    def recording(sample, *args, **kwargs):
        shapes.append(tuple(sample.shape[-2:]))
        return forward(sample, *args, **kwargs)

    tiny_models.unet.forward = recording
    progress = []
    try:
        worker.start()
        await worker.wait_ready()
        outcome = await worker.run(job, progress.append)
    finally:
        tiny_models.unet.forward = forward
        worker.shutdown()
    factor = tiny_models.vae_scale_factor
    assert set(shapes) == {(WORKING[1] // factor, WORKING[0] // factor)}  # worked on the grid
    delivered = load_image(outcome.png)
    assert delivered.size == (outcome.width, outcome.height) == OFF_GRID
    alone = _edit(MgiePipeline(tiny_models, max_side=64, size_step=32), source, steps=40, seed=3)
    assert np.abs(np.asarray(delivered).astype(int) - np.asarray(alone.image).astype(int)).max() <= 1
    previews = [p for p in progress if p.preview is not None]
    assert previews and all(p.stage is JobStage.DENOISE for p in previews)
    height, width = preview_size(OFF_GRID[1], OFF_GRID[0])  # the delivered shape, not the working 2:1
    assert {PIL.Image.open(io.BytesIO(p.preview)).size for p in previews} == {(width, height)}
