"""bench/redis_throughput.py dry-runs here on the tiny checkpoint, so a change that breaks it is found in CI."""

from __future__ import annotations

import json
import subprocess
import sys
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
