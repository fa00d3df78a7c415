"""The GPU scripts under bench/ dry-run here on shrunken models, so a script broken by a change is found in
CI and not on a device call, whose minutes are counted. Their numbers on a CPU mean nothing; what is
checked is that every section runs and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from mgie_engine.tiny.tokenizer import write_llama_tokenizer

    folder = tmp_path_factory.mktemp("bench")
    (folder / "LLaVA-7B-v1").mkdir()
    write_llama_tokenizer(folder / "LLaVA-7B-v1")
    return folder


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_speed_benchmark_runs_every_section(tokenizer_dir, tmp_path):
    out = _run("mgie_bench.py", "--tokenizer-dir", str(tokenizer_dir), "--small", "--steps", "2", "--ref-runs", "1",
               "--lat-runs", "1", "--burst", "2", "--worker-latency", "1", "--out", str(tmp_path))
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert report["complete"], out
    assert report["parity"]["same_tokens"] and report["parity"]["max_pixel_diff"] <= 1
    assert report["burst"]["edits"] == 2 and report["worker_latency"]["runs"] == 1
    assert report["worker_parity"]["max_pixel_diff"] <= 1 and report["worker_parity"]["same_expressive_instruction"]
    assert {"latency_speedup", "refine_speedup", "worker_latency_speedup",
            "throughput_vs_reference_sequential"} <= set(report["ratios"])
    assert "burst of 2 (edits/s)" in out


# The profile script's three runs are three tests, so that pytest-xdist can run them side by side.
@pytest.mark.slow
def test_profile_script_runs_its_stage_profile(tokenizer_dir, tmp_path):
    _run("profile_engine.py", "--tokenizer-dir", str(tokenizer_dir), "--steps", "2", "--budget", "0",
         "--out", str(tmp_path / "stages"))
    stages = json.loads((tmp_path / "stages" / "profile.json").read_text())
    assert {"llm", "llm.prompt", "llm.prefill", "llm.edit_head", "denoise"} <= set(stages["profile"]["stages"])


@pytest.mark.slow
def test_profile_script_runs_its_decoder_variants(tokenizer_dir, tmp_path):
    _run("profile_engine.py", "--tokenizer-dir", str(tokenizer_dir), "--only-llm", "--out", str(tmp_path / "llm"))
    llm = json.loads((tmp_path / "llm" / "profile.json").read_text())
    assert llm["llm_same_tokens_batch1"] and llm["llm_same_tokens_batch32"]


@pytest.mark.slow
def test_profile_script_runs_its_unet_variants(tokenizer_dir, tmp_path):
    # On a CPU the compiled variants are skipped once built; the code around each still runs.
    log = _run("profile_engine.py", "--tokenizer-dir", str(tokenizer_dir), "--only-unet", "--out", str(tmp_path / "unet"),
               "--variants", "eager,engine,home,pdl,homepdl,combo,aggressive,flash,efficient,layout", "--sustain", "2")
    assert "UNet eager" in log and log.count("skip ") == 12


def test_kernel_choices_script_times_every_backend_and_matmul(tmp_path):
    _run("profile_engine.py", "--tokenizer-dir", str(tmp_path), "--only-kernels", "--out", str(tmp_path))
    kernels = json.loads((tmp_path / "profile.json").read_text())["kernels"]
    assert kernels["unet_rows3_total_ms"]["flash"] > 0 or kernels["unet_rows3_total_ms"]["cudnn"] > 0
    assert {f"gemv_{name}_cublas_ms" for name in ("qkv", "o", "gate_up", "down", "lm_head")} <= set(kernels)
    assert {"decode_batch1_cudnn", "decode_batch32_efficient"} <= set(kernels)


@pytest.mark.slow
def test_preview_cost_script_measures_edits_with_and_without_previews(tokenizer_dir, tmp_path):
    out = _run("preview_cost.py", "--tokenizer-dir", str(tokenizer_dir), "--small", "--steps", "20", "--runs", "1",
               "--stress-interval", "0.01", "--out", str(tmp_path))
    report = json.loads(next(tmp_path.glob("preview-cost-*.json")).read_text())
    stress = report["intervals"]["0.01"]
    assert stress["previews_per_edit"] >= 1 and stress["ratio"] > 0 and report["preview_bytes"] > 0
    assert "measured ratio" in out


@pytest.mark.slow
def test_preview_sequence_script_draws_the_strip_the_bot_made(tmp_path):
    out = tmp_path / "strip.png"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "preview_sequence.py"), "--out", str(out),
                           "--steps", "60", "--frames", "3"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from PIL import Image

    with Image.open(out) as strip:
        assert strip.format == "PNG" and strip.width >= 5 * 256 and strip.height > 192  # input, 3 previews, result
    assert "previews sent" in done.stdout
