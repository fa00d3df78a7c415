"""Speed under real load: Poisson arrivals of mixed-size edits through the bot's queue, after the production warm-up.

    python bench/loadtest.py --tokenizer-dir DIR [--max-batch 8] [--loads 0.5,0.8] [--minutes 2]
                             [--capacity EDITS_PER_S] [--cache-dir /tmp/mgie-coldstart] [--out bench/results]

One in-process worker (``LocalWorker``, as ``mgie-bot`` runs it: ``EngineSettings.from_env()`` with
MGIE_MAX_BATCH, MGIE_COMPILE and the compile cache set by this script) on the full-size random models
(``full_size.build``, or ``--ckpt`` to load the full-size checkpoint from disk), started with ``start()`` so it
runs the production warm-up, whatever ``mgie_engine.lifecycle`` does; the run waits until the worker serves
in its final mode (see ``coldstart.final_mode``). Then, all through the bot's ``JobQueue``:

1. lone-edit latency: ``--lone`` edits at the home shape, one at a time;
2. burst capacity: ``--burst`` home-shape edits submitted at once, edits/s (or ``--capacity`` given); then as
   many at once of the sizes the loads draw (``capacity_mixed``: jobs of different sizes do not share a step, and
   at "50%" of the home-shape capacity an H200 served 0.51 of the 0.60 mixed edits/s offered);
3. per load in ``--loads`` (fractions of the home-shape capacity, or of the mixed one with ``--capacity-of
   mixed``): ``--minutes`` of Poisson arrivals, each edit from a
   new user, its size drawn from ``SIZES``; then the run drains. Reported: p50/p95/max end-to-end latency
   (submit to result), throughput, per-size latency, and dynamo's counters before and after (frames compiled:
   the goal is none during the run), plus the worker's own compile count where its info reports one.

``--deadline`` (seconds since start) cuts a run short with what it measured saved. ``--small`` dry-runs on a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests" / "support")]

from coldstart import _dynamo_counters, _jsonable, final_mode  # noqa: E402
from mgie_bench import INSTRUCTIONS, encode, image  # noqa: E402
from run_info import aot_suffix, run_info, save  # noqa: E402

# (width, height, weight) at a 512 home side: squares most often, then the usual photo shapes (a 640x480 upload
# is fitted to 512x384 by the worker), and small uploads.
SIZES = ((512, 512, 4), (512, 384, 2), (384, 512, 2), (640, 480, 2), (256, 256, 1), (320, 240, 1), (200, 304, 1))


def sized_image(seed: int, width: int, height: int):
    return image(seed, max(width, height)).crop((0, 0, width, height))


class Runner:
    """Submits edits through one JobQueue and records, per edit, submit and done times."""

    def __init__(self, queue, steps: int) -> None:
        self.queue, self.steps = queue, steps
        self.waiters: dict[str, tuple[asyncio.Future, float, str]] = {}
        self.records: list[dict] = []
        self.n = 0

    def on_event(self, event) -> None:
        if event.kind in ("done", "failed", "cancelled") and event.job_id in self.waiters:
            future, submitted, size = self.waiters.pop(event.job_id)
            done = time.perf_counter()
            record = {"submitted": submitted, "done": done, "latency": done - submitted, "size": size,
                      "ok": event.kind == "done", "error": event.error}
            self.records.append(record)
            future.set_result(record)

    def submit(self, width: int, height: int, user: int) -> asyncio.Future:
        self.n += 1
        job_id = uuid.uuid4().hex
        from mgie_engine.protocol import EditJob

        job = EditJob(job_id=job_id, image=encode(sized_image(self.n, width, height)),
                      instruction=INSTRUCTIONS[self.n % len(INSTRUCTIONS)], seed=self.n, text_cfg=7.5, image_cfg=1.5,
                      steps=self.steps)
        future = asyncio.get_running_loop().create_future()
        self.waiters[job_id] = (future, time.perf_counter(), f"{width}x{height}")
        self.queue.submit(job, user_id=user)
        return future


def latency_stats(records: list[dict]) -> dict:
    ok = [r["latency"] for r in records if r["ok"]]
    if not ok:
        return {"edits": len(records), "ok": 0}
    return {"edits": len(records), "ok": len(ok), "p50_s": float(np.percentile(ok, 50)),
            "p95_s": float(np.percentile(ok, 95)), "max_s": max(ok), "mean_s": statistics.fmean(ok)}


def counter_delta(before: dict, after: dict) -> dict:
    out = {}
    for group, values in after.items():
        for key, value in values.items():
            diff = value - before.get(group, {}).get(key, 0)
            if diff:
                out[f"{group}.{key}"] = diff
    return out


def worker_compiles(info: dict) -> dict:
    """The numeric fields of the worker's info that count compiles and CUDA-graph recordings during service."""
    return {k: v for k, v in info.items() if ("compile" in k or "recording" in k) and isinstance(v, int | float)
            and not isinstance(v, bool)}


def mixed_sizes(count: int, scale: float, rng: random.Random | None = None) -> list[tuple[int, int]]:
    """``count`` (width, height) drawn from ``SIZES`` by weight, scaled to the home side (``scale`` = side / 512)."""
    rng = rng or random.Random(99)
    picks = rng.choices(SIZES, [w for _, _, w in SIZES], k=count)
    return [(max(8, int(width * scale)), max(8, int(height * scale))) for width, height, _ in picks]


async def poisson_run(runner: Runner, rate: float, seconds: float, scale: float, seed: int, drain: float,
                      progress: Callable[[dict], None] = lambda _partial: None, progress_every: float = 15.0) -> dict:
    """Arrivals at ``rate`` edits/s for ``seconds``, then wait (up to ``drain`` s) for the last results.
    ``progress`` gets what is known so far every ``progress_every`` s of arrivals (a run that dies midway
    still leaves its first latencies in the JSON)."""
    rng = random.Random(seed)
    futures, started = [], time.perf_counter()
    first = len(runner.records)
    at = rng.expovariate(rate)
    reported = started
    while at < seconds:
        await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
        width, height = mixed_sizes(1, scale, rng)[0]
        futures.append(runner.submit(width, height, user=1000 + len(futures)))
        at += rng.expovariate(rate)
        if time.perf_counter() - reported > progress_every:
            reported = time.perf_counter()
            progress({"partial": True, "seconds": reported - started, "submitted": len(futures),
                      "latencies": [round(r["latency"], 3) for r in runner.records[first:]]})
    arrivals_end = time.perf_counter()
    done, pending = await asyncio.wait(futures, timeout=drain) if futures else (set(), set())
    records = [r for r in runner.records[first:]]
    span = (max(r["done"] for r in records) - started) if records else 0.0
    by_size = {}
    for size in sorted({r["size"] for r in records}):
        by_size[size] = latency_stats([r for r in records if r["size"] == size])
    return {"rate_per_s": rate, "arrival_seconds": arrivals_end - started, "submitted": len(futures),
            "unfinished": len(pending), "throughput_per_s": len([r for r in records if r["ok"]]) / span if span else 0.0,
            **latency_stats(records), "by_size": by_size,
            "latencies": [round(r["latency"], 3) for r in records]}


async def run(args: argparse.Namespace, report: dict, out_name: str) -> None:
    import torch

    from bot.queue import JobQueue
    from mgie_engine.settings import EngineSettings
    from mgie_engine.worker import LocalWorker

    t0 = time.perf_counter()
    settings = EngineSettings.from_env()
    loader = None
    if args.ckpt is None:
        from full_size import build

        models = build(settings.torch_device(), settings.torch_dtype(), args.tokenizer_dir, small=args.small)
        loader = lambda _s: models  # noqa: E731 - the worker's loader hook, as bench/mgie_bench.py uses it
    worker = LocalWorker(settings, name="loadtest", loader=loader)
    worker.start()
    runner = Runner(None, args.steps)
    queue = JobQueue([worker], on_event=runner.on_event, max_total=100_000)
    runner.queue = queue
    queue.start()
    deadline = t0 + args.deadline
    await worker.wait_ready()
    while not final_mode(worker.info(), worker.state.value):  # polled no faster than the bot's status might
        if worker.state.value == "failed":
            raise RuntimeError(f"the worker failed to start: {worker.error}")
        if time.perf_counter() > deadline:
            raise RuntimeError("the worker did not reach its final mode before --deadline")
        await asyncio.sleep(1.0)
    report["warm_up_seconds"] = time.perf_counter() - t0
    report["worker_info_after_warm_up"] = _jsonable(worker.info())
    print(f"worker serving in {report['warm_up_seconds']:.0f} s: {worker.info()}", flush=True)
    save(report, args.out, out_name)

    side = args.side
    lone = []
    for _ in range(args.lone):
        lone.append(await runner.submit(side, side, user=1))
    report["lone"] = latency_stats(lone)
    print("lone edits", report["lone"], flush=True)

    scale = side / 512
    if args.capacity:
        report["capacity"] = {"edits_per_s": args.capacity, "measured": False}
    else:
        for key, sizes in (("capacity", [(side, side)] * args.burst), ("capacity_mixed", mixed_sizes(args.burst, scale))):
            started = time.perf_counter()
            burst = await asyncio.gather(*[runner.submit(w, h, user=100 + i) for i, (w, h) in enumerate(sizes)])
            seconds = time.perf_counter() - started
            report[key] = {"edits_per_s": args.burst / seconds, "measured": True, "burst": args.burst,
                           "seconds": seconds, **latency_stats(burst)}
            print(key, report[key], flush=True)
    save(report, args.out, out_name)
    base = report["capacity_mixed" if args.capacity_of == "mixed" and "capacity_mixed" in report else "capacity"]

    report["loads"] = {}
    for k, fraction in enumerate(float(f) for f in args.loads.split(",")):
        left = deadline - time.perf_counter()
        seconds = min(args.minutes * 60, left - args.drain - 5)
        if seconds < min(20.0, args.minutes * 60):
            print(f"load {fraction}: skipped, {left:.0f} s left before --deadline", flush=True)
            report["loads"][str(fraction)] = {"skipped": "deadline"}
            continue
        rate = fraction * base["edits_per_s"]
        print(f"load {fraction}: {rate:.3f} edits/s for {seconds:.0f} s", flush=True)
        before, info_before = _dynamo_counters(), worker_compiles(worker.info())

        def progress(partial: dict, fraction: float = fraction) -> None:
            report["loads"][str(fraction)] = partial
            save(report, args.out, out_name)

        result = await poisson_run(runner, rate, seconds, scale, seed=k, drain=args.drain, progress=progress,
                                   progress_every=args.progress_every)
        after, info_after = _dynamo_counters(), worker_compiles(worker.info())
        result["dynamo_delta"] = counter_delta(before, after)
        result["compiles"] = result["dynamo_delta"].get("stats.unique_graphs", 0)
        result["frames_compiled"] = result["dynamo_delta"].get("frames.ok", 0)
        result["worker_compiles_delta"] = {k: info_after[k] - info_before.get(k, 0) for k in info_after}
        result["p95_over_lone_p50"] = (result["p95_s"] / report["lone"]["p50_s"]
                                       if result.get("p95_s") and report["lone"].get("p50_s") else None)
        result["load_fraction"] = fraction
        report["loads"][str(fraction)] = result
        print(f"load {fraction}: " + ", ".join(f"{key} {result[key]}" for key in (
            "submitted", "unfinished", "p50_s", "p95_s", "throughput_per_s", "compiles", "frames_compiled",
            "p95_over_lone_p50") if key in result), flush=True)
        save(report, args.out, out_name)
    report["worker_info_at_end"] = _jsonable(worker.info())
    report["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    await queue.stop()
    worker.shutdown()
    worker.join(30)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer-dir", type=Path, help="for the in-memory models (full_size.build)")
    p.add_argument("--ckpt", type=Path, default=None, help="load this full-size checkpoint from disk instead "
                                                           "(written first by write_full_size.py if missing)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--loads", default="0.5,0.8", help="fractions of the burst capacity")
    p.add_argument("--minutes", type=float, default=2.0, help="of arrivals per load")
    p.add_argument("--capacity", type=float, default=None, help="edits/s; skips the burst measurement")
    p.add_argument("--burst", type=int, default=32)
    p.add_argument("--capacity-of", choices=("home", "mixed"), default="home",
                   help="the loads' fractions are of the home-shape burst's capacity, or of the mixed sizes' burst")
    p.add_argument("--lone", type=int, default=3)
    p.add_argument("--drain", type=float, default=90.0, help="seconds to wait for the last edits after arrivals end")
    p.add_argument("--compile", default=None, help="MGIE_COMPILE for the worker (default: 1 on CUDA, 0 on a CPU)")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/mgie-coldstart"),
                   help="compile cache and data folder (coldstart.py's default: its kernels are reused)")
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--deadline", type=float, default=570.0, help="seconds from start; then it stops, results saved")
    p.add_argument("--progress-every", type=float, default=15.0, help="seconds between partial saves during a load")
    p.add_argument("--small", action="store_true", help="shrunken dims on a CPU, for a dry run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    faulthandler.enable()  # a native crash prints every thread's Python stack (an H200 run once died silently)
    # the engine's own lines (warm-up, saved steps, failures) in the log, as coldstart.py's child prints them
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    if args.compile is None:
        args.compile = "1" if torch.cuda.is_available() and not args.small else "0"
    if args.ckpt is not None:
        from write_full_size import ensure_full_size

        os.environ.update(ensure_full_size(args.ckpt, args.small, args.tokenizer_dir).env())
    elif args.tokenizer_dir is None:
        p.error("give --tokenizer-dir (in-memory models) or --ckpt (a checkpoint on disk)")
    os.environ.update({"MGIE_MAX_BATCH": str(args.max_batch), "MGIE_MAX_SIDE": str(args.side),
                       "MGIE_COMPILE": args.compile, "MGIE_COMPILE_CACHE_DIR": str(args.cache_dir / "compile"),
                       "MGIE_DATA_DIR": str(args.cache_dir / "data")})
    if args.small:
        os.environ["MGIE_DEVICE"] = "cpu"
    report = run_info(max_batch=args.max_batch, loads=args.loads, capacity_of=args.capacity_of, minutes=args.minutes,
                      burst=args.burst,
                      lone=args.lone, compile=args.compile, side=args.side, steps=args.steps, sizes=SIZES,
                      models="checkpoint " + str(args.ckpt) if args.ckpt else "full_size.build (in memory)",
                      cache_dir=str(args.cache_dir), small=args.small)
    report["complete"] = False
    name = f"loadtest-b{args.max_batch}" + aot_suffix() + ("-small" if args.small else "")
    asyncio.run(run(args, report, name))
    report["complete"] = all("skipped" not in r for r in report["loads"].values())
    print("wrote", save(report, args.out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
