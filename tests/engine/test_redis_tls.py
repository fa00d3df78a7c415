"""`rediss://` against Debian's redis-server with TLS on (certificates made here with the openssl CLI): a real
`mgie-worker` and the bot's RedisPool trust the server through MGIE_REDIS_CA_FILE, a client certificate is
sent when the server asks for one, and a missing trust or a misplaced setting is a one-line error."""

from __future__ import annotations

import asyncio

import pytest
from botharness import png_bytes
from redis_pool_harness import pool_env, start_worker, wait_workers
from redis_server import RedisServer, make_tls_files

from bot.redis_engine import RedisPool, check_redis
from mgie_engine.protocol import EditJob
from mgie_engine.redis_pool.connection import RedisSettings, RedisSetupError, client
from mgie_engine.redis_pool.streams import StreamProtocol


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture()
def tls_server(tmp_path, tls_files):
    server = RedisServer(tmp_path / "redis", tls=tls_files)
    server.start()
    yield server
    server.kill()


def settings_for(server: RedisServer, **env: str) -> RedisSettings:
    return RedisSettings.from_env({"MGIE_REDIS_URL": server.url, "MGIE_REDIS_PREFIX": "test", **env})


async def test_a_worker_and_the_bots_pool_run_an_edit_over_tls_with_a_ca_file(tls_server, tls_files, tiny_paths):
    assert tls_server.url.startswith("rediss://")
    ca = {"MGIE_REDIS_CA_FILE": str(tls_files["ca.crt"])}
    settings = settings_for(tls_server, **ca)
    assert (await check_redis(settings)).startswith("7.")
    worker = await start_worker(pool_env(tls_server, tiny_paths, **ca))
    conn = client(settings)
    pool = RedisPool(settings)
    pool.start()
    try:
        await wait_workers(StreamProtocol(conn, settings), 1)
        job = EditJob(job_id="tls1", image=png_bytes(96, 96), instruction="make it night", seed=1, text_cfg=7.5,
                      image_cfg=1.5, steps=3)
        for _ in range(200):
            if pool.capacity:
                break
            await asyncio.sleep(0.1)
        outcome = await asyncio.wait_for(pool.workers[0].run(job), 120)
        assert outcome.png.startswith(b"\x89PNG")
    finally:
        pool.shutdown()
        await conn.aclose()
        code = await worker.stop()
    assert code == 0, worker.text[-3000:]
    assert "job tls1 done" in worker.text and tls_server.password not in worker.text


async def test_without_the_ca_file_the_worker_stops_with_one_line(tls_server, tiny_paths):
    worker = await start_worker(pool_env(tls_server, tiny_paths))
    code = await worker.exited()
    lines = worker.text.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mgie-worker: cannot reach Redis at rediss://***@")
    assert "certificate" in lines[0] and tls_server.password not in worker.text, worker.text


async def test_a_client_certificate_is_sent_when_the_server_asks_for_one(tmp_path, tls_files):
    server = RedisServer(tmp_path / "redis", tls=tls_files, tls_auth_clients="yes")
    server.start()
    try:
        ca = {"MGIE_REDIS_CA_FILE": str(tls_files["ca.crt"])}
        assert (await check_redis(settings_for(server, **ca, MGIE_REDIS_CERT_FILE=str(tls_files["client.crt"]),
                                               MGIE_REDIS_KEY_FILE=str(tls_files["client.key"])))).startswith("7.")
        with pytest.raises(RedisSetupError) as refused:
            await check_redis(settings_for(server, **ca))
    finally:
        server.kill()
    assert "\n" not in str(refused.value) and server.password not in str(refused.value)


def test_tls_settings_are_checked_before_anything_connects(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("not read here")
    plain = {"MGIE_REDIS_URL": "redis://:pw@127.0.0.1:6379/0"}
    tls = {"MGIE_REDIS_URL": "rediss://:pw@127.0.0.1:6379/0"}
    cases = [({**plain, "MGIE_REDIS_CA_FILE": str(ca)}, "must start with rediss://"),
             ({**tls, "MGIE_REDIS_CA_FILE": str(tmp_path / "missing.crt")}, "is not a readable file"),
             ({**tls, "MGIE_REDIS_CERT_FILE": str(ca)}, "go together")]
    for env, message in cases:
        with pytest.raises(RedisSetupError, match=message):
            RedisSettings.from_env(env)
    settings = RedisSettings.from_env({**tls, "MGIE_REDIS_CA_FILE": str(ca)})
    assert settings.ca_file == str(ca) and settings.cert_file is None
