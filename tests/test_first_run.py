"""A newcomer's first minutes, through the real entry points as subprocesses: `--help`, argument and setting
mistakes, no network, a damaged database. Each ends in one clear line on stderr and a set exit code, never a
traceback, and nothing heavy (torch, the models) loads before the input has been checked."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_image

ROOT = Path(__file__).resolve().parents[1]

# Runs an entry point's main() and reports, after it, whether torch got imported.
_PROBE = """
import sys
from importlib import import_module
module, args = sys.argv[1], sys.argv[2:]
try:
    code = import_module(module).main(args)
except SystemExit as exit:
    code = exit.code
print("TORCH-IMPORTED" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
sys.exit(code)
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "MGIE_"))}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **extra)
    return env


def _run(module: str, *args: str, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE, module, *args], cwd=cwd, env=_clean_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess, prog: str) -> str:
    """The single `prog: ...` line on stderr (the probe's own marker line aside)."""
    lines = [line for line in proc.stderr.splitlines() if line not in ("NO-TORCH", "TORCH-IMPORTED")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and re.match(rf"{prog}( \w+)?: ", lines[0]), proc.stderr  # "mgie-bot invite: ..." too
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- mgie-bot ----------------------------------------------------------------------------------------


def test_bot_help_explains_and_starts_nothing(tmp_path):
    proc = _run("bot.__main__", "--help", cwd=tmp_path, DISCORD_TOKEN="would-start-the-bot")
    assert proc.returncode == 0, proc.stderr
    assert "usage: mgie-bot" in proc.stdout and "invite" in proc.stdout and ".env" in proc.stdout
    assert "DISCORD_TOKEN is not set" not in proc.stderr and "NO-TORCH" in proc.stderr


@pytest.mark.parametrize("args, words", [
    (("invite", "abc"), "APPLICATION_ID"),
    (("invite",), "APPLICATION_ID"),
    (("invite", "-5"), "APPLICATION_ID"),
    (("frobnicate",), "invalid choice"),
])
def test_bot_argument_errors_are_one_line(tmp_path, args, words):
    proc = _run("bot.__main__", *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert words in _one_line_error(proc, "mgie-bot")


def test_bot_invite_prints_the_url(tmp_path):
    proc = _run("bot.__main__", "invite", "1234567890123", cwd=tmp_path)
    assert proc.returncode == 0 and "client_id=1234567890123" in proc.stdout and "permissions=117760" in proc.stdout


@pytest.mark.parametrize("name, value", [
    ("MGIE_DEVICE", "gpu"), ("MGIE_MAX_SIDE", "abc"), ("MGIE_MAX_SIDE", "0"), ("MGIE_PROGRESS_INTERVAL", "abc"),
    ("MGIE_SHUTDOWN_GRACE", "abc"), ("MGIE_MAX_QUEUE", "abc"), ("MGIE_MAX_BATCH", "x"), ("MGIE_DTYPE", "int4"),
    ("MGIE_COMPILE", "maybe"), ("MGIE_STALL_TIMEOUT", "nan"), ("DISCORD_API_BASE", "discord.com"),
])
def test_every_bad_setting_is_one_line_before_anything_loads(tmp_path, name, value):
    proc = _run("bot.__main__", cwd=tmp_path, DISCORD_TOKEN="t0ken", **{name: value})
    assert proc.returncode == 2
    assert name in _one_line_error(proc, "mgie-bot") and "NO-TORCH" in proc.stderr


def test_bad_engine_setting_ends_like_a_bad_bot_setting(tmp_path):
    engine = _run("bot.__main__", cwd=tmp_path, DISCORD_TOKEN="t0ken", MGIE_MAX_BATCH="x")
    bot = _run("bot.__main__", cwd=tmp_path, DISCORD_TOKEN="t0ken", MGIE_MAX_QUEUE="x")
    assert engine.returncode == bot.returncode == 2
    assert _one_line_error(engine, "mgie-bot").replace("MGIE_MAX_BATCH", "X").split(" from")[0] == \
        _one_line_error(bot, "mgie-bot").replace("MGIE_MAX_QUEUE", "X").split(" from")[0]


def test_dotenv_is_read_from_the_current_directory_before_any_setting(tmp_path):
    """MGIE_SHUTDOWN_GRACE used to be read at import, before `.env`; and `.env` was looked for beside the code."""
    (tmp_path / ".env").write_text("DISCORD_TOKEN=t0ken\nMGIE_SHUTDOWN_GRACE=soon\n")
    work = tmp_path / "sub" / "dir"  # found from a folder below, too
    work.mkdir(parents=True)
    proc = _run("bot.__main__", cwd=work, DISCORD_API_BASE=f"http://127.0.0.1:{_closed_port()}/api/v10")
    assert proc.returncode == 2
    assert "MGIE_SHUTDOWN_GRACE" in _one_line_error(proc, "mgie-bot")


def test_unreachable_discord_is_one_line_and_voice_is_not_mentioned(tmp_path):
    base = f"http://127.0.0.1:{_closed_port()}/api/v10"
    proc = _run("bot.__main__", cwd=tmp_path, timeout=180, DISCORD_TOKEN="abc", DISCORD_API_BASE=base,
                MGIE_DATA_DIR=str(tmp_path / "data"), MGIE_DEVICE="cpu")
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "voice will NOT be supported" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mgie-bot: ")]
    assert len(errors) == 1 and "could not reach Discord" in errors[0] and base in errors[0], proc.stderr


def test_unresolvable_discord_host_is_one_line(tmp_path):
    proc = _run("bot.__main__", cwd=tmp_path, timeout=180, DISCORD_TOKEN="abc",
                DISCORD_API_BASE="http://no-such-host.invalid/api/v10", MGIE_DATA_DIR=str(tmp_path / "data"),
                MGIE_DEVICE="cpu")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("mgie-bot: ")]
    assert len(errors) == 1 and "no-such-host.invalid" in errors[0], proc.stderr


def test_damaged_database_is_one_line_before_going_online(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "mgie.sqlite3").write_bytes(b"this is not an SQLite file, just junk " * 200)
    base = f"http://127.0.0.1:{_closed_port()}/api/v10"  # would give a network error if it went online first
    proc = _run("bot.__main__", cwd=tmp_path, DISCORD_TOKEN="abc", DISCORD_API_BASE=base, MGIE_DATA_DIR=str(data))
    assert proc.returncode == 2
    line = _one_line_error(proc, "mgie-bot")
    assert "mgie.sqlite3" in line and "damaged" in line and "backup" in line
    assert "NO-TORCH" in proc.stderr


def test_a_gpu_that_is_not_there_is_one_line(tmp_path):
    base = f"http://127.0.0.1:{_closed_port()}/api/v10"
    proc = _run("bot.__main__", cwd=tmp_path, DISCORD_TOKEN="abc", DISCORD_API_BASE=base,
                MGIE_DATA_DIR=str(tmp_path / "data"), MGIE_DEVICE="cuda:0")
    assert proc.returncode == 2
    assert "no CUDA GPU" in _one_line_error(proc, "mgie-bot")


# --- mgie-edit ---------------------------------------------------------------------------------------


@pytest.fixture()
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    make_image(80, 60).save(path)
    return path


def test_edit_help_shows_the_ranges(tmp_path):
    proc = _run("mgie_engine.cli", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "NO-TORCH" in proc.stderr
    text = " ".join(proc.stdout.split())
    assert "denoising steps, 1-200" in text and "64-2048" in text and "300 characters" in text


@pytest.mark.parametrize("args, words", [
    (["--steps", "-1"], "--steps must be from 1 to 200"),
    (["--steps", "0"], "--steps"),
    (["--max-side", "0"], "--max-side"),
    (["--text-cfg", "nan"], "--text-cfg"),
    (["--image-cfg", "11"], "--image-cfg"),
    (["--seed", "-3"], "--seed"),
    (["--instruction", ""], "describe the edit"),
    (["--instruction", "x" * 5000], "too long"),
])
def test_edit_refuses_bad_options_before_importing_torch(tmp_path, photo, args, words):
    base = [str(photo), "-i", "make it red", "-o", str(tmp_path / "out.png")]
    proc = _run("mgie_engine.cli", *base, *args, cwd=tmp_path)
    assert proc.returncode == 2 and "NO-TORCH" in proc.stderr
    assert words in _one_line_error(proc, "mgie-edit")


def test_edit_names_a_missing_input_at_once(tmp_path):
    proc = _run("mgie_engine.cli", "no-such-photo.jpg", "-i", "make it red", "-o", "out.png", cwd=tmp_path)
    assert proc.returncode == 2 and "NO-TORCH" in proc.stderr
    assert "no-such-photo.jpg" in _one_line_error(proc, "mgie-edit")


@pytest.mark.parametrize("output", ["photo.png/out.png", "."])
def test_edit_refuses_an_unwritable_output_before_the_edit(tmp_path, photo, output):
    proc = _run("mgie_engine.cli", str(photo), "-i", "make it red", "-o", output, cwd=tmp_path)
    assert proc.returncode == 2 and "NO-TORCH" in proc.stderr
    assert "--output" in _one_line_error(proc, "mgie-edit")


def test_edit_bad_setting_is_one_line(tmp_path, photo):
    proc = _run("mgie_engine.cli", str(photo), "-i", "make it red", "-o", "out.png", cwd=tmp_path, MGIE_DEVICE="gpu")
    assert proc.returncode == 2 and "NO-TORCH" in proc.stderr
    assert "MGIE_DEVICE" in _one_line_error(proc, "mgie-edit")


# --- the tiny checkpoint, as the README tells a newcomer to use it ---------------------------------------


def test_tiny_env_works_from_another_folder_and_warns_once(tmp_path, photo):
    made = tmp_path / "made-here"
    made.mkdir()
    proc = subprocess.run([sys.executable, "-m", "mgie_engine.tiny", "tiny-ckpt"], cwd=made, env=_clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split("=")[0] for line in lines] == ["MGIE_CKPT_DIR", "MGIE_IP2P", "MGIE_CLIP"]
    assert all(Path(line.split("=", 1)[1]).is_absolute() for line in lines)
    assert "Writing model shards" not in proc.stderr

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / ".env").write_text(proc.stdout + "MGIE_DEVICE=cpu\n")
    proc = _run("mgie_engine.cli", str(photo), "-i", "make the sky a sunset", "--steps", "2", "--max-side", "64",
                "-o", "out.png", "--json", cwd=elsewhere, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("RANDOM") == 1 and "Traceback" not in proc.stderr
    timings = json.loads(proc.stdout)["timings"]
    assert timings["imports"] > 0 and timings["total"] >= sum(v for k, v in timings.items() if k != "total")
    assert (elsewhere / "out.png").stat().st_size > 0


def test_tiny_checkpoint_files_are_git_ignored(tmp_path):
    proc = subprocess.run(["git", "check-ignore", "--no-index", "tiny-ckpt/ml-mgie/RANDOM_WEIGHTS", "tiny.env"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.split() == ["tiny-ckpt/ml-mgie/RANDOM_WEIGHTS", "tiny.env"], proc.stderr

