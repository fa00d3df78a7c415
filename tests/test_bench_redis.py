"""bench/redis_throughput.py dry-runs here on the tiny checkpoint, so a change that breaks it is found in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_redis_throughput_benchmark_reports_every_section(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "redis_throughput.py"), "--workers", "1", "--jobs", "1",
                           "--steps", "2", "--size", "64", "--reclaim", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert report["throughput"][0]["workers"] == 1 and report["throughput"][0]["edits_per_s"] > 0
    assert report["takeover"]["new_owner_differs"] and report["takeover"]["sigkill_to_running_elsewhere_s"] > 1
    assert report["redis_server"].startswith("7.")


@pytest.mark.slow
def test_redis_throughput_benchmark_names_a_worker_that_dies_at_once(tmp_path):
    """A worker that cannot start (here: python-dotenv broken on its path, as a host missing a package) stops
    the run in seconds with the worker's exit code and its traceback's last lines, not after the ready timeout."""
    broken = tmp_path / "site" / "dotenv"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("python-dotenv is missing on this host")\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "redis_throughput.py"), "--workers", "1", "--jobs", "1",
                           "--steps", "2", "--size", "64", "--out", str(tmp_path / "out"), "--ready-timeout", "250"],
                          capture_output=True, text=True, timeout=200, cwd=ROOT, env=env)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "exited with code 1" in done.stderr and "python-dotenv is missing on this host" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr.split("exited with code")[0]  # the bench's own message, then the tail
    assert time.monotonic() - started < 100 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_redis_hop_benchmark_dry_runs_both_paths(tmp_path):
    """bench/redis_hop.py (the GPU's in-process vs Redis comparison) on shrunken models: both paths run the same
    edit to the same pixels, every section reports, and the goals are judged."""
    from mgie_engine.tiny.tokenizer import write_llama_tokenizer

    (tmp_path / "tok" / "LLaVA-7B-v1").mkdir(parents=True)
    write_llama_tokenizer(tmp_path / "tok" / "LLaVA-7B-v1")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "redis_hop.py"), "--tokenizer-dir", str(tmp_path / "tok"),
                           "--small", "--steps", "2", "--runs", "2", "--burst", "3", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert report["complete"] and report["same_result"]["same_png"], report
    for path in ("in_process", "redis"):
        assert report[path]["runs"] == 2 and report[path]["burst"]["edits"] == 3
        assert report[path]["burst"]["edits_per_second"] > 0
    # A Redis path ~free would mean results answered without the GPU work (a repeated job id, say).
    assert report["redis"]["latency_p50"] > 0.3 * report["in_process"]["latency_p50"]
    assert set(report["goals"]) == {"hop_at_most_30ms", "hop_at_most_3pct", "hop_met", "burst_within_5pct"}
    assert report["versions"]["redis_server"].split(".")[0].isdigit()
    assert "burst through Redis / in-process" in done.stdout
