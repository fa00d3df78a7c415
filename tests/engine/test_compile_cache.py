"""MGIE_COMPILE=auto, the kept compile cache's folder and artifacts, and ``mgie-worker --precompile``."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import tiny_settings

from mgie_engine import compilation, compile_cache
from mgie_engine.errors import SettingsError
from mgie_engine.pipeline import MgiePipeline
from mgie_engine.redis_pool import cli
from mgie_engine.settings import EngineSettings

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
             "TORCHINDUCTOR_AUTOGRAD_CACHE")


@pytest.mark.parametrize(("value", "offload", "on_cuda", "on_cpu"), [
    ("", False, True, False), ("auto", False, True, False), ("AUTO", True, False, False),
    ("1", False, True, True), ("on", True, True, True), ("0", False, False, False), ("false", False, False, False),
])
def test_compile_auto_is_on_for_cuda_and_off_for_the_cpu_and_offload(value, offload, on_cuda, on_cpu):
    settings = EngineSettings.from_env({"MGIE_COMPILE": value, "MGIE_OFFLOAD": "1" if offload else "0"})
    assert settings.compile_on(CUDA) is on_cuda
    assert settings.compile_on(CPU) is on_cpu


def test_compile_is_auto_by_default_and_a_bad_value_names_the_choices():
    assert EngineSettings().compile is None and EngineSettings.from_env({}).compile is None
    with pytest.raises(SettingsError, match="MGIE_COMPILE must be auto, 1"):
        EngineSettings.from_env({"MGIE_COMPILE": "maybe"})


def _gpu(name: str = "NVIDIA H200"):
    return lambda _device: types.SimpleNamespace(name=name, major=9, minor=0)


def test_the_cache_folder_is_keyed_by_versions_gpu_options_and_shapes(monkeypatch, tmp_path):
    settings = EngineSettings(data_dir=str(tmp_path / "data"))
    monkeypatch.setattr(torch.cuda, "get_device_properties", _gpu())

    def folder(s=settings, device=CUDA, capacity=8, patch=()):
        with monkeypatch.context() as m:
            for owner, name, value in patch:
                m.setattr(owner, name, value)
            return compile_cache.cache_folder(s, device, capacity)

    base = folder()
    assert base.parent == (tmp_path / "data" / "compile-cache").resolve()  # under MGIE_DATA_DIR by default
    assert folder() == base and folder(capacity=5) == base  # stable; 5 jobs pad to the same bucket as 8
    variants = {
        "jobs": folder(capacity=32), "cpu": folder(device=CPU),
        "dtype": folder(EngineSettings(data_dir=settings.data_dir, dtype="bf16")),
        "side": folder(EngineSettings(data_dir=settings.data_dir, max_side=768)),
        "gpu": folder(patch=[(torch.cuda, "get_device_properties", _gpu("NVIDIA H100 80GB HBM3"))]),
        "torch": folder(patch=[(torch, "__version__", "9.9.9")]),
        "triton": folder(patch=[(compile_cache, "_package_version", lambda *names: "9.9.9")]),
        "options": folder(patch=[(compilation, "UNET_COMPILE_OPTIONS", {**compilation.UNET_COMPILE_OPTIONS,
                                                                        "max_autotune": True})]),
        # a folder filled with steps compiled ahead of time is not warm for torch.compile's steps, nor back
        "ahead of time": folder(EngineSettings(data_dir=settings.data_dir, compile_aot=True)),
        "grid": folder(EngineSettings(data_dir=settings.data_dir, size_step=48)),  # its home square is 480 px
    }
    assert base not in variants.values() and len(set(variants.values())) == len(variants), variants
    chosen = EngineSettings(data_dir=settings.data_dir, compile_cache_dir=str(tmp_path / "kept"))
    assert folder(chosen).parent == (tmp_path / "kept").resolve()  # MGIE_COMPILE_CACHE_DIR is the root instead


def test_a_missing_or_bad_artifact_file_is_ignored_with_a_warning(tmp_path, caplog):
    assert compile_cache.load_artifacts(tmp_path) is False  # a first start
    (tmp_path / compile_cache.ARTIFACTS_FILE).write_bytes(b"not torch's artifacts")
    with caplog.at_level("WARNING", logger="mgie_engine.compile_cache"):
        assert compile_cache.load_artifacts(tmp_path) is False
    assert any("ignoring the compile artifacts" in r.getMessage() for r in caplog.records)


def _worker_env(monkeypatch, tiny_paths, tmp_path) -> EngineSettings:
    settings = tiny_settings(tiny_paths, max_side=64, max_batch=2, compile=True, data_dir=str(tmp_path / "data"))
    for name, value in {"MGIE_CKPT_DIR": settings.ckpt_dir, "MGIE_IP2P": settings.ip2p, "MGIE_CLIP": settings.clip,
                        "MGIE_DEVICE": "cpu", "MGIE_MAX_SIDE": "64", "MGIE_MAX_BATCH": "2", "MGIE_COMPILE": "1",
                        "MGIE_DATA_DIR": settings.data_dir}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MGIE_COMPILE_CACHE_DIR", raising=False)
    monkeypatch.delenv("MGIE_REDIS_URL", raising=False)  # --precompile needs no Redis
    for name in CACHE_ENV:
        monkeypatch.delenv(name, raising=False)
    return settings


def test_precompile_compiles_saves_the_artifacts_and_exits_0(tiny_paths, tmp_path, monkeypatch, capsys):
    """On a CPU the warm-up is a tiny real inductor compile in place of the pipeline's (CUDA-only) one: what
    it leaves in torch's caches is saved to the worker's folder, and loads back."""
    settings = _worker_env(monkeypatch, tiny_paths, tmp_path)
    warmed = []

    def tiny_compile(self, max_jobs, only=None):
        warmed.append((max_jobs, only))
        torch.compile(lambda x: (x.sin() * 2 + 1).sum(0))(torch.randn(4, 8))

    monkeypatch.setattr(MgiePipeline, "compiles", property(lambda self: self.compile_unet))  # as on CUDA
    monkeypatch.setattr(MgiePipeline, "warm_up", tiny_compile)
    assert cli.main(["--precompile", "--devices", "cpu"]) == 0
    folder = compile_cache.cache_folder(settings, CPU, 2)
    artifacts = folder / compile_cache.ARTIFACTS_FILE
    assert warmed == [(2, None)] and artifacts.stat().st_size > 0  # the whole warm-up
    assert capsys.readouterr().out.strip() == f"mgie-worker --precompile: compile cache saved to {artifacts}"
    assert (folder / "inductor").is_dir()  # the kernels themselves are kept beside the artifacts
    assert compile_cache.load_artifacts(folder) is True


def test_precompile_where_nothing_compiles_exits_1_with_one_line(tiny_paths, tmp_path, monkeypatch, capsys):
    _worker_env(monkeypatch, tiny_paths, tmp_path)
    assert cli.main(["--precompile", "--devices", "cpu"]) == 1  # the CPU pipeline has no compiled steps
    err = capsys.readouterr().err.strip()
    assert err.startswith("mgie-worker --precompile: nothing to precompile") and "\n" not in err
