"""`mgie-bot` as a real process: SIGTERM finishes the running edit and exits cleanly; after SIGKILL the
next start resumes the edit that was running. Nothing silently vanishes."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys

import pytest
from botharness import basic_world, png_bytes

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_discord):
    return basic_world(fake_discord)


async def _start(fake, guild, tiny_paths, data_dir, grace: float = 60, early: bool = False):
    """The bot as a process; ``early``: return once it has connected to the gateway, before its on_ready
    (discord.py waits 2 s for guilds first), as users' edits do while a restarted bot comes up."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "MGIE_"))}
    env.update(tiny_paths.env(), DISCORD_TOKEN=fake.token, DISCORD_API_BASE=fake.api_base,
               DISCORD_GATEWAY_URL=fake.gateway_url, DISCORD_GUILD_IDS=str(guild.id), MGIE_DATA_DIR=str(data_dir),
               MGIE_DEVICE="cpu", MGIE_MAX_SIDE="128", MGIE_SHUTDOWN_GRACE=str(grace), MGIE_PROGRESS_INTERVAL="0.2",
               HF_HUB_OFFLINE="1")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    identified = fake.gateway.identify_count
    await fake.wait_for(lambda: any(c.name == "edit" for c in fake.commands), timeout=60)
    if early:
        await fake.wait_for(lambda: fake.gateway.identify_count > identified, timeout=60)
    else:
        await asyncio.sleep(1.0)  # commands are synced before on_ready: let start-up finish
    return proc


async def _slow_edit(fake, channel, alice):
    att = fake.upload_user_attachment(channel, "cat.png", png_bytes(128, 128))
    inter = await fake.slash(alice, channel, "edit", {"image": att, "instruction": "make it night", "steps": 100})
    await fake.wait_for(lambda: inter.original and "Painting" in (inter.original.content or ""), timeout=60)
    return inter


def _state(data_dir) -> list[str]:
    with sqlite3.connect(data_dir / "mgie.sqlite3") as conn:
        return [row[0] for row in conn.execute("SELECT state FROM jobs")]


async def _next_start_delivers(fake, guild, tiny_paths, data, inter) -> None:
    """Start the bot again on ``data``: the edit left running is resumed and its result posted."""
    proc = await _start(fake, guild, tiny_paths, data)
    try:
        await fake.wait_for(lambda: inter.original.attachments, timeout=120)
        await fake.wait_for(lambda: _state(data) == ["done"], timeout=30)  # stored right after the post
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 60)


async def test_sigterm_finishes_the_running_edit_then_exits(world, tmp_path, tiny_paths):
    fake, guild, channel, alice = world
    proc = await _start(fake, guild, tiny_paths, tmp_path / "data")
    try:
        inter = await _slow_edit(fake, channel, alice)
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()[-2000:]
    assert inter.original.attachments and not inter.failed
    assert _state(tmp_path / "data") == ["done"]
    assert fake.token not in out.decode()


async def test_sigterm_past_the_grace_exits_cleanly_and_the_next_start_resumes_the_edit(world, tmp_path, tiny_paths):
    fake, guild, channel, alice = world
    proc = await _start(fake, guild, tiny_paths, tmp_path / "data", grace=0.5, early=True)
    try:
        inter = await _slow_edit(fake, channel, alice)
        proc.send_signal(signal.SIGTERM)  # the edit has far more than half a second left
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        if proc.returncode is None:
            proc.kill()
    # A clean exit, not an abort from the worker thread still inside a torch call at exit.
    assert proc.returncode == 0, out.decode()[-2000:]
    assert "unfinished" in out.decode() and "terminate called" not in out.decode()
    # The edit is left as it was (running), not failed with "the bot is restarting", and the next start ends it.
    assert _state(tmp_path / "data") == ["running"], out.decode()[-2000:]
    await _next_start_delivers(fake, guild, tiny_paths, tmp_path / "data", inter)


async def test_after_sigkill_the_next_start_resumes_the_running_edit(world, tmp_path, tiny_paths):
    fake, guild, channel, alice = world
    proc = await _start(fake, guild, tiny_paths, tmp_path / "data")
    inter = await _slow_edit(fake, channel, alice)
    proc.kill()
    await proc.wait()
    assert _state(tmp_path / "data") == ["running"]  # the database says what was going on
    await _next_start_delivers(fake, guild, tiny_paths, tmp_path / "data", inter)
