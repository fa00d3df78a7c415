"""Throughput of the Redis Streams worker pool on the CPU with the tiny checkpoint: 1, 2 and 4 `mgie-worker`
processes, and the time from a worker's SIGKILL to its job running on another worker and being done.

    python bench/redis_throughput.py --workers 1,2,4 --jobs 12 --steps 10 --out bench/results \
        [--redis-server PATH] [--cores-per-worker N]

Starts its own redis-server (Debian's package, or the binary given; password, AOF everysec) in a temporary
folder. Jobs go in through the stream protocol (as the bot sends them); the bot and Discord are not part of
what is timed. Workers run as ``sys.executable -m mgie_engine.redis_pool.cli`` (no console script needed),
each pinned to its own cores (sched_setaffinity, and OMP/MKL threads to match), so N workers use N times the
cores and the numbers mean something only where the host has them: the report records the pinning. A worker
that dies or reports a failed load stops the run at once, with its exit code and the tail of its output.
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

from redis_pool_harness import Proc, owner_of, pid_of, pool_env  # noqa: E402
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


class WorkerTrouble(RuntimeError):
    """A worker died, failed to load, or was not ready in time: the message says which and why."""


def tail(proc: Proc, lines: int = 25) -> str:
    return "\n".join(f"    {line}" for line in proc.text.strip().splitlines()[-lines:]) or "    (no output)"


def core_sets(count: int, per_worker: int) -> list[list[int]]:
    """Cores for each of ``count`` workers, ``per_worker`` each, from the cores this process may use."""
    cores = sorted(os.sched_getaffinity(0))
    return [[cores[(i * per_worker + k) % len(cores)] for k in range(per_worker)] for i in range(count)]


async def start_workers(env: dict[str, str], count: int, per_worker: int, tag: str) -> list[Proc]:
    """``count`` worker processes, each on its own cores with as many torch threads as cores."""
    workers = []
    for i, cores in enumerate(core_sets(count, per_worker)):
        threads = str(len(cores))
        worker_env = {**env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mgie_engine.redis_pool.cli", env=worker_env, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            preexec_fn=lambda cores=cores: os.sched_setaffinity(0, cores))
        workers.append(Proc(proc, f"{tag}{i} (cores {','.join(map(str, cores))})"))
    return workers


def check_alive(workers: list[Proc], spare: set[str] = frozenset()) -> None:
    for w in workers:
        if w.proc.returncode is not None and w.name not in spare:
            raise WorkerTrouble(f"worker {w.name} exited with code {w.proc.returncode}:\n{tail(w)}")


async def wait_ready(proto: StreamProtocol, workers: list[Proc], timeout: float) -> None:
    """Until every worker's heartbeat says ready; a death or a failed load is raised at once."""
    deadline = time.monotonic() + timeout
    beats: list[dict] = []
    while time.monotonic() < deadline:
        check_alive(workers)
        beats = await proto.live_workers()
        failed = [b for b in beats if b["state"] == "failed"]
        if failed:
            raise WorkerTrouble(f"worker {failed[0]['name']} could not load the models: {failed[0].get('error')}\n"
                                + "\n".join(f"  {w.name}:\n{tail(w)}" for w in workers))
        if sum(b["state"] == "ready" for b in beats) >= len(workers):
            return
        await asyncio.sleep(0.2)
    states = ", ".join(f"{b['name']}={b['state']}" for b in beats) or "no heartbeat at all"
    raise WorkerTrouble(f"{len(workers)} worker(s) not ready after {timeout:.0f} s ({states}):\n"
                        + "\n".join(f"  {w.name}:\n{tail(w)}" for w in workers))


async def wait_done(proto: StreamProtocol, ids: list[str], timeout: float = 600.0,
                    workers: list[Proc] = (), spare: set[str] = frozenset()) -> None:
    deadline = time.monotonic() + timeout
    left = set(ids)
    while left:
        check_alive(list(workers), spare)
        for job_id in list(left):
            result = await proto.read_result(job_id)
            if result is not None:
                assert result[0] == "done", result
                left.discard(job_id)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(left)} job(s) not done")
        await asyncio.sleep(0.05)


async def throughput(server: RedisServer, paths, count: int, args, tag: str) -> dict:
    env = pool_env(server, paths, MGIE_MAX_BATCH="1", MGIE_REDIS_PREFIX=f"bench{tag}", MGIE_MAX_SIDE=str(args.size))
    settings = RedisSettings.from_env(env)
    conn = client(settings)
    proto = StreamProtocol(conn, settings)
    workers = await start_workers(env, count, args.cores_per_worker, f"w{tag}-")
    try:
        await wait_ready(proto, workers, args.ready_timeout)
        warm = [f"warm{tag}-{i}" for i in range(count)]  # first job per worker pays one-time costs
        for job_id in warm:
            await proto.submit(job(job_id, args.steps, args.size))
        await wait_done(proto, warm, workers=workers)
        ids = [f"job{tag}-{i}" for i in range(args.jobs)]
        started = time.perf_counter()
        for i, job_id in enumerate(ids):
            await proto.submit(job(job_id, args.steps, args.size, seed=i))
        await wait_done(proto, ids, workers=workers)
        seconds = time.perf_counter() - started
    finally:
        for w in workers:
            await w.stop()
        await conn.aclose()
    return {"workers": count, "jobs": args.jobs, "seconds": round(seconds, 3),
            "edits_per_s": round(args.jobs / seconds, 4)}


async def takeover(server: RedisServer, paths, args) -> dict:
    """SIGKILL the worker running a long job: how long until another worker runs it (XAUTOCLAIM after the
    reclaim min-idle), and until it is done."""
    renew = min(1.0, args.reclaim / 5)
    env = pool_env(server, paths, MGIE_MAX_BATCH="1", MGIE_REDIS_PREFIX="benchkill", MGIE_MAX_SIDE=str(args.size),
                   MGIE_REDIS_RECLAIM_IDLE=str(args.reclaim), MGIE_REDIS_RENEW_INTERVAL=str(renew))
    settings = RedisSettings.from_env(env)
    conn = client(settings)
    proto = StreamProtocol(conn, settings)
    workers = await start_workers(env, 2, args.cores_per_worker, "k")
    try:
        await wait_ready(proto, workers, args.ready_timeout)
        await proto.submit(job("victim", 100, args.size))
        first = await owner_of(proto, "victim")
        await asyncio.sleep(0.5)
        os.kill(pid_of(first), signal.SIGKILL)
        killed = time.perf_counter()
        victim = {w.name for w in workers if w.proc.pid == pid_of(first)}
        while (owner := await owner_of(proto, "victim")) == first:
            check_alive(workers, victim)
            await asyncio.sleep(0.02)
        rerun = time.perf_counter() - killed
        await wait_done(proto, ["victim"], workers=workers, spare=victim)
        done = time.perf_counter() - killed
    finally:
        for w in workers:
            w.kill()
            await w.stop()
        await conn.aclose()
    return {"reclaim_idle_s": args.reclaim, "renew_interval_s": renew,
            "sigkill_to_running_elsewhere_s": round(rerun, 3), "sigkill_to_done_s": round(done, 3),
            "new_owner_differs": owner != first}


async def main_async(args) -> dict:
    import redis
    import torch

    from mgie_engine.tiny import write_tiny_checkpoints

    report = {"card": "cpu", "cpu_cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
              "cores_per_worker": args.cores_per_worker, "load_average_at_start": os.getloadavg(),
              "steps": args.steps, "image_side": args.size,
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "redis-py": redis.__version__}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_tiny_checkpoints(Path(tmp) / "tiny", seed=0, plant_visual_tokens=True)
        server = RedisServer(Path(tmp) / "redis", binary=args.redis_server)
        server.start()
        try:
            report["redis_server"] = (await _server_version(server))
            runs = []
            for count in args.workers:
                runs.append(await throughput(server, paths, count, args, str(count)))
                print(json.dumps(runs[-1]), flush=True)
            base = runs[0]["edits_per_s"] / runs[0]["workers"]
            for run in runs:
                run["scaling_vs_linear"] = round(run["edits_per_s"] / (base * run["workers"]), 3)
            report["throughput"] = runs
            report["takeover"] = await takeover(server, paths, args)
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
    parser.add_argument("--redis-server", default="redis-server", help="the redis-server binary (default: on PATH)")
    parser.add_argument("--cores-per-worker", type=int, default=None,
                        help="cores pinned to each worker (default: the usable cores, less one for Redis and this "
                             "script, shared by the largest worker count)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds for workers to load")
    args = parser.parse_args()
    if args.cores_per_worker is None:
        args.cores_per_worker = max(1, (len(os.sched_getaffinity(0)) - 1) // max(args.workers + [2]))
    try:
        report = asyncio.run(main_async(args))
    except WorkerTrouble as err:
        print(f"redis_throughput.py: {err}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu-tiny-redis-pool-{os.cpu_count()}cores.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
