"""Numbers for hosts: the Prometheus endpoint scraped over HTTP while edits run through the fake Discord,
and ``/mgie stats`` (a server's own last day and week) for its managers only."""

from __future__ import annotations

import errno
import socket
import threading
import time

import aiohttp
import pytest
from botharness import bot_running, command, edit, finished, make_config, team_world
from fakediscord import permissions as perms
from faults import inject_faults
from metrics_scrape import free_port, scrape, scrape_until, value

from bot.storage import JobRecord
from mgie_engine.errors import BadImageError

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_endpoints):
    return team_world(fake_endpoints, "manager", perms.MANAGE_GUILD)


async def test_metrics_endpoint_counts_waits_stages_results_failures_and_workers(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, _ = world
    port, loaded = free_port(), threading.Event()
    config = make_config(fake, tmp_path / "data", [guild.id], metrics_port=port)
    async with bot_running(fake, config, tiny_models, delay_ready=loaded) as bot:
        worker = bot.engine.workers[0].name
        samples = await scrape(port)
        assert value(samples, "mgie_workers", worker=worker, state="loading") == 1
        assert value(samples, "mgie_workers", worker=worker, state="ready") == 0
        assert value(samples, "mgie_queue_depth") == 0 and value(samples, "mgie_previews_sent_total") == 0

        # While the model loads, edits wait: the depth shows them; a cancelled one is counted as such.
        first = await edit(fake, alice, channel)
        await fake.wait_for(lambda: first.original and "queued" in (first.original.content or "").lower())
        assert value(await scrape(port), "mgie_queue_depth") == 1
        await command(fake, alice, channel, "mgie cancel")
        await scrape_until(port, "mgie_results_total", 1, outcome="cancelled")
        waiting = await edit(fake, bob, channel)
        await fake.wait_for(lambda: waiting.original and "queued" in (waiting.original.content or "").lower())
        assert value(await scrape(port), "mgie_queue_depth") == 1

        loaded.set()
        await finished(fake, waiting)
        samples = await scrape_until(port, "mgie_results_total", 1, outcome="done")
        assert value(samples, "mgie_queue_depth") == 0 and value(samples, "mgie_jobs_running") == 0
        assert value(samples, "mgie_workers", worker=worker, state="ready") == 1
        assert value(samples, "mgie_workers", worker=worker, state="loading") == 0
        assert value(samples, "mgie_wait_seconds_count") == 1  # the cancelled job never started
        assert value(samples, "mgie_wait_seconds_sum") > 0
        for stage in ("language", "denoise", "decode", "total"):
            assert value(samples, "mgie_edit_stage_seconds_count", stage=stage) == 1, stage
            assert value(samples, "mgie_edit_stage_seconds_sum", stage=stage) > 0, stage
        parts = sum(value(samples, "mgie_edit_stage_seconds_sum", stage=s) for s in ("language", "denoise", "decode"))
        assert parts <= value(samples, "mgie_edit_stage_seconds_sum", stage="total")
        assert value(samples, "mgie_results_total", outcome="failed") == 0

        # A GPU error fails an edit: counted by its cause, never by its text.
        def gpu_fault(stage, job_ids):
            if stage == "step":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

        inject_faults(bot.engine.workers[0], gpu_fault)
        await edit(fake, alice, channel)
        samples = await scrape_until(port, "mgie_failures_total", 1, cause="engine_error")
        assert value(samples, "mgie_results_total", outcome="failed") == 1
        assert not any("CUDA" in str(key) for key in samples)

        # An input the engine finds it cannot edit is the user's to fix: counted apart from engine errors.
        def unusable_input(stage, job_ids):
            if stage == "language":
                raise BadImageError("That image cannot be edited.")

        inject_faults(bot.engine.workers[0], unusable_input)
        await edit(fake, bob, channel)
        samples = await scrape_until(port, "mgie_failures_total", 1, cause="bad_input")
        assert value(samples, "mgie_results_total", outcome="failed") == 2
        assert value(samples, "mgie_failures_total", cause="engine_error") == 1
        inject_faults(bot.engine.workers[0], lambda stage, job_ids: None)

        # A result the disk cannot store fails as a storage failure.
        real_save = bot.store.save_image

        async def disk_full(job_id, kind, data, ext="png"):
            if kind == "out":
                raise OSError(errno.ENOSPC, "No space left on device")
            return await real_save(job_id, kind, data, ext)

        bot.store.save_image = disk_full
        await edit(fake, bob, channel)
        samples = await scrape_until(port, "mgie_failures_total", 1, cause="storage")
        assert value(samples, "mgie_results_total", outcome="failed") == 3
        assert value(samples, "mgie_results_total", outcome="done") == 1
        assert value(samples, "mgie_results_total", outcome="dead_lettered") == 0
        assert value(samples, "mgie_failures_total", cause="worker_lost") == 0
        assert value(samples, "mgie_wait_seconds_count") == 4

    with pytest.raises(aiohttp.ClientConnectionError):  # the endpoint stops with the bot
        await scrape(port)


async def test_two_bots_in_one_process_keep_their_own_numbers(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    port = free_port()
    async with bot_running(fake, make_config(fake, tmp_path / "one", [guild.id], metrics_port=port), tiny_models):
        await finished(fake, await edit(fake, alice, channel))
        await scrape_until(port, "mgie_results_total", 1, outcome="done")
    port = free_port()
    async with bot_running(fake, make_config(fake, tmp_path / "two", [guild.id], metrics_port=port), tiny_models):
        assert value(await scrape(port), "mgie_results_total", outcome="done") == 0


async def test_a_taken_metrics_port_is_logged_and_the_bot_still_edits(world, tmp_path, tiny_models, caplog):
    fake, guild, channel, alice, *_ = world
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(fake, tmp_path / "data", [guild.id], metrics_port=port)
        async with bot_running(fake, config, tiny_models):
            assert (await finished(fake, await edit(fake, alice, channel))).attachments
        assert any("no metrics endpoint" in r.getMessage() and str(port) in r.getMessage() for r in caplog.records)


HOUR, DAY = 3600.0, 86_400.0


async def seed(bot, guild_id: int | None, state: str, ended_ago: float, wait: float, took: float) -> None:
    """A job of ``guild_id`` that ended ``ended_ago`` seconds ago after waiting ``wait`` and running ``took``."""
    finished_at = time.time() - ended_ago
    await bot.store.create_job(JobRecord(
        id="", user_id=1, channel_id=1, guild_id=guild_id, instruction="seeded", seed=0, text_cfg=7.5,
        image_cfg=1.5, steps=3, state=state, created_at=finished_at - took - wait,
        started_at=finished_at - took, finished_at=finished_at))


async def test_stats_show_a_managers_server_its_last_day_and_week(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, manager = world
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        await finished(fake, await edit(fake, alice, channel))  # a real edit: waits and runs a few seconds at most
        for ago, wait, took in ((HOUR, 100, 100), (2 * HOUR, 200, 200), (20 * HOUR, 300, 300)):
            await seed(bot, guild.id, "done", ago, wait, took)
        await seed(bot, guild.id, "failed", 3 * HOUR, 1, 1)
        await seed(bot, guild.id, "done", 3 * DAY, 400, 400)
        await seed(bot, guild.id, "done", 5 * DAY, 500, 500)
        await seed(bot, guild.id, "failed", 6 * DAY, 1, 1)
        await seed(bot, guild.id, "done", 9 * DAY, 1000, 1000)  # older than a week
        await seed(bot, guild.id + 1, "done", HOUR, 1000, 1000)  # another server
        await seed(bot, None, "failed", HOUR, 1000, 1000)  # a DM
        await seed(bot, guild.id, "cancelled", HOUR, 1000, 1000)

        inter = await fake.slash(manager, channel, "mgie stats")
        await fake.wait_for(lambda: inter.callbacks)
        assert inter.ephemeral and not inter.failed
        fields = {f["name"]: f["value"] for f in inter.callbacks[0].data["embeds"][0]["fields"]}
        # The real edit's wait and run are each under 100 s, so it is the lowest of each list.
        assert fields["Last 24 hours"] == ("Edits: 4\nMedian wait: 150 s\nMedian edit time: 150 s\nFailures: 1")
        assert fields["Last 7 days"] == ("Edits: 6\nMedian wait: 250 s\nMedian edit time: 250 s\nFailures: 2")

        german = await fake.slash(manager, channel, "mgie stats", locale="de")
        await fake.wait_for(lambda: german.callbacks)
        names = [f["name"] for f in german.callbacks[0].data["embeds"][0]["fields"]]
        assert names == ["Letzte 24 Stunden", "Letzte 7 Tage"]


async def test_stats_are_refused_privately_to_members_without_manage_server(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    async with bot_running(fake, make_config(fake, tmp_path / "data"), tiny_models):  # global: DMs too
        assert "Manage Server" in await command(fake, alice, channel, "mgie stats")
        assert "Server verwalten" in await command_in(fake, alice, channel, "de")
        assert "server" in await command(fake, alice, fake.dm_channel(alice), "mgie stats")


async def command_in(fake, user, channel, locale: str) -> str:
    inter = await fake.slash(user, channel, "mgie stats", locale=locale)
    await fake.wait_for(lambda: inter.callbacks)
    assert inter.ephemeral and not inter.failed
    return inter.callbacks[0].data["content"]
