"""MGIE_COMPILE_AOT: denoising steps compiled ahead of time, saved in the compile cache, loaded by a later process,
checked against the eager step per class of shape, and torch.compile wherever any of that fails.

The backend is "eager" (dynamo's trace alone, no AOTAutograd or inductor): the saving and loading are torch's
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
from conftest import make_image

from mgie_engine import saved_steps
from mgie_engine.compilation import always_pass_upsample_size
from mgie_engine.denoiser import DenoiseJob, guided_euler_ancestral_step
from mgie_engine.inputs import Prompt
from mgie_engine.pipeline import MgiePipeline
from mgie_engine.saved_steps import SavedSteps, unet_key
from mgie_engine.settings import EngineSettings

ROOT = Path(__file__).resolve().parents[2]
LIGHT = {"static": {}, "symbolic": {}, "plain": {}}  # no inductor options: the aot_eager backend takes none


def step_inputs(unet: torch.nn.Module, jobs: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    scalars = torch.tensor([[500.0, 5.1, 5.0, -0.1, 0.4, 7.5, 1.5]] * jobs)
    return (randn(jobs, 4, height, width), randn(3 * jobs, 4, height, width),
            randn(3 * jobs, 77, unet.config.cross_attention_dim), scalars, randn(jobs, 4, height, width))


def plain_inputs(unet: torch.nn.Module, rows: int, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The unguided jobs' UNet call: sample (latents and image latents), timesteps, conditioning."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, unet.config.in_channels, height, width, generator=gen), torch.full((rows,), 500.0),
            torch.randn(rows, 77, unet.config.cross_attention_dim, generator=gen))


def inputs(unet: torch.nn.Module, kind: str, shape: tuple[int, int, int], seed: int = 0) -> tuple[torch.Tensor, ...]:
    return (plain_inputs if kind == "plain" else step_inputs)(unet, *shape, seed=seed)


def reference(unet: torch.nn.Module, kind: str, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if kind == "plain":
        return unet(args[0], args[1], encoder_hidden_states=args[2], return_dict=False)[0]
    return guided_euler_ancestral_step(unet, *args)


# Each kind at the shape it is compiled at, then at the classes torch.compile would compile apart.
CLASSES = (("static", (1, 8, 8)), ("symbolic", (2, 6, 5)), ("symbolic", (1, 6, 5)), ("symbolic", (8, 1, 1)),
           ("plain", (3, 6, 5)), ("plain", (1, 4, 4)))


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
from test_saved_steps import CLASSES, LIGHT, inputs, reference
from mgie_engine.compilation import always_pass_upsample_size
from mgie_engine.models import load_models
from mgie_engine.saved_steps import SavedSteps
from mgie_engine.tiny import TinyPaths
from pathlib import Path
unet = load_models(tiny_settings(TinyPaths.under(Path(sys.argv[2])))).unet
always_pass_upsample_size(unet)
saved, out = SavedSteps(Path(sys.argv[3]), unet, backend="eager", options=LIGHT), {}
with torch.inference_mode():
    for kind, shape in CLASSES:
        args = inputs(unet, kind, shape, seed=3)
        fn = saved.step(kind, args)
        out[f"{kind} {shape}"] = None if fn is None else float((fn(*args) - reference(unet, kind, args)).abs().max())
print(json.dumps({"loaded": saved.loaded, "compiled": saved.compiled, "diff": out}))
"""


def test_steps_compiled_ahead_of_time_are_loaded_by_a_later_process_for_every_class(unet, tiny_paths, tmp_path):
    saved = SavedSteps(tmp_path, unet, backend="eager", options=LIGHT)
    with torch.inference_mode():
        # A lone job on a symbolic path first: neither can be compiled ahead of time at one.
        assert saved.step("symbolic", step_inputs(unet, 1, 6, 5)) is None
        assert saved.step("plain", plain_inputs(unet, 1, 6, 5)) is None
        for kind, shape in CLASSES:
            args = inputs(unet, kind, shape)
            fn = saved.step(kind, args)
            assert fn is not None, (kind, shape)
            torch.testing.assert_close(fn(*args), reference(unet, kind, args), rtol=1e-4, atol=1e-4)
    assert saved.compiled == ["static-1", "symbolic", "plain"] and saved.loaded == []
    folder = tmp_path / saved_steps.STEPS_DIR / unet_key(unet)
    assert sorted(p.name for p in folder.iterdir()) == ["plain.bin", "static-1.bin", "symbolic.bin"]  # no temp files

    run = subprocess.run([sys.executable, "-c", LATER_PROCESS, str(ROOT), str(tiny_paths.root), str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    later = json.loads(run.stdout.strip().splitlines()[-1])
    assert later["loaded"] == ["static-1", "symbolic", "plain"] and later["compiled"] == [], later
    # the symbolic steps, compiled at two jobs and three rows, serve one job and eight at 1x1 latents, and one row
    assert all(diff is not None and diff < 1e-4 for diff in later["diff"].values()), later


def test_a_bad_file_is_compiled_again_and_a_step_unlike_the_eager_one_goes_back_to_torch_compile(
        unet, tmp_path, monkeypatch, caplog):
    saved = SavedSteps(tmp_path, unet, backend="eager", options=LIGHT)
    saved.folder.mkdir(parents=True)
    saved.file("static-1").write_bytes(b"not a saved function")
    args = step_inputs(unet, 1, 8, 8)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, "mgie_engine.saved_steps"):
        assert saved.step("static", args) is not None
        assert saved.compiled == ["static-1"] and "cannot be loaded" in caplog.text

        # A saved step whose output is not the eager step's (here: a wrong function in its file's place).
        later = SavedSteps(tmp_path, unet, backend="eager", options=LIGHT)
        monkeypatch.setattr(later, "_load", lambda path, kind: lambda *tensors: tensors[0] * 2)
        assert later.step("static", args) is None
        assert "differs from the eager one for a batch of 1 at 8x8 latents" in caplog.text
        assert later.step("static", args) is None  # checked once per class, remembered


def test_a_saved_step_that_fails_at_a_later_call_hands_its_class_back_to_torch_compile(unet, tmp_path, caplog):
    calls = []

    def flaky(*tensors: torch.Tensor) -> torch.Tensor:  # passes the check, then fails a tensor guard
        calls.append(len(calls))
        if len(calls) > 2:
            raise RuntimeError("GuardManager check failed")
        return guided_euler_ancestral_step(unet, *tensors)

    saved = SavedSteps(tmp_path, unet, backend="eager", options=LIGHT)
    saved.folder.mkdir(parents=True)
    saved.file("static-1").write_bytes(b"stands for a saved step")
    saved._load = lambda path, kind: flaky
    args = step_inputs(unet, 1, 8, 8)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, "mgie_engine.saved_steps"):
        assert saved.run("static", args) is not None  # checked against eager (call 1), then run (call 2)
        assert saved.run("static", args) is None and "torch.compile serves that class from now on" in caplog.text
        assert saved.run("static", args) is None and calls == [0, 1, 2]  # not called again


def test_a_step_that_cannot_be_compiled_ahead_of_time_is_left_to_torch_compile_once(unet, tmp_path, caplog):
    saved = SavedSteps(tmp_path, unet, backend="no_such_backend", options=LIGHT)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, "mgie_engine.saved_steps"):
        assert saved.step("symbolic", step_inputs(unet, 2, 6, 5)) is None
        assert caplog.text.count("could not compile the symbolic step ahead of time") == 1
        assert saved.step("symbolic", step_inputs(unet, 4, 6, 5)) is None
        assert caplog.text.count("could not compile") == 1  # not tried again for every batch


def _denoise(pipe: MgiePipeline, count: int, size: tuple[int, int], guided: bool = True) -> list[torch.Tensor]:
    images = [pipe.fit_and_prepare(make_image(*size, seed=i)) for i in range(count)]
    guidance = pipe.guidance([Prompt(image, "make it snowy") for image in images], use_cache=False)
    states = pipe.start_denoising([DenoiseJob(image, g.prompt_embeds, i, 7.5, 1.5 if guided else 0.5, 3)
                                   for i, (image, (g, _)) in enumerate(zip(images, guidance, strict=True))])
    while not states[0].done:
        pipe.denoise_step(states)
    return [s.latents for s in states]


def test_the_denoiser_steps_jobs_through_saved_steps_with_the_eager_steps_results(tiny_models, tmp_path):
    eager = MgiePipeline(tiny_models, max_side=64)
    pipe = MgiePipeline(tiny_models, max_side=64)
    pipe.denoiser.static_jobs = {1}
    pipe.denoiser.saved = saved = SavedSteps(tmp_path, tiny_models.unet, backend="eager", options=LIGHT)
    for count, size, guided in ((1, (64, 64), True), (2, (48, 40), True), (1, (48, 40), True), (2, (48, 40), False),
                                (1, (48, 40), False)):
        ours, theirs = _denoise(pipe, count, size, guided), _denoise(eager, count, size, guided)
        for mine, eagers in zip(ours, theirs, strict=True):
            torch.testing.assert_close(mine, eagers, rtol=1e-4, atol=1e-4)
    assert saved.compiled == ["static-1", "symbolic", "plain"]
    assert saved._checked == {("static-1", 1, (8, 8)): True, ("symbolic", 2, (5, 6)): True,
                              ("symbolic", 1, (5, 6)): True, ("plain", 2, (5, 6)): True, ("plain", 1, (5, 6)): True}


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
    # torch 2.11 has dynamo's recursive dict-tag guards on (a suspect in its crashes with saved steps): off with them
    with torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True):
        use_saved_steps(EngineSettings(compile_aot=True), compiled, tmp_path)
        assert torch._dynamo.config.use_recursive_dict_tags_for_guards is False
    saved = compiled.denoiser.saved
    assert saved.folder == tmp_path / "steps" / unet_key(tiny_models.unet) and saved.backend == "inductor"
