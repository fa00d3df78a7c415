"""The stream protocol against a real redis-server: owner-checked renew and commit, reclaim, dead letter,
restarts, namespaces, validation of what is read back, and no password in errors."""

from __future__ import annotations

import asyncio
import json

import pytest

from mgie_engine.errors import BadImageError, MgieError
from mgie_engine.protocol import EditJob, EditOutcome
from mgie_engine.redis_pool import payloads
from mgie_engine.redis_pool.connection import RedisSettings, RedisSetupError, check_server, client, redact
from mgie_engine.redis_pool.streams import StreamProtocol

pytest_plugins = ["redis_server"]


def job(job_id: str = "job1", image: bytes = b"\x89PNG fake") -> EditJob:
    return EditJob(job_id=job_id, image=image, instruction="make it night", seed=7, text_cfg=7.5, image_cfg=1.5,
                   steps=10, history=(("before", "expressive"),))


def outcome(job_id: str, png: bytes = b"png-bytes") -> EditOutcome:
    return EditOutcome(job_id=job_id, png=png, expressive_instruction="a dark sky", width=8, height=6, seconds=1.5,
                       timings={"llm": 0.5}, llm_cached=False)


@pytest.fixture()
async def proto(redis_server):
    settings = RedisSettings(url=redis_server.url, prefix="t1", reclaim_idle=0.3, renew_interval=0.1)
    conn = client(settings)
    p = StreamProtocol(conn, settings)
    await p.ensure_groups()
    yield p
    await conn.aclose()


async def test_a_job_goes_round_trip_with_its_bytes_and_options(proto):
    assert (await proto.submit(job())).count("-") == 1
    assert await proto.submit(job()) == "queued"  # idempotent: a bot that restarts submits again
    [got] = await proto.fetch("w1", count=4, block_ms=100)
    decoded = payloads.decode_job(got.body, await proto.read_input(got.job_id))
    assert decoded == job()
    assert await proto.commit("w1", got, "done", outcome("job1"))
    assert await proto.result_announcements("bot", 100) == ["job1"]
    status, out, error = await proto.read_result("job1")
    assert (status, out, error) == ("done", outcome("job1"), None)
    assert await proto.submit(job()) == "done"
    assert await proto.read_input("job1") is None  # the input blob goes with the commit
    assert await proto.redis.xlen(proto.keys.jobs) == 0


async def test_renew_only_while_owned_and_reclaim_moves_a_silent_workers_job(proto):
    await proto.submit(job())
    [first] = await proto.fetch("w1", count=1, block_ms=100)
    assert await proto.renew("w1", {first.entry_id: "job1"}) == {first.entry_id: (True, False)}
    await asyncio.sleep(0.15)
    await proto.renew("w1", {first.entry_id: "job1"})  # renewing keeps it from going stale...
    assert await proto.claim_stale("w2", 4) == []
    await asyncio.sleep(0.4)  # ...until w1 stops
    [second] = await proto.claim_stale("w2", 4)
    assert second.entry_id == first.entry_id and second.deliveries == 2
    # w1 comes back to life: it neither takes the job back nor commits it.
    assert await proto.renew("w1", {first.entry_id: "job1"}) == {first.entry_id: (False, False)}
    assert not await proto.commit("w1", first, "done", outcome("job1", b"from w1"))
    assert await proto.commit("w2", second, "done", outcome("job1", b"from w2"))
    assert not await proto.commit("w2", second, "done", outcome("job1", b"twice"))
    assert (await proto.read_result("job1"))[1].png == b"from w2"
    assert await proto.result_announcements("bot", 100) == ["job1"]  # announced once


async def test_the_renew_reports_a_cancel_from_any_host(proto):
    await proto.submit(job())
    [got] = await proto.fetch("w1", count=1, block_ms=100)
    await proto.request_cancel("job1")
    assert await proto.renew("w1", {got.entry_id: "job1"}) == {got.entry_id: (True, True)}


async def test_dead_letter_after_three_deliveries_reading_the_delivery_count(proto):
    await proto.submit(job())
    [got] = await proto.fetch("w1", count=1, block_ms=100)
    for n, worker in ((2, "w2"), (3, "w3")):
        assert not await proto.dead_letter(got.entry_id, "job1")  # below the limit: left for a live worker
        await asyncio.sleep(0.35)
        [got] = await proto.claim_stale(worker, 1)
        assert got.deliveries == n
    assert not await proto.dead_letter(got.entry_id, "job1")  # w3 is still renewing it (not idle)
    await asyncio.sleep(0.35)
    [stale] = await proto.stale_pending()
    assert stale.deliveries == 3 and stale.consumer == "w3"
    assert await proto.dead_letter(stale.entry_id, "job1")
    status, out, error = await proto.read_result("job1")
    assert status == "dead" and out is None and "3 times" in error
    assert await proto.result_announcements("bot", 100) == ["job1"]
    [dead] = await proto.redis.xrange(proto.keys.dead)
    assert dead[1][b"id"] == b"job1" and dead[1][b"deliveries"] == b"3"
    assert await proto.redis.xlen(proto.keys.jobs) == 0
    assert not await proto.commit("w3", got, "done", outcome("job1"))  # too late for w3


async def test_acknowledged_work_and_pending_entries_survive_a_redis_sigkill(proto, redis_server):
    await proto.submit(job("a"))
    await proto.submit(job("b"))
    await proto.submit(job("c"))
    first, second = await proto.fetch("w1", count=2, block_ms=100)
    assert await proto.commit("w1", first, "done", outcome("a"))
    await asyncio.sleep(1.5)  # appendfsync everysec
    redis_server.kill()
    redis_server.start()
    await proto.ensure_groups()
    assert await proto.locate(["a", "b", "c", "zz"]) == {"a": "result", "b": "stream", "c": "stream", "zz": None}
    [pending] = await proto.redis.xpending_range(proto.keys.jobs, "workers", "-", "+", 10)
    assert pending["message_id"].decode() == second.entry_id and pending["consumer"] == b"w1"
    [third] = await proto.fetch("w2", count=5, block_ms=100)
    assert third.job_id == "c"


async def test_two_prefixes_share_one_redis_without_seeing_each_other(proto, redis_server):
    settings = RedisSettings(url=redis_server.url, prefix="t2")
    other = StreamProtocol(client(settings), settings)
    await other.ensure_groups()
    await proto.submit(job())
    await proto.heartbeat("w1", state="ready", capacity=2, active=0)
    assert await other.fetch("w9", count=5, block_ms=50) == []
    assert await other.live_workers() == []
    assert [w["capacity"] for w in await proto.live_workers()] == [2]
    await proto.redis.delete(proto.keys.worker("w1"))  # what its TTL does when the worker dies
    assert await proto.live_workers() == [] and not await proto.redis.smembers(proto.keys.workers)
    await other.redis.aclose()


async def test_nothing_is_stale_before_any_group_exists(redis_server):
    """A bot whose watch loop runs before any worker (or its own results loop) created the groups, or after a
    Redis restart lost them, finds nothing stale instead of failing on NOGROUP."""
    settings = RedisSettings(url=redis_server.url, prefix="fresh")
    fresh = StreamProtocol(client(settings), settings)
    try:
        assert await fresh.stale_pending() == []
        await fresh.submit(job())  # the stream exists now, its group still not
        assert await fresh.stale_pending() == []
    finally:
        await fresh.redis.aclose()


async def test_payloads_from_redis_are_validated_and_capped(proto):
    bad = [b"not json", b"[]", b'{"id": "x y"}', b'{"id":"a","instruction":1,"seed":1,"text_cfg":1,"image_cfg":1,'
           b'"steps":1}', b'{"id":"a","instruction":"x","seed":-1,"text_cfg":1,"image_cfg":1,"steps":1}',
           b'{"id":"a","instruction":"x","seed":1,"text_cfg":NaN,"image_cfg":1,"steps":1}',
           b"{" + b" " * payloads.MAX_JOB_JSON + b"}"]
    for raw in bad:
        with pytest.raises(payloads.BadPayloadError):
            payloads.decode_job(raw, b"img")
    with pytest.raises(payloads.BadPayloadError):
        payloads.decode_result("a", b'{"status": "done"}', None)  # done but no image
    with pytest.raises(payloads.BadPayloadError):
        payloads.decode_progress(b'{"j": "a", "s": "denoise", "n": 9, "t": 5}')
    await proto.redis.set(proto.keys.worker("evil"), b'{"name": "evil", "state": "ready", "capacity": 99999}', ex=5)
    await proto.redis.sadd(proto.keys.workers, "evil")
    assert await proto.live_workers() == []
    await proto.redis.set(proto.keys.input("big"), b"x" * (payloads.MAX_INPUT_BYTES + 1), ex=5)
    with pytest.raises(payloads.BadPayloadError):
        await proto.read_input("big")


async def test_errors_name_no_password(redis_server):
    wrong = RedisSettings(url=redis_server.url.replace(redis_server.password, "wrong-secret"))
    with pytest.raises(RedisSetupError) as err:
        await check_server(client(wrong), wrong)
    assert "refused the password" in str(err.value) and "wrong-secret" not in str(err.value)
    none = RedisSettings(url=f"redis://127.0.0.1:{redis_server.port}/0")
    with pytest.raises(RedisSetupError, match="needs a password"):
        await check_server(client(none), none)
    from redis_pool_harness import free_port
    gone = RedisSettings(url=f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    with pytest.raises(RedisSetupError, match="cannot reach Redis") as err:
        await check_server(client(gone), gone)
    assert "hunter2" not in str(err.value)
    assert redact("rediss://user:hunter2@example.org:6380/1") == "rediss://***@example.org:6380/1"
    assert "hunter2" not in repr(gone)
    ok = RedisSettings(url=redis_server.url)
    assert (await check_server(client(ok), ok)).startswith("7.")


async def test_reclaim_reaches_a_stale_entry_behind_many_live_ones(proto):
    for i in range(30):
        await proto.submit(job(f"j{i}"))
    fetched = await proto.fetch("w1", count=30, block_ms=100)
    live = {d.entry_id: d.job_id for d in fetched[:-1]}
    await asyncio.sleep(0.35)
    await proto.renew("w1", live)  # all but the last are still being worked on
    found = []
    for _ in range(6):  # XAUTOCLAIM scans 10 x COUNT entries a call; the cursor carries on from there
        found += await proto.claim_stale("w2", 1)
    assert [d.job_id for d in found] == ["j29"]


async def test_a_failures_key_params_and_cause_cross_redis_and_malformed_ones_are_dropped(proto):
    err = BadImageError("That file is too large (60 MB); the limit is 50 MB.", key="engine.image_too_large",
                        size="60 MB", limit="50 MB", shape=(1, 2), big=2**60, ratio=float("nan"), flag=True,
                        long="x" * 500)
    sent = payloads.failure_of(err)
    assert sent == payloads.Failure("That file is too large (60 MB); the limit is 50 MB.", "engine.image_too_large",
                                    {"size": "60 MB", "limit": "50 MB", "long": "x" * payloads.MAX_PARAM_TEXT},
                                    "bad_input")
    assert payloads.failure_of(MgieError("plain")) == payloads.Failure("plain", None, {}, "engine_error")
    await proto.submit(job())
    [got] = await proto.fetch("w1", count=1, block_ms=100)
    assert await proto.commit("w1", got, "failed", error=sent)
    assert await proto.read_result_failure("job1") == ("failed", None, sent)
    assert await proto.read_result("job1") == ("failed", None, sent.text)  # what older readers get

    def decoded(**meta):
        return payloads.decode_result_failure("a", json.dumps({"status": "failed", "error": "text", **meta}), None)[2]

    assert decoded() == payloads.Failure("text")  # an older worker: text only
    for key in ("render.failed", "engine.", "engine.x y", "ENGINE.image_empty", 7, ["engine.image_empty"]):
        assert decoded(error_key=key, cause="bad_input") == payloads.Failure("text", None, {}, "bad_input"), key
    for cause in ("Bad Input", "x" * 33, 3, None, {"a": 1}):
        assert decoded(error_key="engine.image_empty", cause=cause).cause is None, cause
    params = {"ok": "fine", "n": 3, "f": 1.5, "too_long": "y" * 201, "flag": True, "nested": [{"a": 1}],
              "1bad": "name", "huge": 2**60}  # MAX_PARAMS entries: each bad one is dropped on its own
    assert decoded(error_key="engine.gpu_failed", error_params=params).params == {"ok": "fine", "n": 3, "f": 1.5}
    assert decoded(error_params={f"p{i}": i for i in range(payloads.MAX_PARAMS + 1)}).params == {}  # too many
    assert decoded(error_params=["not", "a", "dict"]).params == {}
    with pytest.raises(payloads.BadPayloadError):
        decoded(error="e" * (payloads.MAX_ERROR + 1))
    fat = payloads.Failure("語" * payloads.MAX_ERROR, "engine.gpu_failed",
                           {f"p{i}": "語" * payloads.MAX_PARAM_TEXT for i in range(payloads.MAX_PARAMS)}, "bad_input")
    assert len(payloads.encode_result("failed", error=fat)) < payloads.MAX_META_JSON  # read back whole
