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


def _keys(path: Path) -> set[str]:
    """The names in a weight file, layer numbers left out (the two checkpoints have different depths)."""
    import re

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    else:
        import torch

        keys = set(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return {re.sub(r"\.\d+\.", ".#.", key) for key in keys}


def test_full_size_writer_writes_the_tiny_checkpoints_layout(tokenizer_dir, tmp_path):
    """Same files, same names in every weight file, same config keys as mgie_engine.tiny's checkpoint; loadable
    (unet.pt is checked by the strict load: the tiny UNet has fewer blocks than the SD-1.5 one)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from write_full_size import write_full_size

    from mgie_engine.models import load_models
    from mgie_engine.settings import EngineSettings
    from mgie_engine.tiny import write_tiny_checkpoints

    tiny = write_tiny_checkpoints(tmp_path / "tiny")
    full, stats = write_full_size(tmp_path / "full", small=True, tokenizer_dir=tokenizer_dir, progress=lambda _m: None)
    assert set(stats["parts"]) == {"llm", "mllm", "clip", "unet", "vae"} and stats["total_gb"] > 0

    def files(root: Path) -> set[str]:
        return {str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()}

    # instruct-pix2pix's own UNet weights are never read (unet.pt replaces them): the Hub download skips them
    assert files(full.root) == files(tiny.root) - {"instruct-pix2pix/unet/diffusion_pytorch_model.safetensors"}
    llava = Path("ml-mgie/LLaVA-7B-v1")
    for name in ("ml-mgie/mgie_7b/mllm.pt", "clip-vit-large-patch14/model.safetensors",
                 "instruct-pix2pix/vae/diffusion_pytorch_model.safetensors"):
        assert _keys(full.root / name) == _keys(tiny.root / name), name
    shard_keys = [set().union(*(_keys(f) for f in (r / llava).glob("pytorch_model-*.bin"))) for r in (full.root, tiny.root)]
    assert shard_keys[0] == shard_keys[1]
    for name in (llava / "config.json", llava / "pytorch_model.bin.index.json", Path("instruct-pix2pix/vae/config.json")):
        assert json.loads((full.root / name).read_text()).keys() == json.loads((tiny.root / name).read_text()).keys()
    models = load_models(EngineSettings(ckpt_dir=str(full.mgie), ip2p=str(full.ip2p), clip=str(full.clip), device="cpu"))
    assert models.random_weights and models.llm.config.hidden_size == 64 and models.unet.config.in_channels == 8


def test_load_weights_script_times_every_part(tokenizer_dir, tmp_path):
    _run("load_weights.py", "--small", "--ckpt", str(tmp_path / "ckpt"), "--tokenizer-dir", str(tokenizer_dir),
         "--out", str(tmp_path / "out"))
    report = json.loads(next((tmp_path / "out").glob("*load-weights-small.json")).read_text())
    assert report["complete"] and report["card"] == "cpu" and {"torch", "transformers", "diffusers"} <= set(report["versions"])
    assert [(r["mode"], r["cache"]) for r in report["loads"]] == [("fast", "cold"), ("plain", "cold"),
                                                                  ("fast", "warm"), ("plain", "warm")]
    for run in report["loads"]:
        assert {"llm", "edit_head", "clip", "unet", "vae"} <= set(run["parts_seconds"]) and run["gb_per_second"] > 0
        assert set(run["parts_gb_per_second"]) == {"llm", "clip", "unet", "vae"}


@pytest.mark.slow
def test_coldstart_script_times_a_worker_process_from_launch_to_full_speed(tokenizer_dir, tmp_path):
    out = _run("coldstart.py", "--small", "--phase", "both", "--ckpt", str(tmp_path / "ckpt"), "--tokenizer-dir",
               str(tokenizer_dir), "--cache-dir", str(tmp_path / "cache"), "--side", "64", "--steps", "2",
               "--steady-edits", "3", "--deadline", "240", "--out", str(tmp_path / "out"))
    report = json.loads(next((tmp_path / "out").glob("*coldstart-b8-both-small.json")).read_text())
    assert report["complete"], out
    assert report["settings"]["max_batch"] == 8 and {"torch", "transformers", "diffusers"} <= set(report["versions"])
    for phase in ("first", "warm"):
        r = report["phases"][phase]
        assert r["exit_code"] == 0 and r["failed_edits"] == 0
        assert 0 < r["child_started_s"] < r["weights_loaded_s"] <= r["worker_ready_s"] < r["first_edit_served_s"]
        assert r["first_edit_served_s"] <= r["full_speed_s"] and r["steady_latency_s"] > 0 and r["steady_edits"] == 3
        assert r["edits"][0]["submitted_s"] < r["weights_loaded_s"]  # edits are submitted from the start
        assert r["modes"][-1]["state"] == "ready" and r["worker_info_at_end"]["max_batch"] == 8
    assert report["phases"]["first"]["page_cache"] == "dropped" and report["phases"]["warm"]["page_cache"] == "kept"


@pytest.mark.slow
def test_loadtest_script_reports_latency_throughput_and_compiles_under_poisson_load(tokenizer_dir, tmp_path):
    out = _run("loadtest.py", "--small", "--tokenizer-dir", str(tokenizer_dir), "--side", "64", "--steps", "2",
               "--minutes", "0.1", "--burst", "4", "--lone", "2", "--max-batch", "4", "--progress-every", "2",
               "--capacity-of", "mixed", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "out"))
    report = json.loads(next((tmp_path / "out").glob("*loadtest-b4-small.json")).read_text())
    assert report["complete"], out
    assert report["lone"]["ok"] == 2 and report["capacity"]["measured"] and report["capacity"]["edits_per_s"] > 0
    mixed = report["capacity_mixed"]
    assert mixed["ok"] == 4 and mixed["edits_per_s"] > 0 and report["settings"]["capacity_of"] == "mixed"
    assert report["loads"]["0.5"]["rate_per_s"] == pytest.approx(0.5 * mixed["edits_per_s"])
    assert report["worker_info_after_warm_up"]["max_batch"] == 4
    for fraction in ("0.5", "0.8"):
        load = report["loads"][fraction]
        assert load["submitted"] > 0 and load["unfinished"] == 0 and load["ok"] == load["submitted"]
        assert load["p50_s"] <= load["p95_s"] and load["throughput_per_s"] > 0 and load["compiles"] == 0
        assert len(load["by_size"]) > 1 and load["p95_over_lone_p50"] > 0


def test_coldstart_counts_full_speed_from_the_workers_final_mode():
    """Workers that report a mode serve eagerly while compiling; older ones report none and warm up before READY."""
    sys.path.insert(0, str(ROOT / "bench"))
    from coldstart import final_mode, summarize

    assert not final_mode({"mode": "eager (compiling)"}, "ready") and not final_mode({}, "loading")
    assert final_mode({"mode": "compiled"}, "ready") and final_mode({"mode": "eager (compile failed)"}, "ready")
    assert final_mode({}, "ready")
    edit = {"event": "edit", "ok": True, "error": None, "mode_at_submit": None, "mode_at_done": None}
    events = [{"event": "weights_loaded", "t": 110.0},
              {**edit, "n": 0, "submitted": 101.0, "done": 115.0, "latency": 14.0, "after_final": False, "t": 115.0},
              {**edit, "n": 1, "submitted": 115.0, "done": 118.0, "latency": 3.0, "after_final": False, "t": 118.0},
              *({**edit, "n": n, "submitted": 118.0 + n, "done": 119.0 + n, "latency": 1.0 + n / 100,
                 "after_final": True, "t": 119.0 + n} for n in (2, 3, 4)),
              {"event": "finished", "t": 124.0, "final_at": 118.5, "info": {}, "dynamo": {}, "peak_gib": 0.0}]
    summary = summarize(events, launched=100.0, steady_edits=3)
    assert summary["weights_loaded_s"] == 10.0 and summary["first_edit_served_s"] == 15.0
    assert summary["steady_latency_s"] == 1.03 and summary["full_speed_s"] == 21.0 and summary["complete"]


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
