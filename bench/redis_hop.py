"""What the Redis hop costs on the GPU: the same edits in-process and through Redis Streams, same run, same models.

    python bench/redis_hop.py --tokenizer-dir DIR [--redis-server PATH] [--compile [--home-warm-up]]
                              [--steps 100] [--runs 8] [--burst 32] [--burst-rounds 1] [--out bench/results]

The scale-out issue's goal: one edit through Redis costs at most 30 ms or 3% more than the same edit
in-process, and a burst through Redis keeps 95% of the in-process throughput. Both paths go through the bot's
fair queue (``bot.queue.JobQueue``, PNG in, PNG out) to ONE ``LocalWorker`` holding full-size random weights
(``bench/full_size.py``, as ``mgie_bench.py`` builds them): in-process it is the queue's worker; through Redis
the queue's worker is the bot's ``RedisPool`` and the same LocalWorker sits behind an ``mgie-worker``
``WorkerService`` on its own thread and event loop (as its own process would have), against a real
``redis-server`` this script starts (free loopback port, password, AOF everysec, temporary folder) and always
stops. So the GPU work is the same on both paths and the difference is the hop. Lone edits alternate between
the paths (drift hits both); then one burst each. ``--small`` dry-runs it all on a CPU with shrunken models.
Both sides of the hop share this process's GIL here, where a real mgie-worker has its own: if anything, the
hop measured is an upper bound. Needs no discord.py: the bot side used is ``bot.queue`` and ``bot.redis_engine``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests" / "support")]

import mgie_bench as mb  # noqa: E402
import torch  # noqa: E402
from full_size import build  # noqa: E402
from redis_server import RedisServer  # noqa: E402

from mgie_engine.protocol import WorkerState  # noqa: E402
from mgie_engine.redis_pool.connection import RedisSettings, client  # noqa: E402
from mgie_engine.settings import EngineSettings  # noqa: E402
from mgie_engine.worker import LocalWorker  # noqa: E402

HOP_MS_GOAL, HOP_PCT_GOAL, BURST_RATIO_GOAL = 30.0, 3.0, 0.95


class SharedWorker:
    """The benchmark's started LocalWorker as the WorkerService sees it: ``start`` and ``shutdown`` belong to
    the benchmark (the in-process path uses the same worker), everything else is the worker's own."""

    def __init__(self, worker: LocalWorker) -> None:
        self._worker = worker

    def __getattr__(self, name: str):
        return getattr(self._worker, name)

    def start(self) -> None:
        """Already started by the benchmark."""

    def shutdown(self) -> None:
        """The benchmark shuts the worker down once both paths are measured."""


class WorkerServiceThread:
    """The mgie-worker side (``mgie_engine.redis_pool.service``, as ``cli._serve`` builds it) on its own
    thread and event loop, around the shared LocalWorker."""

    def __init__(self, worker: LocalWorker, settings: RedisSettings) -> None:
        self.worker, self.settings = worker, settings
        self.code: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._up = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="hop-mgie-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._up.wait(30)

    async def _serve(self) -> None:
        from mgie_engine.redis_pool.service import WorkerService, consumer_name
        from mgie_engine.redis_pool.streams import StreamProtocol

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._up.set()
        conn = client(self.settings)
        device = self.worker.settings.device
        try:
            service = WorkerService(SharedWorker(self.worker), StreamProtocol(conn, self.settings),
                                    consumer_name(device))
            self.code = await service.run(self._stop, grace=10.0)
        finally:
            await conn.aclose()

    def stop(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


_next_id = 1


async def edits(path: list, items: list[dict], steps: int, outcomes: list | None = None) -> float:
    """``mgie_bench.burst`` with job ids never used before in this run: the Redis pool would answer a repeated
    id with the result it already has, without any GPU work."""
    global _next_id
    first, _next_id = _next_id, _next_id + len(items)
    return await mb.burst(path, items, steps, outcomes, first_id=first)


async def same_result(paths: dict[str, list], it: dict, steps: int) -> dict:
    """One edit through each path, same inputs: the pixels must match (the same GPU work), and a result that
    did not come from the worker would not."""
    import io

    import numpy as np
    import PIL.Image

    outcomes: list = []
    for path in paths.values():
        await edits(path, [it], steps, outcomes)
    a, b = (np.asarray(PIL.Image.open(io.BytesIO(o.png)).convert("RGB")).astype(int) for o in outcomes)
    diff = np.abs(a - b)
    return {"same_png": outcomes[0].png == outcomes[1].png, "max_pixel_diff": int(diff.max()),
            "mean_pixel_diff": float(diff.mean()), "shape": list(a.shape)}


async def lone_edits(paths: dict[str, list], first_item: int, runs: int, steps: int) -> dict[str, list[float]]:
    """``runs`` single edits per path, one at a time, alternating which path goes first; seconds each."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            # Fresh images (no cache hit); path k's i-th edit has the i-th instruction on every path.
            it = mb.item(first_item + 100 * names.index(name) + i)
            times[name].append(await edits(paths[name], [it], steps))
    return times


async def measure(worker: LocalWorker, server: RedisServer, args, report: dict, save) -> None:
    from bot.redis_engine import RedisPool

    t0 = time.perf_counter()
    if await worker.wait_ready() is not WorkerState.READY:
        raise RuntimeError(f"the worker did not load: {worker.error}")
    report["worker_load_seconds"] = time.perf_counter() - t0
    print(f"worker ready in {report['worker_load_seconds']:.0f} s", flush=True)
    settings = RedisSettings(url=server.url, prefix="hopbench")
    conn = client(settings)
    try:
        report["versions"]["redis_server"] = (await conn.info("server"))["redis_version"]
    finally:
        await conn.aclose()
    service = WorkerServiceThread(worker, settings)
    service.start()
    pool = RedisPool(settings)
    pool.start()
    try:
        deadline = time.monotonic() + 60
        while pool.capacity < worker.capacity:  # the worker's first heartbeat, read by the pool's watch loop
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis pool saw capacity {pool.capacity}, not {worker.capacity}")
            await asyncio.sleep(0.05)
        paths = {"in_process": [worker], "redis": pool.workers}

        t0 = time.perf_counter()
        for k, name in enumerate(paths):  # burst shapes (a few steps), then one full edit per path
            await edits(paths[name], [mb.item(400 + 100 * k + i) for i in range(args.burst)], min(3, args.steps))
        report["same_result"] = await same_result(paths, mb.item(900), args.steps)
        print("same edit on both paths", report["same_result"], flush=True)
        report["warmup_seconds"] = time.perf_counter() - t0
        print(f"warm-up: {report['warmup_seconds']:.1f} s", flush=True)

        lone = await lone_edits(paths, 600, args.runs, args.steps)
        for name, times in lone.items():
            report[name] = {"latency_p50": mb.pct(times, 50), "latency_p90": mb.pct(times, 90), "runs": len(times),
                            "latencies": times}
        pairs = [r - i for r, i in zip(lone["redis"], lone["in_process"], strict=True)]
        base = report["in_process"]["latency_p50"]
        hop = report["redis"]["latency_p50"] - base
        report["hop"] = {"ms": hop * 1000, "pct": 100 * hop / base, "paired_median_ms": mb.pct(pairs, 50) * 1000}
        print("lone edits", {k: report[k]["latency_p50"] for k in paths}, "hop", report["hop"], flush=True)
        save()

        names, seconds = list(paths), {name: [] for name in paths}
        for r in range(args.burst_rounds):  # alternating which path goes first, as the lone edits do
            for name in names if r % 2 == 0 else names[::-1]:
                items = [mb.item(300 + 1000 * names.index(name) + 100 * r + i) for i in range(args.burst)]
                seconds[name].append(await edits(paths[name], items, args.steps))
                edits_total = args.burst * len(seconds[name])
                report[name]["burst"] = {"edits": args.burst, "rounds": len(seconds[name]), "seconds": seconds[name],
                                         "edits_per_second": edits_total / sum(seconds[name])}
                print(f"burst {name}", report[name]["burst"], flush=True)
                save()
        report["burst_ratio"] = (report["redis"]["burst"]["edits_per_second"]
                                 / report["in_process"]["burst"]["edits_per_second"])
        report["reconnects"] = pool.reconnects
    finally:
        pool.shutdown()
        await asyncio.sleep(0.2)  # the pool's connection closes on this loop
        await asyncio.to_thread(service.stop)


def goals(report: dict) -> dict:
    hop = report["hop"]
    return {"hop_at_most_30ms": hop["ms"] <= HOP_MS_GOAL, "hop_at_most_3pct": hop["pct"] <= HOP_PCT_GOAL,
            "hop_met": hop["ms"] <= HOP_MS_GOAL or hop["pct"] <= HOP_PCT_GOAL,
            "burst_within_5pct": report["burst_ratio"] >= BURST_RATIO_GOAL}


def print_table(r: dict) -> None:
    print(f"\n{r['card']}, {r['steps']} steps, {r['side']} px, {'compiled' if r['compile'] else 'uncompiled'}, "
          f"Redis {r['versions'].get('redis_server')}")
    burst = f"burst of {r['burst_edits']} (edits/s)"
    print(f"{'path':<12} {'lone p50 (s)':>13} {'lone p90 (s)':>13} {burst:>24}")
    for name in ("in_process", "redis"):
        p = r[name]
        print(f"{name:<12} {p['latency_p50']:>13.3f} {p['latency_p90']:>13.3f} {p['burst']['edits_per_second']:>24.3f}")
    g = r["goals"]
    print(f"hop: {r['hop']['ms']:.1f} ms ({r['hop']['pct']:.2f}%), paired median {r['hop']['paired_median_ms']:.1f} ms"
          f"  -> goal (<= {HOP_MS_GOAL:.0f} ms or {HOP_PCT_GOAL:.0f}%) {'met' if g['hop_met'] else 'NOT met'}")
    print(f"burst through Redis / in-process: {r['burst_ratio']:.3f}"
          f"  -> goal (>= {BURST_RATIO_GOAL}) {'met' if g['burst_within_5pct'] else 'NOT met'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-dir", type=Path, required=True)
    p.add_argument("--redis-server", default="redis-server", help="the redis-server binary (default: on PATH)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps per edit (default 100; 4 with --small)")
    p.add_argument("--runs", type=int, default=None, help="lone edits per path (default 8; 3 with --small)")
    p.add_argument("--burst", type=int, default=None, help="edits in each burst (default 32; 4 with --small)")
    p.add_argument("--burst-rounds", type=int, default=1,
                   help="bursts per path, alternating which goes first (each ~40 s uncompiled on an H200)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--home-warm-up", action="store_true",
                   help="with --compile: the worker warms up the home shape only (a whole warm-up takes minutes)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--small", action="store_true", help="shrunken dims, 64 px: a dry run of the script on a CPU")
    args = p.parse_args()
    small = args.small
    args.steps = args.steps or (4 if small else 100)
    args.runs = args.runs or (3 if small else 8)
    args.burst = args.burst or (4 if small else 32)
    if small:
        mb.SIDE = 64
    if args.home_warm_up:
        mb.warm_up_home_shape_only()
    started = time.perf_counter()

    import redis
    import transformers

    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    t0 = time.perf_counter()
    models = build(device, dtype, args.tokenizer_dir, small=small)
    print(f"built the {'shrunken' if small else 'full-size'} models in {time.perf_counter() - t0:.0f} s", flush=True)
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    report: dict = {"card": card, "steps": args.steps, "side": mb.SIDE, "compile": args.compile, "small": small,
                    "burst_edits": args.burst, "complete": False,
                    "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "versions": {"torch": torch.__version__, "python": platform.python_version(),
                                 "transformers": transformers.__version__,
                                 "diffusers": __import__("diffusers").__version__, "redis-py": redis.__version__,
                                 "redis_server_binary": _binary_version(args.redis_server)}}
    tag = f"{'-compiled' if args.compile else ''}{'-small' if small else ''}"
    out_path = args.out / f"{card.replace(' ', '_')}-redis-hop{tag}.json"

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")

    worker = LocalWorker(EngineSettings(device=str(device), max_side=mb.SIDE, compile=args.compile), name=str(device),
                         loader=lambda _s: models, max_batch=args.burst)
    worker.start()
    with tempfile.TemporaryDirectory(prefix="redis-hop-") as tmp:
        # Popen inherits this environment: an LD_LIBRARY_PATH for an unpacked redis-server passes through as is.
        server = RedisServer(Path(tmp) / "redis", binary=args.redis_server)
        try:
            server.start()
            asyncio.run(measure(worker, server, args, report, save))
        finally:
            server.stop()
            worker.shutdown()
            worker.join(60)
    report["goals"] = goals(report)
    report["total_seconds"] = time.perf_counter() - started
    report["complete"] = True
    save()
    print_table(report)
    print(f"total {report['total_seconds']:.0f} s; wrote {out_path}")
    return 0


def _binary_version(binary: str) -> str:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except OSError as err:
        return f"unavailable ({err})"
    return done.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
