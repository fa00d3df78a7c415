"""bench/compile_switch.py dry-runs here on the tiny checkpoints (on a CPU nothing compiles: it reports the
eager mode and its edits), so the script the GPU run needs is not found broken on a device call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import tiny_settings

ROOT = Path(__file__).resolve().parents[1]


def test_compile_switch_reports_each_edit_and_the_mode(tiny_paths, tmp_path):
    settings = tiny_settings(tiny_paths)
    env = {**os.environ, "MGIE_CKPT_DIR": settings.ckpt_dir, "MGIE_IP2P": settings.ip2p, "MGIE_CLIP": settings.clip,
           "MGIE_DEVICE": "cpu", "MGIE_MAX_SIDE": "64", "MGIE_DATA_DIR": str(tmp_path / "data"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_switch.py"), "--steps", "2", "--side", "64",
                           "--after", "2", "--out", str(tmp_path / "switch.json")], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "switch.json").read_text())
    assert summary["mode"] == "eager" and summary["compiles_in_service"] == 0 and summary["joined"]
    assert [edit["mode_at_start"] for edit in summary["edits"]] == ["eager", "eager"]
    assert all(edit["edit_s"] > 0 for edit in summary["edits"])
