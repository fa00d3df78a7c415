"""Restart recovery resumes only what a previous run left: an edit that arrives while discord.py still
waits for its guilds (on_ready comes seconds after the gateway connects) is not taken for a leftover."""

from __future__ import annotations

import asyncio
import collections
import threading

import pytest
from botharness import SharedModelWorker, basic_world, edit, finished, make_config

from bot.bot import MgieBot

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_endpoints):
    return basic_world(fake_endpoints)


async def test_an_edit_sent_before_on_ready_runs_once_and_is_posted_once(world, tmp_path, tiny_models):
    fake, guild, channel, alice = world
    config = make_config(fake, tmp_path / "data", [guild.id])
    hold = threading.Event()  # the worker loads only once on_ready has come and gone
    worker = SharedModelWorker(tiny_models, config.engine, delay_ready=hold)
    runs: collections.Counter[str] = collections.Counter()
    run = worker.run

    async def counted(job, *args, **kwargs):
        runs[job.job_id] += 1
        return await run(job, *args, **kwargs)

    worker.run = counted
    bot = MgieBot(config, workers=[worker])
    bot._connection.guild_ready_timeout = 3.0  # noqa: SLF001 - discord.py's own knob: on_ready comes 3 s late
    task = asyncio.create_task(bot.start(fake.token))
    try:
        await fake.wait_for(lambda: bot.get_guild(guild.id) is not None, timeout=30)
        assert not bot.is_ready()
        inter = await edit(fake, alice, channel)
        await fake.wait_for(lambda: inter.original and "queued" in inter.original.content.lower(), timeout=30)
        assert not bot.is_ready()  # the edit is queued before on_ready
        await fake.wait_for(bot.is_ready, timeout=30)
        await asyncio.sleep(0.5)  # on_ready's handlers run
        hold.set()
        await finished(fake, inter)
        await fake.wait_for(lambda: not bot.queue.running and not bot.queue.waiting(), timeout=60)
        await bot.settle_events()
        assert list(runs.values()) == [1], runs
        assert sum(1 for r in fake.requests if r.files and inter.token in r.path) == 1
    finally:
        hold.set()
        await bot.close()
        await asyncio.wait_for(task, 10)
