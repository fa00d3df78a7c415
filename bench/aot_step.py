"""The home-shape step compiled ahead of time and loaded, against torch.compile on a warm cache: what a warm
restart could pay per class of shape instead of re-tracing it (issue 20, "short warm restarts").

    python bench/aot_step.py [--ckpt /tmp/mgie-full] [--jobs 1] [--side 512] [--work /tmp/mgie-aot]
                             [--out bench/results] [--small]

The static guided step (``denoiser.guided_euler_ancestral_step`` on the full-size UNet at a ``--side`` square,
``--jobs`` jobs, ``STATIC_STEP_OPTIONS``, static shapes), in four fresh processes that share one inductor cache:

- ``aot``: ``torch.compile(fullgraph=True).aot_compile`` and ``save_compiled_function`` (the UNet as external
  data; only tensor guards kept: module guards cannot be saved), on an empty cache;
- ``jit-first``: ``torch.compile`` as the worker compiles it, first call, on what ``aot`` left in the cache;
- ``load``: ``torch.compiler.load_compiled_function``: seconds to load (and to load again, without the one-time
  imports), the first call (CUDA graphs recorded on a GPU), the steady step;
- ``jit-warm``: ``torch.compile`` again, now on a warm cache: what a warm restart pays for this class today.

Prints and writes (JSON) each phase's seconds, the loaded step's latency against torch.compile's, and the largest
difference of their outputs from the eager step's. ``--small`` runs it on a CPU with the shrunken checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

PHASES = ("aot", "jit-first", "load", "jit-warm")
RESULT = "RESULT "  # a phase's one line of JSON on stdout
STEADY_CALLS = 20


def _phase(args: argparse.Namespace) -> dict:
    """One phase in this (fresh) process."""
    import torch

    from mgie_engine.compilation import STATIC_STEP_OPTIONS, always_pass_upsample_size
    from mgie_engine.denoiser import guided_euler_ancestral_step
    from mgie_engine.models import load_diffusion
    from mgie_engine.tiny import TinyPaths
    from mgie_engine.weight_copies import WeightCopier

    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.float16 if cuda else torch.float32
    paths = TinyPaths.under(args.ckpt)
    started = time.perf_counter()
    with WeightCopier(device, dtype) as copier:
        unet, *_ = load_diffusion(paths.ip2p, paths.mgie / "mgie_7b" / "unet.pt", dtype, copier)
    unet = unet.to(device)
    if cuda:
        torch.backends.cudnn.benchmark = True
        unet.to(memory_format=torch.channels_last)
    always_pass_upsample_size(unet)
    out: dict = {"phase": args.phase, "unet_load_s": time.perf_counter() - started}

    def static_step(*tensors: torch.Tensor) -> torch.Tensor:  # the denoiser's closure over the UNet
        return guided_euler_ancestral_step(unet, *tensors)

    n, side = args.jobs, args.side // 8
    gen = torch.Generator().manual_seed(0)
    c = unet.config

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    scalars = torch.tensor([[500.0, 5.1, 5.0, -0.1, 0.4, 7.5, 1.5]] * n, device=device)
    inputs = (randn(n, 4, side, side), randn(3 * n, 4, side, side), randn(3 * n, 77, c.cross_attention_dim),
              scalars, randn(n, 4, side, side))
    file = args.work / f"static-step-{n}.bin"

    def call(fn) -> torch.Tensor:
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        result = fn(*inputs).clone()
        if cuda:
            torch.cuda.synchronize()
        return result

    with torch.inference_mode():
        reference = call(static_step)
        started = time.perf_counter()
        if args.phase == "aot":
            keep = getattr(torch.compiler, "keep_tensor_guards_unsafe", None)  # newer than skip_all's
            out["guards"] = "tensor guards" if keep else "none"
            options = {**STATIC_STEP_OPTIONS, "guard_filter_fn": keep or torch.compiler.skip_all_guards_unsafe}
            fn = torch.compile(static_step, fullgraph=True, dynamic=False, options=options).aot_compile((inputs, {}))
            out["compile_s"] = time.perf_counter() - started
            fn.save_compiled_function(str(file), external_data={"unet": unet})
            out["file_mb"] = file.stat().st_size / 1e6
        elif args.phase == "load":
            if cuda:  # the compile options are not in the file: CUDA graphs come from the global config
                torch._inductor.config.triton.cudagraphs = True
            with open(file, "rb") as fh:
                fn = torch.compiler.load_compiled_function(fh, f_globals=globals(), external_data={"unet": unet})
            out["load_s"] = time.perf_counter() - started
            started = time.perf_counter()  # again: without the imports and set-up the first load paid once
            with open(file, "rb") as fh:
                torch.compiler.load_compiled_function(fh, f_globals=globals(), external_data={"unet": unet})
            out["load_again_s"] = time.perf_counter() - started
        else:
            fn = torch.compile(static_step, dynamic=False, options=STATIC_STEP_OPTIONS)
        started = time.perf_counter()
        first = call(fn)
        out["first_call_s"] = time.perf_counter() - started
        call(fn)  # cudagraph trees record on a later call
        times = []
        for _ in range(STEADY_CALLS):
            started = time.perf_counter()
            call(fn)
            times.append(time.perf_counter() - started)
        out["step_ms"] = 1000 * statistics.median(times)
        out["max_abs_diff_to_eager"] = float((first.float() - reference.float()).abs().max())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/mgie-full"), help="the full-size checkpoint (written if absent)")
    p.add_argument("--tokenizer-dir", type=Path, default=None)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--work", type=Path, default=Path("/tmp/mgie-aot"), help="the inductor cache and the saved step")
    p.add_argument("--small", action="store_true", help="shrunken dims, for a dry run on a CPU")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(RESULT + json.dumps(_phase(args)), flush=True)
        return 0

    import shutil

    from run_info import run_info, save
    from write_full_size import ensure_full_size

    ensure_full_size(args.ckpt, args.small, args.tokenizer_dir)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(args.work / "inductor")}
    report = run_info(ckpt=str(args.ckpt), jobs=args.jobs, side=args.side, small=args.small)
    report.update(phases={}, complete=False)
    name = f"aot-step-{args.jobs}" + ("-small" if args.small else "")
    for phase in PHASES:
        started = time.perf_counter()
        run = subprocess.run([sys.executable, __file__, "--phase", phase, "--ckpt", str(args.ckpt), "--jobs",
                              str(args.jobs), "--side", str(args.side), "--work", str(args.work)],
                             env=env, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith(RESULT)]
        if run.returncode != 0 or not lines:
            report["phases"][phase] = {"exit_code": run.returncode, "error": run.stderr[-3000:]}
            print(f"{phase}: failed (exit {run.returncode})\n{run.stderr[-3000:]}", flush=True)
            save(report, args.out, name)
            return 1
        result = json.loads(lines[-1][len(RESULT):])
        result["process_s"] = time.perf_counter() - started
        report["phases"][phase] = result
        print(f"{phase}: " + ", ".join(f"{k} {v:.3g}" for k, v in result.items() if isinstance(v, float)), flush=True)
        save(report, args.out, name)
    ph = report["phases"]
    report["summary"] = {
        "warm_restart_s": {"jit": ph["jit-warm"]["first_call_s"], "aot": ph["load"]["load_s"] + ph["load"]["first_call_s"]},
        "step_ms": {"jit": ph["jit-warm"]["step_ms"], "aot": ph["load"]["step_ms"]},
        "aot_step_vs_jit": ph["load"]["step_ms"] / ph["jit-warm"]["step_ms"]}
    report["complete"] = True
    print(json.dumps(report["summary"]))
    print("wrote", save(report, args.out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
