"""The bot's RedisPool against a real redis-server (the worker's side played with the protocol directly):
capacity from heartbeats, reconcile after a loss, cancel passed on, malformed results turned into messages."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from bot.failure_causes import cause_of
from bot.redis_engine import RedisPool, RemoteJobError
from mgie_engine.errors import JobCancelledError, MgieError
from mgie_engine.protocol import EditJob, EditOutcome, Worker, WorkerState
from mgie_engine.redis_pool.connection import RedisSettings, client
from mgie_engine.redis_pool.payloads import Failure
from mgie_engine.redis_pool.streams import StreamProtocol

pytest_plugins = ["redis_server"]


def job(job_id: str) -> EditJob:
    return EditJob(job_id=job_id, image=b"img", instruction="x", seed=1, text_cfg=7.5, image_cfg=1.5, steps=5)


@pytest.fixture()
async def sides(redis_server):
    settings = RedisSettings.from_env({"MGIE_REDIS_URL": redis_server.url, "MGIE_REDIS_PREFIX": "bp",
                                       "MGIE_REDIS_RECLAIM_IDLE": "2", "MGIE_REDIS_RENEW_INTERVAL": "0.2"})
    pool = RedisPool(settings)
    pool.start()
    conn = client(settings)
    worker = StreamProtocol(conn, settings)
    await worker.ensure_groups()
    yield pool, worker
    pool.shutdown()
    await conn.aclose()


async def eventually(predicate, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_capacity_is_the_sum_of_live_heartbeats(sides):
    pool, worker = sides
    woken = []
    pool.on_capacity = lambda: woken.append(pool.capacity)
    assert isinstance(pool.workers[0], Worker)  # the queue's typed worker protocol
    assert pool.workers[0].capacity == 0 and pool.state is WorkerState.LOADING
    await worker.heartbeat("w1", state="ready", capacity=3, active=0, device="cuda:0")
    await worker.heartbeat("w2", state="loading", capacity=0, active=0, device="cuda:1")
    await eventually(lambda: pool.workers[0].capacity == 3)
    assert woken == [3] and pool.state is WorkerState.READY and len(pool.info()) == 2
    await worker.forget_worker("w1")
    await eventually(lambda: pool.workers[0].capacity == 0)


async def test_a_job_lost_by_redis_is_released_again_and_its_result_arrives(sides):
    pool, worker = sides
    running = asyncio.ensure_future(pool.workers[0].run(job("j1")))
    await eventually(lambda: worker.redis.xlen(worker.keys.jobs))
    entry = (await worker.redis.xrange(worker.keys.jobs))[0][0]
    await worker.redis.xdel(worker.keys.jobs, entry)  # what a Redis crash within its last second can lose
    await worker.redis.delete(worker.keys.ref("j1"), worker.keys.input("j1"))
    await pool.reconcile()
    [delivery] = await worker.fetch("w1", count=1, block_ms=500)
    assert delivery.job_id == "j1" and await worker.read_input("j1") == b"img"
    outcome = EditOutcome(job_id="j1", png=b"png", expressive_instruction="e", width=1, height=1, seconds=0.1,
                          timings={}, llm_cached=False)
    assert await worker.commit("w1", delivery, "done", outcome)
    assert await asyncio.wait_for(running, 10) == outcome


async def test_cancel_reaches_the_worker_and_the_answer_becomes_the_right_error(sides):
    pool, worker = sides
    cancel = threading.Event()
    running = asyncio.ensure_future(pool.workers[0].run(job("j2"), None, cancel))
    [delivery] = await eventually(lambda: worker.fetch("w1", count=1, block_ms=100))
    cancel.set()
    await eventually(lambda: worker.is_cancelled("j2"))
    assert await worker.commit("w1", delivery, "cancelled")
    with pytest.raises(JobCancelledError):
        await asyncio.wait_for(running, 10)
    failing = asyncio.ensure_future(pool.workers[0].run(job("j3")))
    [delivery] = await eventually(lambda: worker.fetch("w1", count=1, block_ms=100))
    await worker.commit("w1", delivery, "failed", error="The GPU ran out of memory for this edit.")
    with pytest.raises(MgieError, match="ran out of memory"):
        await asyncio.wait_for(failing, 10)


async def test_a_malformed_result_fails_the_job_with_a_message(sides):
    pool, worker = sides
    running = asyncio.ensure_future(pool.workers[0].run(job("j4")))
    [delivery] = await eventually(lambda: worker.fetch("w1", count=1, block_ms=100))
    await worker.commit("w1", delivery, "done")  # "done" without an image: a buggy or hostile worker
    with pytest.raises(MgieError, match="damaged"):
        await asyncio.wait_for(running, 10)


async def test_a_queued_job_naming_a_file_on_the_bots_disk_travels_with_its_bytes(sides, tmp_path):
    pool, worker = sides
    stored = tmp_path / "in.png"
    stored.write_bytes(b"stored-bytes")
    running = asyncio.ensure_future(pool.workers[0].run(dataclasses.replace(job("j5"), image=str(stored))))
    [delivery] = await eventually(lambda: worker.fetch("w1", count=1, block_ms=100))
    assert await worker.read_input("j5") == b"stored-bytes"
    await worker.commit("w1", delivery, "cancelled")
    with pytest.raises(JobCancelledError):
        await asyncio.wait_for(running, 10)
    with pytest.raises(MgieError, match="was lost"):
        await pool.workers[0].run(dataclasses.replace(job("j6"), image=str(tmp_path / "gone.png")))


async def test_progress_ticks_reach_the_jobs_callback_and_bad_ones_are_ignored(sides):
    from mgie_engine.protocol import JobProgress

    pool, worker = sides
    seen = []
    running = asyncio.ensure_future(pool.workers[0].run(job("j7"), seen.append))
    [delivery] = await eventually(lambda: worker.fetch("w1", count=1, block_ms=100))
    await asyncio.sleep(0.3)  # the bot's subscription is up by now
    await worker.redis.publish(worker.keys.progress, b'{"j": "j7", "s": "denoise", "n": 99, "t": 5}')  # invalid
    await worker.publish_progress(JobProgress("other", "denoise", 1, 5))  # someone else's job
    await worker.publish_progress(JobProgress("j7", "denoise", 3, 5))
    await eventually(lambda: seen)
    assert seen == [JobProgress("j7", "denoise", 3, 5)]
    await worker.commit("w1", delivery, "cancelled")
    with pytest.raises(JobCancelledError):
        await asyncio.wait_for(running, 10)


async def test_a_workers_failure_keeps_its_key_params_and_cause_where_the_bot_knows_them(sides):
    """What a worker sends crosses a trust boundary: a key this bot's catalogue lacks, or whose placeholders
    the params leave open, is dropped (its English is matched as for older workers); an unknown cause is an
    engine error, and so is a cause only the bot may name; a failure without text is the catalogue's "failed on a GPU worker"."""
    pool, worker = sides
    cases = [
        (Failure("That file is empty.", "engine.image_empty", {}, "bad_input"),
         ("engine.image_empty", {}, "bad_input")),
        (Failure("Something went wrong on the GPU (X); the error is logged.", "engine.gpu_failed", {"error": "X"},
                 "engine_error"), ("engine.gpu_failed", {"error": "X"}, "engine_error")),
        (Failure("That file is empty.", "engine.no_such_message", {}, "bad_input"), (None, {}, "bad_input")),
        (Failure("That file is too large.", "engine.image_too_large", {"size": "9 MB"}, "storage"),  # no {limit}
         (None, {}, "storage")),
        (Failure("That file is empty.", "engine.image_empty", {}, "made_up"), ("engine.image_empty", {}, "engine_error")),
        # Dead letters and lost workers are the bot's to say, never a worker's.
        (Failure("That file is empty.", "engine.image_empty", {}, "dead_letter"),
         ("engine.image_empty", {}, "engine_error")),
        (Failure("That file is empty.", "engine.image_empty", {}, "worker_lost"),
         ("engine.image_empty", {}, "engine_error")),
        (Failure("That file is empty.", "errors.unknown_error", {}, None), ("errors.unknown_error", {}, "engine_error")),
        (None, ("engine.worker_failed", {}, "engine_error")),
    ]
    for n, (sent, (key, params, cause)) in enumerate(cases):
        running = asyncio.ensure_future(pool.workers[0].run(job(f"f{n}")))
        [delivery] = await eventually(lambda: worker.fetch("w1", count=1, block_ms=100))
        await worker.commit("w1", delivery, "failed", error=sent)
        with pytest.raises(RemoteJobError) as raised:
            await asyncio.wait_for(running, 10)
        err = raised.value
        assert (err.key, err.params, cause_of(err)) == (key, params, cause), sent
        assert str(err) == (sent.text if sent else "The edit failed on a GPU worker.")
