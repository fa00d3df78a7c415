"""Starting `mgie-bot`: clear words for a missing or rejected token, and the token never in the logs."""

from __future__ import annotations

import asyncio
import os
import sys

pytest_plugins = ["fakediscord.fixtures"]


async def _run_bot(env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode()


def _env(tmp_path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "MGIE_"))}
    env.update({"MGIE_DATA_DIR": str(tmp_path / "data"), "MGIE_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}, **extra)
    return env


async def test_missing_token_says_what_to_do(tmp_path):
    code, out = await _run_bot(_env(tmp_path))
    assert code == 2 and "DISCORD_TOKEN is not set" in out and "Traceback" not in out


async def test_rejected_token_says_so_and_is_never_printed(fake_discord, tmp_path):
    secret = "NOT.the-real.token-8d1f0c"
    code, out = await _run_bot(_env(tmp_path, DISCORD_TOKEN=secret, DISCORD_API_BASE=fake_discord.api_base,
                                    DISCORD_GATEWAY_URL=fake_discord.gateway_url))
    assert code == 2 and "rejected DISCORD_TOKEN" in out
    assert secret not in out


def test_a_bot_whose_workers_run_elsewhere_imports_no_model_library():
    """With MGIE_REDIS_URL the bot process loads no model: importing torch, transformers and diffusers would
    only add seconds to each restart (bot.bot imports the local worker pool only when it makes one)."""
    import subprocess
    from pathlib import Path

    probe = ("import sys, bot.bot, bot.__main__, bot.redis_engine, cogs.admin, cogs.edit, cogs.history, "
             "cogs.moderation, cogs.results, cogs.stats\n"
             "print(*[m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules])")
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == []
