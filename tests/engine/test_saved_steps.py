"""MGIE_COMPILE_AOT: guided steps compiled ahead of time, saved in the compile cache, loaded by a later process,
checked against the eager step per class of shape, and torch.compile wherever any of that fails.

The backend is aot_eager (dynamo's trace and AOTAutograd, no inductor): the saving and loading are torch's
own, the kernels are not what a GPU runs (bench/aot_step.py measures those)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mgie_engine import saved_steps
from mgie_engine.compilation import always_pass_upsample_size
from mgie_engine.denoiser import DenoiseJob, guided_euler_ancestral_step
from mgie_engine.inputs import Prompt
from mgie_engine.pipeline import MgiePipeline
from mgie_engine.saved_steps import SavedSteps, unet_key
from mgie_engine.settings import EngineSettings

ROOT = Path(__file__).resolve().parents[2]
LIGHT = {"static": {}, "symbolic": {}}  # no inductor options: the aot_eager backend takes none


def step_inputs(unet: torch.nn.Module, jobs: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    scalars = torch.tensor([[500.0, 5.1, 5.0, -0.1, 0.4, 7.5, 1.5]] * jobs)
    return (randn(jobs, 4, height, width), randn(3 * jobs, 4, height, width),
            randn(3 * jobs, 77, unet.config.cross_attention_dim), scalars, randn(jobs, 4, height, width))


@pytest.fixture()
def unet(tiny_models):
    before = tiny_models.unet.num_upsamplers
    always_pass_upsample_size(tiny_models.unet)  # as the compiled pipeline sets it
    yield tiny_models.unet
    tiny_models.unet.num_upsamplers = before


# What a later process sees: the saved files, loaded, for every class, against the eager step.
LATER_PROCESS = """
import json, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests", sys.argv[1] + "/tests/engine"]
from conftest import tiny_settings
from test_saved_steps import LIGHT, step_inputs
from mgie_engine.compilation import always_pass_upsample_size
from mgie_engine.denoiser import guided_euler_ancestral_step
from mgie_engine.models import load_models
from mgie_engine.saved_steps import SavedSteps
from mgie_engine.tiny import TinyPaths
from pathlib import Path
unet = load_models(tiny_settings(TinyPaths.under(Path(sys.argv[2])))).unet
always_pass_upsample_size(unet)
saved, out = SavedSteps(Path(sys.argv[3]), unet, backend="aot_eager", options=LIGHT), {}
with torch.inference_mode():
    for static, shape in ((True, (1, 8, 8)), (False, (2, 6, 5)), (False, (1, 6, 5)), (False, (8, 1, 1))):
        args = step_inputs(unet, *shape, seed=3)
        fn = saved.step(static, args)
        out[str(shape)] = None if fn is None else float((fn(*args) - guided_euler_ancestral_step(unet, *args)).abs().max())
print(json.dumps({"loaded": saved.loaded, "compiled": saved.compiled, "diff": out}))
"""


def test_steps_compiled_ahead_of_time_are_loaded_by_a_later_process_for_every_class(unet, tiny_paths, tmp_path):
    saved = SavedSteps(tmp_path, unet, backend="aot_eager", options=LIGHT)
    with torch.inference_mode():
        # A lone job on the symbolic path first: it cannot be compiled ahead of time at one job.
        assert saved.step(False, step_inputs(unet, 1, 6, 5)) is None
        for static, shape in ((True, (1, 8, 8)), (False, (2, 6, 5)), (False, (1, 6, 5)), (False, (8, 1, 1))):
            args = step_inputs(unet, *shape)
            fn = saved.step(static, args)
            assert fn is not None, shape
            torch.testing.assert_close(fn(*args), guided_euler_ancestral_step(unet, *args), rtol=1e-4, atol=1e-4)
    assert saved.compiled == ["static-1", "symbolic"] and saved.loaded == []
    folder = tmp_path / saved_steps.STEPS_DIR / unet_key(unet)
    assert sorted(p.name for p in folder.iterdir()) == ["static-1.bin", "symbolic.bin"]  # no temp files left

    run = subprocess.run([sys.executable, "-c", LATER_PROCESS, str(ROOT), str(tiny_paths.root), str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    later = json.loads(run.stdout.strip().splitlines()[-1])
    assert later["loaded"] == ["static-1", "symbolic"] and later["compiled"] == [], later
    # the symbolic step, compiled at two jobs, serves one job and eight at 1x1 latents too
    assert all(diff is not None and diff < 1e-4 for diff in later["diff"].values()), later


def test_a_bad_file_is_compiled_again_and_a_step_unlike_the_eager_one_goes_back_to_torch_compile(
        unet, tmp_path, monkeypatch, caplog):
    saved = SavedSteps(tmp_path, unet, backend="aot_eager", options=LIGHT)
    saved.folder.mkdir(parents=True)
    saved.file("static-1").write_bytes(b"not a saved function")
    args = step_inputs(unet, 1, 8, 8)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, "mgie_engine.saved_steps"):
        assert saved.step(True, args) is not None
        assert saved.compiled == ["static-1"] and "cannot be loaded" in caplog.text

        # A saved step whose output is not the eager step's (here: a wrong function in its file's place).
        later = SavedSteps(tmp_path, unet, backend="aot_eager", options=LIGHT)
        monkeypatch.setattr(later, "_load", lambda path, static: lambda *tensors: tensors[0] * 2)
        assert later.step(True, args) is None
        assert "differs from the eager one at 1 job(s) of 8x8 latents" in caplog.text
        assert later.step(True, args) is None  # checked once per class, remembered


def test_a_saved_step_that_fails_at_a_later_call_hands_its_class_back_to_torch_compile(unet, tmp_path, caplog):
    calls = []

    def flaky(*tensors: torch.Tensor) -> torch.Tensor:  # passes the check, then fails a tensor guard
        calls.append(len(calls))
        if len(calls) > 2:
            raise RuntimeError("GuardManager check failed")
        return guided_euler_ancestral_step(unet, *tensors)

    saved = SavedSteps(tmp_path, unet, backend="aot_eager", options=LIGHT)
    saved.folder.mkdir(parents=True)
    saved.file("static-1").write_bytes(b"stands for a saved step")
    saved._load = lambda path, static: flaky
    args = step_inputs(unet, 1, 8, 8)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, "mgie_engine.saved_steps"):
        assert saved.run(True, args) is not None  # checked against eager (call 1), then run (call 2)
        assert saved.run(True, args) is None and "torch.compile serves that class from now on" in caplog.text
        assert saved.run(True, args) is None and calls == [0, 1, 2]  # not called again


def test_a_step_that_cannot_be_compiled_ahead_of_time_is_left_to_torch_compile_once(unet, tmp_path, caplog):
    saved = SavedSteps(tmp_path, unet, backend="no_such_backend", options=LIGHT)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, "mgie_engine.saved_steps"):
        assert saved.step(False, step_inputs(unet, 2, 6, 5)) is None
        assert caplog.text.count("could not compile the symbolic step ahead of time") == 1
        assert saved.step(False, step_inputs(unet, 4, 6, 5)) is None
        assert caplog.text.count("could not compile") == 1  # not tried again for every batch


def _denoise(pipe: MgiePipeline, count: int, size: tuple[int, int]) -> list[torch.Tensor]:
    images = [pipe.fit_and_prepare(_image(size, i)) for i in range(count)]
    guidance = pipe.guidance([Prompt(image, "make it snowy") for image in images], use_cache=False)
    states = pipe.start_denoising([DenoiseJob(image, g.prompt_embeds, i, 7.5, 1.5, 3)
                                   for i, (image, (g, _)) in enumerate(zip(images, guidance, strict=True))])
    while not states[0].done:
        pipe.denoise_step(states)
    return [s.latents for s in states]


def _image(size: tuple[int, int], seed: int):
    from conftest import make_image

    return make_image(*size, seed=seed)


def test_the_denoiser_steps_jobs_through_saved_steps_with_the_eager_steps_results(tiny_models, tmp_path):
    eager = MgiePipeline(tiny_models, max_side=64)
    pipe = MgiePipeline(tiny_models, max_side=64)
    pipe.denoiser.static_jobs = {1}
    pipe.denoiser.saved = saved = SavedSteps(tmp_path, tiny_models.unet, backend="aot_eager", options=LIGHT)
    for count, size in ((1, (64, 64)), (2, (48, 40)), (1, (48, 40))):
        for ours, theirs in zip(_denoise(pipe, count, size), _denoise(eager, count, size), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert saved.compiled == ["static-1", "symbolic"]
    assert saved._checked == {("static-1", 1, (8, 8)): True, ("symbolic", 2, (5, 6)): True,
                              ("symbolic", 1, (5, 6)): True}


def test_mgie_compile_aot_is_off_unless_set_and_groups_the_symbolic_batches_for_one_compile():
    from mgie_engine.warm_up import compile_groups

    assert EngineSettings.from_env({}).compile_aot is False
    assert EngineSettings.from_env({"MGIE_COMPILE_AOT": "1"}).compile_aot is True
    # warm-up batches at 8 jobs: 0-1 the home shape (static), 2-4 symbolic (two jobs first), 5-6 unguided
    assert compile_groups(512, 8, saved_steps=True) == [(2, 3, 4), (0,), (1,), (5, 6)]
    assert compile_groups(512, 1, saved_steps=True) == [(1,), (0,), (2,)]


def test_a_compiling_worker_uses_saved_steps_in_its_cache_folder_only_with_mgie_compile_aot(
        tiny_models, tmp_path, monkeypatch):
    from mgie_engine.lifecycle import use_saved_steps

    monkeypatch.setattr(MgiePipeline, "compiles", property(lambda self: self.compile_unet))  # as on CUDA
    compiled = MgiePipeline(tiny_models, max_side=64, compile_unet=True)
    use_saved_steps(EngineSettings(compile_aot=False), compiled, tmp_path)
    assert compiled.denoiser.saved is None
    use_saved_steps(EngineSettings(compile_aot=True), compiled, None)  # no kept cache folder: nowhere to save
    assert compiled.denoiser.saved is None
    eager = MgiePipeline(tiny_models, max_side=64)
    use_saved_steps(EngineSettings(compile_aot=True), eager, tmp_path)  # eager serving never loads them
    assert eager.denoiser.saved is None
    use_saved_steps(EngineSettings(compile_aot=True), compiled, tmp_path)
    saved = compiled.denoiser.saved
    assert saved.folder == tmp_path / "steps" / unet_key(tiny_models.unet) and saved.backend == "inductor"
