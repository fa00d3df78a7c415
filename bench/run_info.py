"""What every start-up and load benchmark's JSON begins with: the card, library versions, when."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def run_info(**settings: Any) -> dict[str, Any]:
    """The card (or "cpu"), torch/transformers/diffusers/python versions, and the run's settings."""
    import diffusers
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    return {"card": torch.cuda.get_device_name(0) if cuda else "cpu",
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "diffusers": diffusers.__version__, "python": platform.python_version()},
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "settings": settings,
            "compile_env": {k: v for k, v in os.environ.items() if k.startswith("MGIE_COMPILE")}}


def aot_suffix() -> str:
    """"-aot" in a result's name when its worker compiled its steps ahead of time (MGIE_COMPILE_AOT=1)."""
    from mgie_engine.settings import read_flag

    return "-aot" if read_flag(os.environ, "MGIE_COMPILE_AOT", False) else ""


def save(report: dict[str, Any], out: Path, name: str) -> Path:
    """Write (again) ``report`` as ``out/<card>-<name>.json``: after every section, so a run cut short by
    its time limit still leaves what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{report['card'].replace(' ', '_')}-{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
