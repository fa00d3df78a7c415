"""What live previews cost an edit: the same edits through one worker with and without previews, same run.

    python bench/preview_cost.py --tokenizer-dir DIR [--steps 100] [--runs 6] [--compile] [--out bench/results]

Edits alternate (off, on, off, on, ...) so drift hits both alike; prints the median edit time each way and
their ratio, at the default interval (MGIE_PREVIEW_SECONDS, 3 s) and at a stress interval, plus the direct
GPU time of one preview (latents -> RGB -> host) timed with CUDA events, and what that makes of an edit.
The issue's budget is 1% of an edit. Full-size random weights (bench/full_size.py); ``--small`` dry-runs on
a CPU (numbers meaningless, the script's sections checked by tests/test_bench_scripts.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests" / "support")]

from full_size import build  # noqa: E402
from mgie_bench import encode, image  # noqa: E402

from mgie_engine.previews import DEFAULT_PREVIEW_SECONDS, encode_preview, start_preview  # noqa: E402
from mgie_engine.protocol import EditJob  # noqa: E402
from mgie_engine.settings import EngineSettings  # noqa: E402
from mgie_engine.worker import LocalWorker  # noqa: E402


async def one_edit(worker: LocalWorker, job: EditJob) -> tuple[float, int]:
    """Wall time of one edit through the worker, and how many previews it sent."""
    previews = []
    start = time.perf_counter()
    await worker.run(job, lambda p: previews.append(p) if p.preview else None)
    return time.perf_counter() - start, len(previews)


def preview_gpu_ms(latents: torch.Tensor, runs: int = 200) -> float:
    """Median GPU time of one preview, queued behind nothing: resize, 4x3 map, copy to the host."""
    times = []
    for _ in range(runs):
        if latents.is_cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            pending = start_preview(latents, 2.0)
            end.record()
            pending.wait()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            start_preview(latents, 2.0).wait()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--runs", type=int, default=6, help="edits each way per interval")
    p.add_argument("--stress-interval", type=float, default=0.25, help="a preview every this many seconds")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--small", action="store_true", help="shrunken dims, for a dry run of the script on a CPU")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    side = 64 if args.small else 512
    models = build(device, dtype, args.tokenizer_dir, small=args.small)
    worker = LocalWorker(EngineSettings(device=str(device), max_side=side, compile=args.compile),
                         name=str(device), loader=lambda _s: models, max_batch=1)
    worker.start()
    state = asyncio.run(worker.wait_ready())
    if worker.error:
        raise SystemExit(f"worker failed to load: {worker.error}")
    print(f"worker {state.value} on {device}", flush=True)
    data = encode(image(0, side))

    def job(i: int, previews: bool) -> EditJob:
        # One instruction and seed for all (the language stage is cached after the first, as for re-rolls):
        # the two arms differ only in the previews.
        return EditJob(job_id=f"{i:032x}", image=data, instruction="make the frame red", seed=1000,
                       text_cfg=7.5, image_cfg=1.5, steps=args.steps, previews=previews)

    report: dict = {"card": torch.cuda.get_device_name(0) if cuda else "cpu", "steps": args.steps,
                    "compile": args.compile, "side": side, "intervals": {}}

    async def measure() -> None:
        counter = 0
        for interval in (DEFAULT_PREVIEW_SECONDS, args.stress_interval):
            worker.settings = dataclasses.replace(worker.settings, preview_seconds=interval)
            for previews in (False, True):  # warm-up, each way
                counter += 1
                await one_edit(worker, job(counter, previews))
            off, on, sent = [], [], []
            for _ in range(args.runs):
                for previews in (False, True):
                    counter += 1
                    seconds, count = await one_edit(worker, job(counter, previews))
                    (on if previews else off).append(seconds)
                    if previews:
                        sent.append(count)
            med_off, med_on = statistics.median(off), statistics.median(on)
            report["intervals"][str(interval)] = {
                "edit_s_without": med_off, "edit_s_with": med_on, "ratio": med_on / med_off,
                "previews_per_edit": statistics.mean(sent), "runs": args.runs}
            print(f"interval {interval:g} s: edit {med_off:.3f} s without, {med_on:.3f} s with previews "
                  f"(ratio {med_on / med_off:.4f}, {statistics.mean(sent):.1f} previews an edit)", flush=True)

    try:
        asyncio.run(measure())
    finally:
        worker.shutdown()
        worker.join(30)

    latent_side = side // models.vae_scale_factor
    latents = torch.randn(1, 4, latent_side, latent_side, device=device, dtype=dtype)
    gpu_ms = preview_gpu_ms(latents)
    pixels = start_preview(latents).wait()
    t0 = time.perf_counter()
    jpeg = encode_preview(pixels)
    encode_ms = (time.perf_counter() - t0) * 1000
    default = report["intervals"][str(DEFAULT_PREVIEW_SECONDS)]
    fraction = default["previews_per_edit"] * gpu_ms / 1000 / default["edit_s_without"]
    report.update(preview_gpu_ms=gpu_ms, preview_encode_ms_cpu=encode_ms, preview_bytes=len(jpeg),
                  gpu_fraction_of_an_edit=fraction)
    print(f"one preview: {gpu_ms:.3f} ms on the device (resize + 4x3 map + copy), {encode_ms:.2f} ms JPEG on a "
          f"CPU thread, {len(jpeg)} bytes; at {DEFAULT_PREVIEW_SECONDS:g} s: {fraction * 100:.4f}% of an edit's "
          f"GPU time; measured ratio {default['ratio']:.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"preview-cost-{report['card'].replace(' ', '_')}{'-compiled' if args.compile else ''}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
