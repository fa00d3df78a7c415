"""A denoising step compiled ahead of time and loaded, against torch.compile on a warm cache: what a warm restart
could pay per class of shape instead of re-tracing it (issue 20, "short warm restarts").

    python bench/aot_step.py [--step static|symbolic] [--ckpt /tmp/mgie-full] [--jobs 1] [--side 512]
                             [--work /tmp/mgie-aot] [--out bench/results] [--small]

The guided step (``denoiser.guided_euler_ancestral_step`` on the full-size UNet): ``static``, the home-shape step
(a ``--side`` square, ``--jobs`` jobs, ``STATIC_STEP_OPTIONS``, static shapes); ``symbolic``, the step for every
other shape (compiled at two jobs with the denoiser's dynamic marks, then run at the other classes the warm-up
compiles apart: one job, eight at the square, eight at 64x64). Four fresh processes share one inductor cache:

- ``aot``: ``torch.compile(fullgraph=True).aot_compile`` and ``save_compiled_function`` (the UNet as external
  data; only tensor guards kept: module guards cannot be saved), on an empty cache;
- ``jit-first``: ``torch.compile`` as the worker compiles it, first calls, on what ``aot`` left in the cache;
- ``load``: ``torch.compiler.load_compiled_function``: seconds to load (and to load again, without the one-time
  imports), the first calls (CUDA graphs recorded on a GPU), the steady step;
- ``jit-warm``: ``torch.compile`` again, now on a warm cache: what a warm restart pays for these classes today.

Prints and writes (JSON) each phase's seconds and, per class, the first call, the steady step and the largest
difference from the eager step's output. ``--small`` runs it on a CPU with the shrunken checkpoint.
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


def _classes(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """(jobs, latent height, latent width) the step is compiled at (the first), and, for the symbolic step, the
    other classes the worker's warm-up compiles apart: one job, a square at eight, a small size at eight."""
    side, other = args.side // 8, (args.side * 3 // 4 // 8, args.side * 5 // 8 // 8)  # warm_up_batches' sizes
    if args.step == "static":
        return [(args.jobs, side, side)]
    return [(2, *other), (1, *other), (8, side, side), (8, 8, 8)]


def load_unet(ckpt: Path):
    """The checkpoint's UNet alone, set up as the compiled pipeline sets it (half precision and channels-last on
    a GPU, every upsampler given its size): (unet, device, dtype)."""
    import torch

    from mgie_engine.compilation import always_pass_upsample_size
    from mgie_engine.models import load_diffusion
    from mgie_engine.tiny import TinyPaths
    from mgie_engine.weight_copies import WeightCopier

    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.float16 if cuda else torch.float32
    paths = TinyPaths.under(ckpt)
    with WeightCopier(device, dtype) as copier:
        unet, *_ = load_diffusion(paths.ip2p, paths.mgie / "mgie_7b" / "unet.pt", dtype, copier)
    unet = unet.to(device)
    if cuda:
        torch.backends.cudnn.benchmark = True
        unet.to(memory_format=torch.channels_last)
    always_pass_upsample_size(unet)
    return unet, device, dtype


def _phase(args: argparse.Namespace) -> dict:
    """One phase in this (fresh) process."""
    import torch

    from mgie_engine.compilation import STATIC_STEP_OPTIONS, UNET_COMPILE_OPTIONS, mark_sizes_dynamic
    from mgie_engine.denoiser import guided_euler_ancestral_step

    started = time.perf_counter()
    unet, device, dtype = load_unet(args.ckpt)
    cuda = device.type == "cuda"
    out: dict = {"phase": args.phase, "step": args.step, "unet_load_s": time.perf_counter() - started}

    def step(*tensors: torch.Tensor) -> torch.Tensor:  # the denoiser's closure over the UNet
        return guided_euler_ancestral_step(unet, *tensors)

    symbolic = args.step == "symbolic"
    options = dict(UNET_COMPILE_OPTIONS if symbolic else STATIC_STEP_OPTIONS)
    if symbolic and not cuda:
        # On a CPU inductor fails to lower a 1x1 convolution as a matmul at symbolic sizes ("ValueRangeError:
        # Invalid ranges [0:-1]"), under torch.compile and aot_compile alike; the GPU worker compiles it.
        options.pop("conv_1x1_as_mm")
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    def inputs(n: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        scalars = torch.tensor([[500.0, 5.1, 5.0, -0.1, 0.4, 7.5, 1.5]] * n, device=device)
        made = (randn(n, 4, h, w), randn(3 * n, 4, h, w), randn(3 * n, 77, unet.config.cross_attention_dim),
                scalars, randn(n, 4, h, w))
        if symbolic and args.phase != "load":
            mark_sizes_dynamic(*made)  # as the denoiser marks them (a loaded function refuses marked tensors)
        return made

    def call(fn, args_: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        result = fn(*args_).clone()
        if cuda:
            torch.cuda.synchronize()
        return result

    out["options"] = sorted(options)
    classes = _classes(args)
    file = args.work / f"{args.step}-step-{classes[0][0]}.bin"
    with torch.inference_mode():
        first_inputs = inputs(*classes[0])
        started = time.perf_counter()
        if args.phase == "aot":
            keep = getattr(torch.compiler, "keep_tensor_guards_unsafe", None)  # newer than skip_all's
            out["guards"] = "tensor guards" if keep else "none"
            aot_options = {**options, "guard_filter_fn": keep or torch.compiler.skip_all_guards_unsafe}
            # torch 2.11 has the API behind a flag (off by default; on by default by 2.13)
            torch._dynamo.config.enable_aot_compile = True
            fn = torch.compile(step, fullgraph=True, dynamic=None if symbolic else False,
                               options=aot_options).aot_compile((first_inputs, {}))
            out["compile_s"] = time.perf_counter() - started
            fn.save_compiled_function(str(file), external_data={"unet": unet})
            out["file_mb"] = file.stat().st_size / 1e6
        elif args.phase == "load":
            if cuda:  # the compile options are not in the file: CUDA graphs come from the global config
                torch._inductor.config.triton.cudagraphs = True

            def load():
                with open(file, "rb") as fh:
                    return torch.compiler.load_compiled_function(fh, f_globals=globals(), external_data={"unet": unet})

            fn = load()
            out["load_s"] = time.perf_counter() - started
            started = time.perf_counter()  # again: without the imports and set-up the first load paid once
            load()
            out["load_again_s"] = time.perf_counter() - started
        else:
            fn = torch.compile(step, dynamic=None if symbolic else False, options=options)
        # Each class: its first call (a trace and compile under torch.compile; CUDA graphs recorded later), the
        # steady step, and the largest difference from the eager step on the same inputs.
        out["classes"] = []
        for k, shape in enumerate(classes if args.phase != "aot" else classes[:1]):
            args_ = first_inputs if k == 0 else inputs(*shape)
            reference = call(step, args_)
            started = time.perf_counter()
            first = call(fn, args_)
            first_s = time.perf_counter() - started
            call(fn, args_)  # cudagraph trees record on a later call
            times = []
            for _ in range(STEADY_CALLS):
                started = time.perf_counter()
                call(fn, args_)
                times.append(time.perf_counter() - started)
            out["classes"].append({"jobs": shape[0], "latents": list(shape[1:]), "first_call_s": first_s,
                                   "step_ms": 1000 * statistics.median(times),
                                   "max_abs_diff_to_eager": float((first.float() - reference.float()).abs().max())})
        out["first_call_s"] = sum(c["first_call_s"] for c in out["classes"])
    from torch._dynamo.utils import counters  # did the step record CUDA graphs (or say why not)?

    out["cudagraph_counters"] = {f"{group}.{key}": value for group, counted in counters.items()
                                 for key, value in counted.items() if "cudagraph" in key}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/mgie-full"), help="the full-size checkpoint (written if absent)")
    p.add_argument("--tokenizer-dir", type=Path, default=None)
    p.add_argument("--step", choices=("static", "symbolic"), default="static",
                   help="the home-shape step (static shapes, at --jobs) or the symbolic one (compiled at two jobs, "
                        "then run at the other classes the warm-up compiles apart)")
    p.add_argument("--jobs", type=int, default=1, help="job count of the static step")
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--work", type=Path, default=Path("/tmp/mgie-aot"), help="the inductor cache and the saved step")
    p.add_argument("--small", action="store_true", help="shrunken dims, for a dry run on a CPU")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--phases", default=",".join(PHASES),
                   help="which to run, in order (aot,load alone: the loaded step against the eager one; without aot, "
                        "on the --work folder an earlier run left)")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(RESULT + json.dumps(_phase(args)), flush=True)
        return 0

    import shutil

    from run_info import run_info, save
    from write_full_size import ensure_full_size

    ensure_full_size(args.ckpt, args.small, args.tokenizer_dir)
    phases = [phase for phase in PHASES if phase in args.phases.split(",")]
    if "aot" in phases:  # else: the saved step and the cache of an earlier run
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(args.work / "inductor")}
    report = run_info(ckpt=str(args.ckpt), step=args.step, jobs=args.jobs, side=args.side, small=args.small)
    report.update(phases={}, complete=False)
    name = f"aot-{args.step}-step" + (f"-{args.jobs}" if args.step == "static" else "") + ("-small" if args.small else "")
    for phase in phases:
        started = time.perf_counter()
        run = subprocess.run([sys.executable, __file__, "--phase", phase, "--step", args.step, "--ckpt", str(args.ckpt),
                              "--jobs", str(args.jobs), "--side", str(args.side), "--work", str(args.work)],
                             env=env, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith(RESULT)]
        if run.returncode != 0 or not lines:
            report["phases"][phase] = {"exit_code": run.returncode, "error": run.stderr[-3000:]}
            print(f"{phase}: failed (exit {run.returncode})\n{run.stderr[-3000:]}", flush=True)
            save(report, args.out, name)
            return 1
        result = json.loads(lines[-1][len(RESULT):])
        result["process_s"] = time.perf_counter() - started
        result["cudagraph_messages"] = [line for line in run.stderr.splitlines() if "cudagraph" in line.lower()][:5]
        report["phases"][phase] = result
        print(f"{phase}: " + ", ".join(f"{k} {v:.3g}" for k, v in result.items() if isinstance(v, float)), flush=True)
        for c in result.get("classes", []):
            print(f"  {c['jobs']} job(s) at {c['latents']} latents: first call {c['first_call_s']:.2f} s, step "
                  f"{c['step_ms']:.1f} ms, {c['max_abs_diff_to_eager']:.2g} from eager", flush=True)
        save(report, args.out, name)
    ph = report["phases"]
    if {"load", "jit-warm"} <= set(ph):
        report["summary"] = {  # every class: a warm restart's cost today (jit) and loaded (aot), and the step's speed
            "warm_restart_s": {"jit": ph["jit-warm"]["first_call_s"], "aot": ph["load"]["load_s"] + ph["load"]["first_call_s"]},
            "step_ms": {"jit": [c["step_ms"] for c in ph["jit-warm"]["classes"]],
                        "aot": [c["step_ms"] for c in ph["load"]["classes"]]},
            "max_abs_diff_to_eager": {"jit": max(c["max_abs_diff_to_eager"] for c in ph["jit-warm"]["classes"]),
                                      "aot": max(c["max_abs_diff_to_eager"] for c in ph["load"]["classes"])}}
    report["complete"] = True
    print(json.dumps(report.get("summary", ph)))
    print("wrote", save(report, args.out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
