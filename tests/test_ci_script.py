""".ci/run installs the CPU build of torch: it asks PyTorch's CPU index only when pip, left to itself, would pick
a CUDA build. The decision is checked here on pip reports of both kinds (no network: pip is stood in for)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CUDA_WHEEL = ["filelock", "sympy>=1.13.3", 'nvidia-cudnn-cu13==9.20.0.48; platform_system == "Linux"',
              'triton==3.7.0; platform_system == "Linux"']
CPU_WHEEL = ["filelock", "sympy>=1.13.3", "fsspec>=0.8.5"]
OTHER_OS_ONLY = ["filelock", 'nvidia-cudnn-cu13==9.20.0.48; platform_system == "Plan9"']


def _decide(report: str, tmp_path: Path) -> int:
    """Run the script's would_pull_cuda with `python -m pip ...` answering ``report``; its exit status."""
    script = (ROOT / ".ci" / "run").read_text()
    function = script[script.index("would_pull_cuda() {"):]
    function = function[:function.index("\n}\n") + 3]
    shell = f"""
python() {{ if [ "$1" = -m ] && [ "$2" = pip ]; then cat "$REPORT"; else "{sys.executable}" "$@"; fi; }}
TORCH_SPEC=torch==2.13.0
{function}
would_pull_cuda
"""
    report_file = tmp_path / "pip-report.json"
    report_file.write_text(report)
    return subprocess.run(["bash", "-c", shell], env={"REPORT": str(report_file), "PATH": "/usr/bin:/bin"},
                          timeout=60).returncode


def _report(requires: list[str]) -> str:
    return json.dumps({"install": [{"metadata": {"name": "torch", "version": "2.13.0", "requires_dist": requires}}]})


@pytest.mark.parametrize("requires, cuda", [(CUDA_WHEEL, True), (CPU_WHEEL, False), (OTHER_OS_ONLY, False)])
def test_the_cpu_index_is_used_only_for_a_cuda_build(requires, cuda, tmp_path):
    assert _decide(_report(requires), tmp_path) == (0 if cuda else 1)


def test_no_report_means_the_plain_install(tmp_path):
    assert _decide("", tmp_path) == 1
