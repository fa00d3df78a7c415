"""Bad requests fail with typed errors and user-fit messages; the CLI prints the documented JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_image

from mgie_engine.errors import BadImageError, BadRequestError, JobCancelledError, MgieError
from mgie_engine.images import load_image
from mgie_engine.pipeline import EditRequest, MgiePipeline


@pytest.fixture(scope="module")
def pipe(tiny_models):
    return MgiePipeline(tiny_models, max_side=64)


@pytest.mark.parametrize("change, message", [
    ({"text_cfg": 0.5}, "text_cfg must be between 1 and 20"),
    ({"text_cfg": 21.0}, "text_cfg must be between 1 and 20"),
    ({"image_cfg": -0.1}, "image_cfg must be between 0 and 10"),
    ({"image_cfg": float("nan")}, "image_cfg must be between"),
    ({"steps": 0}, "steps must be a whole number from 1 to 200"),
    ({"steps": 201}, "steps must be"),
    ({"steps": 2.5}, "steps must be"),
    ({"seed": -1}, "seed must be a whole number"),
    ({"seed": 2**63}, "seed must be"),
    ({"instruction": "   "}, "describe the edit"),
    ({"instruction": "x" * 1000}, "too long"),
])
def test_out_of_range_requests(pipe, change, message):
    request = EditRequest(image=make_image(32, 32), instruction="make it red", steps=2, **{})
    request = EditRequest(**{**request.__dict__, **change})
    with pytest.raises(BadRequestError, match=message):
        pipe(request)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 30])
def test_unreadable_images(data):
    with pytest.raises(BadImageError):
        load_image(data)


def test_extreme_aspect_ratio_is_refused(pipe):
    with pytest.raises(BadImageError, match="16:1"):
        pipe(EditRequest(image=make_image(400, 10), instruction="make it red", steps=2))


def test_all_errors_share_a_base():
    for cls in (BadImageError, BadRequestError, JobCancelledError):
        assert issubclass(cls, MgieError)


def test_cancel_stops_between_steps(pipe):
    class After:
        def __init__(self, n: int) -> None:
            self.calls, self.n = 0, n

        def is_set(self) -> bool:
            self.calls += 1
            return self.calls > self.n

    seen = []
    with pytest.raises(JobCancelledError):
        pipe(EditRequest(image=make_image(32, 32), instruction="make it red", steps=50),
             progress=lambda stage, k, n: seen.append((stage, k)), cancel=After(20))
    assert ("denoise", 50) not in seen


def _cli(args, tiny_paths, tmp_path):
    env = {**os.environ, **tiny_paths.env(), "MGIE_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mgie_engine.cli", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_an_image_and_prints_json(tiny_paths, tmp_path):
    src = tmp_path / "in.webp"
    make_image(90, 60).save(src)
    out = tmp_path / "out" / "edited.png"
    proc = _cli([str(src), "--instruction", "make the sky a sunset", "--steps", "3", "--seed", "7",
                 "--text-cfg", "8", "--image-cfg", "1.2", "--max-side", "64", "--output", str(out), "--json"],
                tiny_paths, tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["expressive_instruction"] == "The image will be more colorful."
    assert (data["seed"], data["text_cfg"], data["image_cfg"], data["steps"]) == (7, 8.0, 1.2, 3)
    assert (data["width"], data["height"]) == (64, 40)
    assert {"load", "llm", "denoise", "vae_decode", "total"} <= set(data["timings"])
    assert data["random_weights"] is True and "RANDOM weights" in proc.stderr
    assert load_image(out).size == (64, 40)


def test_cli_reports_bad_input_cleanly(tiny_paths, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"definitely not a png")
    proc = _cli([str(bad), "-i", "make it red", "-o", str(tmp_path / "o.png")], tiny_paths, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("mgie-edit: ") and "Traceback" not in proc.stderr
