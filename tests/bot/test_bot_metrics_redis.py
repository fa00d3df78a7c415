"""Numbers for hosts with the Redis worker pool: the bot (through the fake Discord) against a real
redis-server, the worker's side played with the stream protocol, and the metrics endpoint scraped."""

from __future__ import annotations

import asyncio

import pytest
from botharness import basic_world, edit, make_config, png_bytes
from fakediscord import running_bot
from metrics_scrape import free_port, scrape, scrape_until, value

from bot import i18n
from bot.bot import MgieBot
from mgie_engine.errors import BadImageError
from mgie_engine.protocol import EditOutcome, JobProgress, JobStage
from mgie_engine.redis_pool import payloads
from mgie_engine.redis_pool.connection import RedisSettings, client
from mgie_engine.redis_pool.streams import StreamProtocol

pytest_plugins = ["fakediscord.fixtures", "redis_server"]


@pytest.fixture()
async def worker_side(redis_server, monkeypatch):
    env = {"MGIE_REDIS_URL": redis_server.url, "MGIE_REDIS_PREFIX": "metrics"}
    for name, setting in env.items():
        monkeypatch.setenv(name, setting)
    settings = RedisSettings.from_env(env)
    conn = client(settings)
    proto = StreamProtocol(conn, settings)
    await proto.ensure_groups()
    yield proto
    await conn.aclose()


async def next_delivery(proto: StreamProtocol, timeout: float = 20.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        deliveries = await proto.fetch("w1", count=1, block_ms=100)
        if deliveries:
            return deliveries[0]
    raise TimeoutError("the bot released no job to the stream")


async def test_redis_mode_counts_remote_workers_stages_and_dead_letters(fake_endpoints, worker_side, tmp_path):
    fake, guild, channel, alice = basic_world(fake_endpoints)
    proto, port = worker_side, free_port()
    bot = MgieBot(make_config(fake, tmp_path / "data", [guild.id], metrics_port=port))
    bot._connection.guild_ready_timeout = 0.1  # noqa: SLF001 - discord.py's own knob, set like its kwarg
    async with running_bot(bot, fake.token):
        await proto.heartbeat("w1", state="loading", capacity=0, active=0, device="cuda:0")
        await scrape_until(port, "mgie_workers", 1, worker="w1", state="loading")
        await proto.heartbeat("w1", state="ready", capacity=1, active=0, device="cuda:0")
        samples = await scrape_until(port, "mgie_workers", 1, worker="w1", state="ready")
        assert value(samples, "mgie_workers", worker="w1", state="loading") == 0

        done = await edit(fake, alice, channel)
        delivery = await next_delivery(proto)
        await asyncio.sleep(0.3)  # the bot's progress subscription is up by now
        for stage, step, total in ((JobStage.LANGUAGE, 0, 1), (JobStage.LANGUAGE, 1, 1), (JobStage.DENOISE, 2, 3),
                                   (JobStage.DECODE, 0, 1)):
            await proto.publish_progress(JobProgress(delivery.job_id, stage, step, total))
            await asyncio.sleep(0.05)
        outcome = EditOutcome(job_id=delivery.job_id, png=png_bytes(), expressive_instruction="e", width=64, height=48,
                              seconds=0.3, timings={}, llm_cached=False)
        assert await proto.commit("w1", delivery, "done", outcome)
        await fake.wait_for_original(done, lambda m: m.attachments, timeout=30)
        samples = await scrape_until(port, "mgie_results_total", 1, outcome="done")
        for stage in ("language", "denoise", "decode", "total"):
            assert value(samples, "mgie_edit_stage_seconds_count", stage=stage) == 1, stage
        assert value(samples, "mgie_wait_seconds_count") == 1

        dead = await edit(fake, alice, channel)
        delivery = await next_delivery(proto)
        assert await proto.commit("w1", delivery, "dead", error="This edit stopped its GPU worker 3 times.")
        await fake.wait_for(lambda: dead.original and "3 times" in (dead.original.content or ""), timeout=30)
        samples = await scrape_until(port, "mgie_results_total", 1, outcome="dead_lettered")
        assert value(samples, "mgie_failures_total", cause="dead_letter") == 1
        assert value(samples, "mgie_results_total", outcome="failed") == 0
        assert value(samples, "mgie_edit_stage_seconds_count", stage="total") == 1
    with pytest.raises(OSError):
        await scrape(port)


async def test_a_workers_keyed_error_reaches_a_german_user_in_german_and_counts_as_its_cause(
        fake_endpoints, worker_side, tmp_path, monkeypatch):
    """A worker's BadImageError travels with its key, params and cause: the bot shows it in the user's language
    without matching its English (match_english fails here) and counts it as bad input, not an engine error.
    A worker that sends only English text (older ones) is still translated, by matching, and is an engine error."""
    fake, guild, channel, alice = basic_world(fake_endpoints)
    alice.locale = "de"
    proto, port = worker_side, free_port()
    bot = MgieBot(make_config(fake, tmp_path / "data", [guild.id], metrics_port=port))
    bot._connection.guild_ready_timeout = 0.1  # noqa: SLF001 - discord.py's own knob, set like its kwarg
    matching = i18n.match_english

    def no_matching(*args, **kwargs):
        raise AssertionError("a keyed error from a worker must not be matched by its English text")

    async with running_bot(bot, fake.token):
        await proto.heartbeat("w1", state="ready", capacity=1, active=0, device="cuda:0")
        await scrape_until(port, "mgie_workers", 1, worker="w1", state="ready")
        monkeypatch.setattr(i18n, "match_english", no_matching)
        keyed = await edit(fake, alice, channel)
        delivery = await next_delivery(proto)
        err = BadImageError("That image is too large (5000x4000 pixels); the size limit is 16 megapixels.",
                            key="engine.image_too_many_pixels", width=5000, height=4000, megapixels="16")
        assert await proto.commit("w1", delivery, "failed", error=payloads.failure_of(err))
        german = i18n.text("engine.image_too_many_pixels", "de", width=5000, height=4000, megapixels="16")
        await fake.wait_for(lambda: keyed.original and (keyed.original.content or "").startswith("❌"), timeout=30)
        assert german in keyed.original.content and german.startswith("Dieses Bild ist zu groß")
        samples = await scrape_until(port, "mgie_failures_total", 1, cause="bad_input")
        assert value(samples, "mgie_failures_total", cause="engine_error") == 0

        monkeypatch.setattr(i18n, "match_english", matching)
        old_style = await edit(fake, alice, channel)
        delivery = await next_delivery(proto)
        assert await proto.commit("w1", delivery, "failed",
                                  error="The GPU ran out of memory for this edit; try a smaller image or fewer steps.")
        german = i18n.text("engine.gpu_out_of_memory", "de")
        await fake.wait_for(lambda: old_style.original and (old_style.original.content or "").startswith("❌"),
                            timeout=30)
        assert german in old_style.original.content
        samples = await scrape_until(port, "mgie_failures_total", 1, cause="engine_error")
        assert value(samples, "mgie_failures_total", cause="bad_input") == 1
