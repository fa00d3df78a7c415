"""MGIE speed benchmark: the reference flow and the engine, same inputs, same process, on the GPU.

    python bench/mgie_bench.py --tokenizer-dir DIR [--gpus N] [--compile] [--out bench/results]

Prints one table (latency p50/p90, 32-edit burst throughput, refine latency, peak memory, ratios
against the reference, fraction of the physical floor) and writes the same numbers as JSON with the
card's name and library versions. The reference flow is the one the parity test keeps
(tests/support/reference.py: stock generate + diffusers' StableDiffusionInstructPix2PixPipeline).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]

from full_size import build  # noqa: E402

from mgie_engine.inputs import Prompt  # noqa: E402
from mgie_engine.pipeline import EditRequest, MgiePipeline  # noqa: E402
from mgie_engine.protocol import EditJob  # noqa: E402
from mgie_engine.worker import LocalWorker  # noqa: E402

INSTRUCTIONS = ["make the frame red", "turn the day into night", "give him a beard", "make cottage a mansion",
                "remove yellow object from dogs paws", "change the hair from red to blue", "remove the text",
                "increase the image contrast", "remove the people in the background", "make more brightness"]
UNET_TFLOP_PER_CALL_B3 = 2.41  # one 64x64 UNet call at batch 3 (the issue's count)
PEAK_BF16_TFLOPS = 790.0  # measured matrix rate class of H100/H200 here (device notes)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


SIDE = 512  # the demo's size; a dry run on a CPU (--small) uses 64 px: the same code paths, a fraction of the time


def image(seed: int, size: int | None = None) -> PIL.Image.Image:
    size = size or SIDE
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x / size, y / size, (x + y) / (2 * size)], -1) * 200 + rng.normal(0, 20, (size, size, 3))
    return PIL.Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def item(i: int) -> dict:
    return {"image": image(i), "instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)], "seed": 1000 + i,
            "text_cfg": [7.5, 7.0, 8.5, 8.0][i % 4], "image_cfg": [1.5, 2.0, 1.2, 1.6][i % 4]}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def run_reference(models, items: list[dict], steps: int) -> tuple[list[float], list]:
    """The reference flow per edit, end to end as a user gets it: the uploaded PNG decoded, the edit, the
    result encoded as PNG (the same codec calls as the engine's, so both pay the same for them)."""
    from reference import reference_edit

    from mgie_engine.images import load_image
    from mgie_engine.png import encode_png

    times, outs = [], []
    for it in items:
        data = encode(it["image"])
        sync()
        start = time.perf_counter()
        out = reference_edit(models, load_image(data), it["instruction"], it["seed"], it["text_cfg"], it["image_cfg"],
                             steps)
        sync()
        encode_png(out.image)
        times.append(time.perf_counter() - start)
        outs.append(out)
    return times, outs


def run_engine(pipe: MgiePipeline, items: list[dict], steps: int) -> tuple[list[float], list]:
    """The engine's pipeline per edit, in this thread, end to end as ``run_reference`` (no queue or worker:
    ``worker_latency`` adds those)."""
    from mgie_engine.images import load_image
    from mgie_engine.png import encode_png

    times, outs = [], []
    for it in items:
        data = encode(it["image"])
        sync()
        start = time.perf_counter()
        result = pipe(EditRequest(image=load_image(data), instruction=it["instruction"], seed=it["seed"],
                                  text_cfg=it["text_cfg"], image_cfg=it["image_cfg"], steps=steps))
        encode_png(result.image)
        times.append(time.perf_counter() - start)
        outs.append(result)
    return times, outs


def warm_up_home_shape_only() -> None:
    """Make every warm-up from here on compile only the home shape (guided max-side squares): the static
    kernels a square edit or a burst of squares runs on, without the minutes the other classes take."""
    import mgie_engine.warm_up as warm_up_module

    every_class = warm_up_module.warm_up_batches
    warm_up_module.warm_up_batches = lambda side, jobs: [b for b in every_class(side, jobs)
                                                         if b[1] == (side, side) and b[2]]


def encode(img: PIL.Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


async def burst(workers: list[LocalWorker], items: list[dict], steps: int, outcomes: list | None = None) -> float:
    """All jobs submitted at once through the bot's fair queue; wall time until the last result (whose
    outcomes, in submission order, are added to ``outcomes`` if given)."""
    from bot.queue import JobQueue

    done = asyncio.Event()
    finished = []

    def on_event(event) -> None:
        if event.kind in ("done", "failed", "cancelled"):
            finished.append(event)
            if event.kind != "done":
                print("burst job", event.kind, event.error)
            if len(finished) == len(items):
                done.set()

    queue = JobQueue(workers, on_event=on_event, max_total=len(items) + 1)
    queue.start()
    await queue.all_ready()
    jobs = [EditJob(job_id=f"{i:032x}", image=encode(it["image"]), instruction=it["instruction"], seed=it["seed"],
                    text_cfg=it["text_cfg"], image_cfg=it["image_cfg"], steps=steps) for i, it in enumerate(items)]
    start = time.perf_counter()
    for i, job in enumerate(jobs):
        queue.submit(job, user_id=i)
    await done.wait()
    elapsed = time.perf_counter() - start
    await queue.stop()
    failed = [e for e in finished if e.kind != "done"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(items)} burst jobs did not finish: {failed[0].error}")
    if outcomes is not None:
        outcomes += [e.outcome for e in sorted(finished, key=lambda e: e.job_id)]
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ref-runs", type=int, default=5)
    p.add_argument("--lat-runs", type=int, default=8)
    p.add_argument("--burst", type=int, default=32)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--only-burst", action="store_true", help="skip latency, refine and parity (multi-GPU scaling runs)")
    p.add_argument("--skip-burst", action="store_true", help="latency, refine and parity only (a call's time limit)")
    p.add_argument("--home-warm-up", action="store_true",
                   help="the pipeline and burst workers warm up the home shape only (the static kernels a square "
                        "edit and the burst run on; a whole warm-up of every shape class outlasts a device call)")
    p.add_argument("--worker-latency", type=int, default=0, metavar="N",
                   help="before the burst, time N single edits through the queue and the burst's worker")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--offload", action="store_true",
                   help="MGIE_OFFLOAD (the LLM and UNet/VAE take turns on the GPU): latency and peak memory only")
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="cap this process's GPU memory, to stand in for a smaller card (e.g. 15 for a 16 GB one)")
    p.add_argument("--small", action="store_true", help="shrunken dims, for a dry run of the script on a CPU")
    args = p.parse_args()
    global SIDE
    if args.small:
        SIDE = 64

    cuda = torch.cuda.is_available()
    dtype = torch.float16 if cuda else torch.float32
    devices = [torch.device(f"cuda:{i}") if cuda else torch.device("cpu") for i in range(args.gpus)]
    t0 = time.perf_counter()
    models = [build(d, dtype, args.tokenizer_dir, small=args.small) for d in devices]
    print(f"built {len(models)} full-size model set(s) in {time.perf_counter() - t0:.0f} s", flush=True)
    m0 = models[0]
    report: dict = {"card": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": args.gpus, "steps": args.steps,
                    "compile": args.compile, "versions": {
                        "torch": torch.__version__, "python": platform.python_version(),
                        **{name: __import__(name).__version__ for name in ("transformers", "diffusers")}}}

    tag = (f"{'-compiled' if args.compile else ''}{'-offload' if args.offload else ''}"
           f"{'-burst' if args.only_burst else ''}")
    out_path = args.out / f"{report['card'].replace(' ', '_')}-x{args.gpus}{tag}.json"

    def save() -> None:
        """After every section: a run cut short by its time limit still leaves what it measured."""
        args.out.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")

    report["complete"] = False
    # 1. Reference flow, one edit after another.
    ref_items = [item(i) for i in range(args.ref_runs + 1)]
    if not args.skip_reference:
        run_reference(m0, ref_items[:1], args.steps)  # warm-up
        ref_times, ref_outs = run_reference(m0, ref_items[1:], args.steps)
        report["reference"] = {"latency_p50": pct(ref_times, 50), "latency_p90": pct(ref_times, 90),
                               "runs": len(ref_times), "new_tokens": len(ref_outs[0].new_token_ids)}
        print("reference", report["reference"], flush=True)
        save()

    if args.home_warm_up:  # every warm-up from here on: the home shape only
        warm_up_home_shape_only()
        report["warm_up"] = "home shape only"
    if not args.only_burst:
        # 2. Engine, one edit at a time (fresh images: no cache hits).
        pipe = MgiePipeline(m0, max_side=SIDE, compile_unet=args.compile, offload=args.offload)
        if cuda and args.memory_cap_gib:
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total)
            report["memory_cap_gib"] = args.memory_cap_gib
        if cuda:
            report["allocated_gib_after_setup"] = torch.cuda.memory_allocated() / 2**30
            print("allocated after setup (GiB)", report["allocated_gib_after_setup"], flush=True)
        warm = [item(100 + i) for i in range(2)]
        t0 = time.perf_counter()
        if pipe.compiles:  # as a worker does at load: after it the compiled shapes are symbolic
            pipe.warm_up()
        run_engine(pipe, warm, args.steps)
        report["warmup_seconds"] = time.perf_counter() - t0
        lat_items = [item(200 + i) for i in range(args.lat_runs)]
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        eng_times, eng_outs = run_engine(pipe, lat_items, args.steps)
        stages = {k: statistics.median(o.timings[k] for o in eng_outs) for k in eng_outs[0].timings}
        report["engine"] = {"latency_p50": pct(eng_times, 50), "latency_p90": pct(eng_times, 90), "runs": len(eng_times),
                            "stage_medians": stages, "new_tokens": len(pipe.guidance([Prompt(
                                pipe_image(pipe, lat_items[0]), lat_items[0]["instruction"])])[0][0].new_token_ids),
                            "peak_memory_gib_batch1": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                            "peak_reserved_gib_batch1": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0}
        print("engine", report["engine"], flush=True)
        save()

        # 3. Refine: same image and instruction, new seed / CFG; the LLM output comes from the cache.
        ref_it = dict(lat_items[0], seed=99)
        refine_times, _ = run_engine(pipe, [ref_it, dict(ref_it, seed=100, text_cfg=8.5)], args.steps)
        report["refine_latency_p50"] = statistics.median(refine_times)
        print("refine latency p50", report["refine_latency_p50"], flush=True)
        save()

        # 4. Parity at full size: the engine's image against the reference flow's, same inputs.
        if not args.skip_reference:
            _, ref_outs2 = run_reference(m0, [lat_items[0]], args.steps)
            diff = np.abs(np.asarray(eng_outs[0].image).astype(int) - np.asarray(ref_outs2[0].image).astype(int))
            report["parity"] = {"max_pixel_diff": int(diff.max()), "mean_pixel_diff": float(diff.mean()),
                                "same_tokens": _same_tokens(pipe, lat_items[0], ref_outs2[0])}
            print("parity", report["parity"], flush=True)
            save()

    if args.offload or args.skip_burst:  # a 16 GB card's question is latency and memory, not a 32-edit burst
        finish(report, args)
        save()
        print("wrote", out_path)
        return 0

    # 5. Burst: N edits at once, batched, across all GPUs.
    workers = []
    for dev, mod in zip(devices, models, strict=True):
        from mgie_engine.settings import EngineSettings

        w = LocalWorker(EngineSettings(device=str(dev), max_side=SIDE, compile=args.compile), name=str(dev),
                        loader=lambda _s, mod=mod: mod, max_batch=args.burst)
        w.start()
        workers.append(w)
    burst_items = [item(300 + i) for i in range(args.burst)]
    pools = [workers[:1], workers] if len(workers) > 1 else [workers]
    for pool in pools:
        t0 = time.perf_counter()
        asyncio.run(burst(pool, [item(400 + i) for i in range(args.burst)], 3))  # warm-up: compiles burst shapes
        warmup = time.perf_counter() - t0
        print(f"burst warm-up on {len(pool)} GPU(s): {warmup:.0f} s", flush=True)
        if len(pool) == 1 and args.worker_latency:
            # One edit at a time through the bot's queue and a worker that batches: what a user waits for,
            # from the uploaded PNG to the result's PNG.
            lone: list = []
            single = [asyncio.run(burst(pool, [item(600 + i)], args.steps, lone)) for i in range(args.worker_latency)]
            report["worker_latency"] = {"latency_p50": pct(single, 50), "latency_p90": pct(single, 90),
                                        "runs": len(single)}
            print("worker latency", report["worker_latency"], flush=True)
            if not args.skip_reference:  # the last lone edit replayed every recorded graph: same image as the reference?
                report["worker_parity"] = worker_parity(m0, item(600 + args.worker_latency - 1), lone[-1], args.steps)
                print("worker parity", report["worker_parity"], flush=True)
            save()
        clocks = [StageTimer(w.pipeline) for w in pool] if len(pool) == 1 else []
        elapsed = asyncio.run(burst(pool, burst_items, args.steps))
        key = "burst" if pool is workers else "burst_one_gpu"
        report[key] = {"edits": args.burst, "gpus": len(pool), "seconds": elapsed,
                       "edits_per_second": args.burst / elapsed, "warmup_seconds": warmup}
        if clocks:  # where the burst's wall time went, on the worker thread
            report[key]["stages"] = clocks[0].stop()
            report[key]["stages"]["outside_these"] = elapsed - sum(v["seconds"] for v in report[key]["stages"].values())
        if len(pool) > 1:  # the same jobs on each GPU alone, one after the other: is anything serializing?
            halves = [burst_items[i::len(pool)] for i in range(len(pool))]
            report[key]["each_gpu_alone_seconds"] = [asyncio.run(burst([w], half, args.steps))
                                                     for w, half in zip(pool, halves, strict=True)]
        print(key, report[key], flush=True)
        save()
    if "burst_one_gpu" in report:
        report["multi_gpu_scaling"] = report["burst"]["edits_per_second"] / report["burst_one_gpu"]["edits_per_second"]
    for w in workers:
        w.shutdown()

    finish(report, args)
    save()
    print("wrote", out_path)
    return 0


class StageTimer:
    """A breakdown of a burst: wraps a worker pipeline's batch methods and records CUDA events around each
    call, so the GPU time each method's work spanned is known afterwards without synchronizing (a
    synchronized breakdown made the GPU wait at every step while the worker's Python caught up: it slowed
    the very burst it timed). On a CPU, wall time. ``stop`` puts the methods back and returns calls and
    seconds per method."""

    METHODS = ("guidance", "start_denoising", "denoise_step", "decode_queued")

    def __init__(self, pipe: MgiePipeline) -> None:
        self.pipe, self.spans = pipe, {m: [] for m in self.METHODS}
        self.cuda = pipe.models.device.type == "cuda"
        for name in self.METHODS:
            setattr(pipe, name, self._timed(name, getattr(pipe, name)))

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _timed(self, name: str, fn):
        def run(*a, **kw):
            start = self._mark()
            try:
                return fn(*a, **kw)  # decode_queued: the decode's GPU work is queued by the time it returns
            finally:
                self.spans[name].append((start, self._mark()))
        return run

    def stop(self) -> dict:
        for name in self.METHODS:
            delattr(self.pipe, name)
        sync()
        seconds = (lambda a, b: a.elapsed_time(b) / 1000) if self.cuda else (lambda a, b: b - a)
        return {name: {"calls": len(spans), "seconds": sum(seconds(a, b) for a, b in spans)}
                for name, spans in self.spans.items()}


def finish(report: dict, args) -> None:
    """Ratios against the reference measured in this run, the physical floor, the table."""
    floor = args.steps * UNET_TFLOP_PER_CALL_B3 / PEAK_BF16_TFLOPS + 48 * 13.5 / 3000  # UNet math + reading weights
    report["floor_seconds"] = floor
    if "engine" in report:
        report["engine"]["floor_fraction"] = floor / report["engine"]["latency_p50"]
    if "reference" in report:
        ref = report["reference"]["latency_p50"]
        ratios = {}
        if "engine" in report:
            ratios["latency_speedup"] = ref / report["engine"]["latency_p50"]
            ratios["refine_speedup"] = ref / report["refine_latency_p50"]
        if "worker_latency" in report:
            ratios["worker_latency_speedup"] = ref / report["worker_latency"]["latency_p50"]
        if "burst" in report:
            ratios["throughput_vs_reference_sequential"] = report["burst"]["edits_per_second"] * ref
        report["ratios"] = ratios
    print_table(report)
    report["complete"] = True


def worker_parity(models, it: dict, outcome, steps: int) -> dict:
    """A worker's result (PNG) against the reference flow's image for the same job."""
    import io

    _, ref = run_reference(models, [it], steps)
    got = np.asarray(PIL.Image.open(io.BytesIO(outcome.png)).convert("RGB")).astype(int)
    diff = np.abs(got - np.asarray(ref[0].image).astype(int))
    return {"max_pixel_diff": int(diff.max()), "mean_pixel_diff": float(diff.mean()),
            "same_expressive_instruction": outcome.expressive_instruction == ref[0].expressive_instruction}


def _same_tokens(pipe: MgiePipeline, it: dict, ref) -> bool:
    """The engine stops at [IMG7]; up to there its tokens must be the reference's."""
    tokens = list(pipe.guidance([Prompt(pipe_image(pipe, it), it["instruction"])])[0][0].new_token_ids)
    return tokens == ref.new_token_ids[:len(tokens)]


def pipe_image(pipe: MgiePipeline, it: dict) -> PIL.Image.Image:
    from mgie_engine.images import prepare_image

    return prepare_image(it["image"], pipe.max_side, pipe.models.vae_scale_factor)


def print_table(r: dict) -> None:
    rows = [("card", f"{r['card']} x{r['gpus']}" + (" (compiled UNet)" if r["compile"] else ""))]
    if "multi_gpu_scaling" in r:
        rows += [("burst on 1 GPU (edits/s)", f"{r['burst_one_gpu']['edits_per_second']:.2f}"),
                 (f"burst on {r['gpus']} GPUs (edits/s)", f"{r['burst']['edits_per_second']:.2f}"),
                 ("multi-GPU scaling", f"{r['multi_gpu_scaling']:.2f}x")]
    if "engine" not in r:
        if "reference" in r:
            rows.append(("reference latency p50 (s)", f"{r['reference']['latency_p50']:.2f}"))
        if "worker_latency" in r:
            rows.append(("latency through the worker p50 / p90 (s)",
                         f"{r['worker_latency']['latency_p50']:.3f} / {r['worker_latency']['latency_p90']:.3f}"))
        if "burst" in r and "multi_gpu_scaling" not in r:
            rows.append((f"burst of {r['burst']['edits']} (edits/s)",
                         f"{r['burst']['edits_per_second']:.2f} ({r['burst']['seconds']:.1f} s)"))
        rows += [(k.replace("_", " "), f"{v:.2f}x") for k, v in r.get("ratios", {}).items()]
        for k, v in rows:
            print(f"{k:<40}  {v}")
        return
    if "reference" in r:
        rows.append(("reference latency p50 / p90 (s)",
                     f"{r['reference']['latency_p50']:.2f} / {r['reference']['latency_p90']:.2f}"))
    rows += [("engine latency p50 / p90 (s)", f"{r['engine']['latency_p50']:.2f} / {r['engine']['latency_p90']:.2f}"),
             ("engine stages (median s)", ", ".join(f"{k} {v:.2f}" for k, v in r["engine"]["stage_medians"].items())),
             ("refine latency p50 (s)", f"{r['refine_latency_p50']:.2f}")]
    if "burst" in r:
        rows.append((f"burst of {r['burst']['edits']} (edits/s)",
                     f"{r['burst']['edits_per_second']:.2f} ({r['burst']['seconds']:.1f} s)"))
    rows += [("peak GPU memory, batch 1 (GiB)", f"{r['engine']['peak_memory_gib_batch1']:.1f}"),
             ("physical floor (s) / fraction reached", f"{r['floor_seconds']:.2f} / {r['engine']['floor_fraction']:.2f}")]
    if "ratios" in r:
        rows += [(k.replace("_", " "), f"{v:.2f}x") for k, v in r["ratios"].items()]
    if "parity" in r:
        rows.append(("parity max / mean pixel diff", f"{r['parity']['max_pixel_diff']} / {r['parity']['mean_pixel_diff']:.3f}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    sys.exit(main())
