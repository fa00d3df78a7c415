"""Throughput of the Redis Streams worker pool on the CPU with the tiny checkpoint: 1, 2 and 4 `mgie-worker`
processes, and the time from a worker's SIGKILL to its job running on another worker and being done.

    python bench/redis_throughput.py --workers 1,2,4 --jobs 12 --steps 10 --out bench/results

Starts its own redis-server (Debian's package; password, AOF everysec) in a temporary folder. Jobs go in
through the stream protocol (as the bot sends them); the bot and Discord are not part of what is timed.
The numbers mean something only where the host has a core per worker: the report records the core count.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

from redis_pool_harness import owner_of, pid_of, pool_env, start_worker, wait_workers  # noqa: E402
from redis_server import RedisServer  # noqa: E402

from mgie_engine.protocol import EditJob  # noqa: E402
from mgie_engine.redis_pool.connection import RedisSettings, client  # noqa: E402
from mgie_engine.redis_pool.streams import StreamProtocol  # noqa: E402


def png(size: int, seed: int) -> bytes:
    import numpy as np
    import PIL.Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def job(job_id: str, steps: int, size: int, seed: int = 0) -> EditJob:
    return EditJob(job_id=job_id, image=png(size, seed), instruction="make it night", seed=seed, text_cfg=7.5,
                   image_cfg=1.5, steps=steps)


async def wait_done(proto: StreamProtocol, ids: list[str], timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    left = set(ids)
    while left:
        for job_id in list(left):
            result = await proto.read_result(job_id)
            if result is not None:
                assert result[0] == "done", result
                left.discard(job_id)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(left)} job(s) not done")
        await asyncio.sleep(0.05)


async def throughput(server: RedisServer, paths, count: int, jobs: int, steps: int, size: int, tag: str) -> dict:
    env = pool_env(server, paths, MGIE_MAX_BATCH="1", MGIE_REDIS_PREFIX=f"bench{tag}", MGIE_MAX_SIDE=str(size))
    settings = RedisSettings.from_env(env)
    conn = client(settings)
    proto = StreamProtocol(conn, settings)
    workers = [await start_worker(env, name=f"w{i}") for i in range(count)]
    try:
        await wait_workers(proto, count, timeout=300)
        warm = [f"warm{tag}-{i}" for i in range(count)]  # first job per worker pays one-time costs
        for job_id in warm:
            await proto.submit(job(job_id, steps, size))
        await wait_done(proto, warm)
        ids = [f"job{tag}-{i}" for i in range(jobs)]
        started = time.perf_counter()
        for i, job_id in enumerate(ids):
            await proto.submit(job(job_id, steps, size, seed=i))
        await wait_done(proto, ids)
        seconds = time.perf_counter() - started
    finally:
        for w in workers:
            await w.stop()
        await conn.aclose()
    return {"workers": count, "jobs": jobs, "seconds": round(seconds, 3), "edits_per_s": round(jobs / seconds, 4)}


async def takeover(server: RedisServer, paths, steps: int, size: int, reclaim: float) -> dict:
    env = pool_env(server, paths, MGIE_MAX_BATCH="1", MGIE_REDIS_PREFIX="benchkill", MGIE_MAX_SIDE=str(size),
                   MGIE_REDIS_RECLAIM_IDLE=str(reclaim), MGIE_REDIS_RENEW_INTERVAL=str(min(1.0, reclaim / 5)))
    settings = RedisSettings.from_env(env)
    conn = client(settings)
    proto = StreamProtocol(conn, settings)
    workers = [await start_worker(env, name=f"k{i}") for i in range(2)]
    try:
        await wait_workers(proto, 2, timeout=300)
        await proto.submit(job("victim", steps, size))
        first = await owner_of(proto, "victim")
        await asyncio.sleep(0.5)
        os.kill(pid_of(first), signal.SIGKILL)
        killed = time.perf_counter()
        while (owner := await owner_of(proto, "victim")) == first:
            await asyncio.sleep(0.02)
        rerun = time.perf_counter() - killed
        await wait_done(proto, ["victim"])
        done = time.perf_counter() - killed
    finally:
        for w in workers:
            w.kill()
            await w.stop()
        await conn.aclose()
    return {"reclaim_idle_s": reclaim, "sigkill_to_running_elsewhere_s": round(rerun, 3),
            "sigkill_to_done_s": round(done, 3), "new_owner_differs": owner != first}


async def main_async(args) -> dict:
    import redis
    import torch

    from mgie_engine.tiny import write_tiny_checkpoints

    report = {"card": "cpu", "cpu_cores": os.cpu_count(), "load_average_at_start": os.getloadavg(), "steps": args.steps, "image_side": args.size,
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "redis-py": redis.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_tiny_checkpoints(Path(tmp) / "tiny", seed=0, plant_visual_tokens=True)
        server = RedisServer(Path(tmp) / "redis")
        server.start()
        try:
            report["redis_server"] = (await _server_version(server))
            runs = []
            for count in args.workers:
                runs.append(await throughput(server, paths, count, args.jobs, args.steps, args.size, str(count)))
                print(json.dumps(runs[-1]), flush=True)
            base = runs[0]["edits_per_s"] / runs[0]["workers"]
            for run in runs:
                run["scaling_vs_linear"] = round(run["edits_per_s"] / (base * run["workers"]), 3)
            report["throughput"] = runs
            report["takeover"] = await takeover(server, paths, 100, args.size, args.reclaim)
            print(json.dumps(report["takeover"]), flush=True)
        finally:
            server.stop()
    return report


async def _server_version(server: RedisServer) -> str:
    settings = RedisSettings(url=server.url)
    conn = client(settings)
    try:
        return (await conn.info("server"))["redis_version"]
    finally:
        await conn.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--reclaim", type=float, default=10.0, help="MGIE_REDIS_RECLAIM_IDLE for the SIGKILL run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu-tiny-redis-pool-{os.cpu_count()}cores.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
