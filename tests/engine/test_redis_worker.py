"""`mgie-worker` processes on the tiny checkpoint against a real redis-server: jobs run, a SIGKILLed worker's
job finishes on the other worker once, cancel from another host, clean one-line errors."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time

import pytest
from botharness import png_bytes
from redis_pool_harness import free_port, owner_of, pid_of, pool_env, start_worker, wait_workers

from mgie_engine.protocol import EditJob

pytest_plugins = ["redis_server"]


def job(job_id: str, steps: int = 4) -> EditJob:
    return EditJob(job_id=job_id, image=png_bytes(128, 128), instruction="make it night", seed=1, text_cfg=7.5,
                   image_cfg=1.5, steps=steps)


async def result_of(proto, job_id: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await proto.read_result(job_id)
        if result is not None:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"no result for {job_id}")


async def test_two_workers_run_jobs_and_a_sigkilled_workers_job_finishes_on_the_other(
        redis_server, proto, tiny_paths):
    env = pool_env(redis_server, tiny_paths)
    workers = [await start_worker(env, name="a"), await start_worker(env, name="b")]
    try:
        await wait_workers(proto, 2)
        for i in range(3):
            assert (await proto.submit(job(f"quick{i}"))).count("-") == 1
        for i in range(3):
            status, outcome, _ = await result_of(proto, f"quick{i}")
            assert status == "done" and outcome.png.startswith(b"\x89PNG")
        await proto.submit(job("slow", steps=100))
        owner = await owner_of(proto, "slow")
        await asyncio.sleep(0.5)  # let it begin
        os.kill(pid_of(owner), signal.SIGKILL)
        killed_at = time.monotonic()
        status, outcome, _ = await result_of(proto, "slow", timeout=120)
        assert status == "done"
        rows = [e for e in await proto.redis.xrange(proto.keys.results) if e[1][b"job"] == b"slow"]
        assert len(rows) == 1  # announced once
        assert time.monotonic() - killed_at >= 4 * 0.9  # not before the reclaim time
    finally:
        for w in workers:
            w.kill()
            await w.stop()
    out = "".join(w.text for w in workers)
    assert "taken over (delivery 2)" in out, out[-3000:]
    assert redis_server.password not in out


async def test_cancel_from_another_host_stops_the_running_job(redis_server, proto, tiny_paths):
    worker = await start_worker(pool_env(redis_server, tiny_paths))
    try:
        await wait_workers(proto, 1)
        await proto.submit(job("long", steps=100))
        await owner_of(proto, "long")
        await asyncio.sleep(0.5)
        await proto.request_cancel("long")
        status, _, _ = await result_of(proto, "long", timeout=30)
        assert status == "cancelled"
    finally:
        assert await worker.stop() == 0, worker.text[-3000:]


async def test_sigterm_past_the_grace_waits_for_the_step_and_exits_cleanly(redis_server, proto, tiny_paths):
    """The service returns while the GPU thread is inside a torch call; exiting then would abort the process."""
    worker = await start_worker(pool_env(redis_server, tiny_paths, MGIE_SHUTDOWN_GRACE="0.1"))
    try:
        await wait_workers(proto, 1)
        await proto.submit(job("long", steps=200))
        await owner_of(proto, "long")
        await asyncio.sleep(0.5)  # inside the denoising loop
    finally:
        code = await worker.stop()
    assert code == 0, worker.text[-3000:]
    assert "unfinished" in worker.text and "terminate called" not in worker.text
    assert await proto.read_result("long") is None  # left for a live worker to reclaim


@pytest.mark.parametrize("case", ["wrong password", "unreachable", "no url"])
async def test_bad_redis_settings_exit_with_one_line(redis_server, tiny_paths, case):
    url = {"wrong password": redis_server.url.replace(redis_server.password, "not-the-password"),
           "unreachable": f"redis://:sekrit-pw@127.0.0.1:{free_port()}/0", "no url": ""}[case]
    worker = await start_worker(pool_env(redis_server, tiny_paths, MGIE_REDIS_URL=url))
    code = await worker.exited()
    lines = worker.text.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mgie-worker: "), worker.text
    assert "Traceback" not in worker.text and "not-the-password" not in worker.text and "sekrit" not in worker.text


async def test_a_redis_older_than_7_is_refused_with_one_line(redis_server, tiny_paths):
    """A server that says it is Redis 6.2 (it answers just enough RESP for the checks): clear refusal."""
    async def answer(reader, writer):
        while line := await reader.readline():
            if not line.startswith(b"*"):
                continue
            parts = []
            for _ in range(int(line[1:])):
                await reader.readline()
                parts.append((await reader.readline()).strip().upper())
            if parts[0] == b"INFO":
                body = b"# Server\r\nredis_version:6.2.14\r\n"
                writer.write(b"$%d\r\n%s\r\n" % (len(body), body))
            else:
                writer.write(b"+PONG\r\n" if parts[0] == b"PING" else b"+OK\r\n")
            await writer.drain()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        worker = await start_worker(pool_env(redis_server, tiny_paths, MGIE_REDIS_URL=f"redis://:pw@127.0.0.1:{port}/0"))
        code = await worker.exited()
    finally:
        server.close()
    assert code == 2 and worker.text.strip().splitlines() == [
        f"mgie-worker: Redis at redis://***@127.0.0.1:{port}/0 is version 6.2.14; the worker pool needs Redis 7.0 "
        "or newer (XAUTOCLAIM, consumer groups)."], worker.text


async def test_devices_list_starts_one_process_each_and_sigterm_stops_them(redis_server, proto, tiny_paths):
    parent = await start_worker(pool_env(redis_server, tiny_paths), "--devices", "cpu,cpu")
    try:
        live = await wait_workers(proto, 2)
        pids = {int(w["name"].split(":")[1]) for w in live}
        assert len(pids) == 2 and parent.proc.pid not in pids
        await proto.submit(job("one"))
        assert (await result_of(proto, "one"))[0] == "done"
    finally:
        code = await parent.stop(timeout=60)
    assert code == 0, parent.text[-3000:]
    assert await proto.live_workers() == []  # each child removed its heartbeat on the way out


async def test_the_bot_refuses_a_wrong_redis_password_with_one_line(redis_server, tiny_paths, tmp_path):
    import sys

    env = pool_env(redis_server, tiny_paths, MGIE_REDIS_URL=redis_server.url.replace(redis_server.password, "nope-pw"),
                   DISCORD_TOKEN="x" * 40, MGIE_DATA_DIR=str(tmp_path))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    assert proc.returncode == 2 and out.strip().splitlines() == [
        f"mgie-bot: Redis at redis://***@127.0.0.1:{redis_server.port}/0 refused the password (check the password "
        "in MGIE_REDIS_URL)."], out


async def test_a_worker_that_reclaims_its_own_stale_job_does_not_run_it_a_second_time(redis_server, tiny_paths,
                                                                                      tiny_models):
    """XAUTOCLAIM does not skip the caller's own entries: a worker whose claim on a running job went stale (its
    renewals paused while the machine was overloaded) takes the job back from itself. It must go on with the
    run it has, not start a second one beside it."""
    from conftest import tiny_settings

    from mgie_engine.redis_pool.connection import RedisSettings, client
    from mgie_engine.redis_pool.service import WorkerService
    from mgie_engine.redis_pool.streams import StreamProtocol
    from mgie_engine.worker import LocalWorker

    settings = RedisSettings.from_env({"MGIE_REDIS_URL": redis_server.url, "MGIE_REDIS_PREFIX": "self",
                                       "MGIE_REDIS_RECLAIM_IDLE": "1", "MGIE_REDIS_RENEW_INTERVAL": "0.2"})
    conn = client(settings)
    proto = StreamProtocol(conn, settings)
    worker = LocalWorker(tiny_settings(tiny_paths, max_side=128), loader=lambda _s: tiny_models, max_batch=2)
    runs = []
    run = worker.run

    async def counted(job, *args, **kwargs):
        runs.append(job.job_id)
        return await run(job, *args, **kwargs)

    worker.run = counted
    service = WorkerService(worker, proto, "w-self")
    worker.start()
    try:
        await worker.wait_ready()
        await proto.ensure_groups()
        await proto.submit(job("mine", steps=100))
        [delivery] = await proto.fetch("w-self", 1, 100)
        await service._start(delivery)  # noqa: SLF001 - no renew loop runs here: the claim goes stale
        await asyncio.sleep(settings.reclaim_idle + 0.3)
        assert service.running, "the job ended before its claim went stale; give it more steps"
        await service._take_jobs(asyncio.Event())  # noqa: SLF001 - one round: XAUTOCLAIM finds its own entry
        while service.running:
            await asyncio.sleep(0.1)
        status, outcome, _ = await result_of(proto, "mine")
    finally:
        worker.shutdown()
        await conn.aclose()
    assert status == "done" and outcome.png.startswith(b"\x89PNG")
    assert runs == ["mine"]


async def test_a_workers_keyed_error_goes_back_with_its_key_params_and_cause(redis_server, proto, tiny_paths):
    """The bot shows a worker's error in its user's language and counts it by its cause: the worker sends the
    error's message key, params and cause word beside its English text."""
    worker = await start_worker(pool_env(redis_server, tiny_paths))
    try:
        await wait_workers(proto, 1)
        await proto.submit(dataclasses.replace(job("thin"), image=png_bytes(340, 20)))
        await proto.submit(dataclasses.replace(job("noimage"), image=b"these bytes are no picture"))
        status, _, thin = await result_of_failure(proto, "thin")
        assert status == "failed" and (thin.key, thin.params, thin.cause) == (
            "engine.image_too_thin", {"width": 340, "height": 20, "ratio": 16}, "bad_input")
        assert thin.text == ("That image is too long and thin (340x20); I can edit images up to 16:1, "
                             "so please crop it first.")
        status, _, noimage = await result_of_failure(proto, "noimage")
        assert status == "failed" and (noimage.key, noimage.params, noimage.cause) == (
            "engine.image_not_an_image", {}, "bad_input")
    finally:
        assert await worker.stop() == 0, worker.text[-3000:]


async def result_of_failure(proto, job_id: str, timeout: float = 60.0):
    await result_of(proto, job_id, timeout)
    return await proto.read_result_failure(job_id)
