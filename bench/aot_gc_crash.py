"""Which part of a saved step (MGIE_COMPILE_AOT, mgie_engine/saved_steps.py) crashes a worker in garbage collection.

On the H200 (torch 2.11, stop 27) every process that served through loaded steps died with "Fatal Python error:
Segmentation fault ... Garbage-collecting": two coldstart runs at exit, and a load test mid-run, in the explicit
``gc.collect()`` after a failed language batch. On a CPU (torch 2.11 and 2.13, inductor and eager backends) the same
loads, calls and collections never crash, so the suspects are CUDA-only or thread-only:

- inductor's cudagraph trees: a tree manager is freed with the last function that recorded into it
  (``TreeManagerContainer``: a ``weakref.finalize`` per function), whichever thread the collection runs in;
- the worker's two threads: the compile thread loads the step and records its graphs on the serving thread's
  cudagraph-tree state (``device_turns.adopt_cudagraph_state``), the serving thread replays them;
- dynamo's recursive dict-tag guards, on in 2.11 and turned off upstream after segfaults (the loaded step checks
  its guards on a fresh dict of locals at every call);
- the end of the compile thread that loaded the steps (its thread state and thread-locals torn down): stop 28's
  warm restart, with the dict-tag guards off, crashed in the serving thread's eager UNet call within a second of
  the compile thread's end, and every earlier crash came after it had ended (``compile-thread-parked``).

The engine now turns those guards off with MGIE_COMPILE_AOT (``saved_steps.without_recursive_dict_tag_guards``);
this script uses ``SavedSteps`` directly, so its variants keep torch's default and ``no-dict-tags`` is the engine's.
Each variant is a fresh process that loads the full-size UNet and the saved home-shape step for one job, and
exits normally after its last collection (its exit code is the finding: -11 is the crash):

    python bench/aot_gc_crash.py [--ckpt /tmp/mgie-full] [--cache DIR] [--variants a,b] [--out bench/results]

``--cache`` is a compile cache folder holding ``steps/<unet>/static-1.bin`` (an ``AOT=1`` first start leaves one under
/tmp/mgie-coldstart/compile/); without one, or when that one refuses these inputs, the step is compiled into
/tmp/mgie-aot-gc first (minutes on a GPU).
``--small`` dry-runs it on a CPU with the shrunken checkpoint.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

VARIANTS = {
    "one-thread": "load, run and collect in the main thread",
    "two-threads": "loaded and first run in a compile thread on the serving thread's cudagraph trees, as the "
                   "worker does; then run and collected in the serving thread",
    "exit-while-running": "two-threads, and the process exits while the serving thread (a daemon) still steps",
    "compile-thread-parked": "two-threads, but the compile thread never ends (it waits until the process exits)",
    "no-dict-tags": "two-threads with dynamo's recursive dict-tag guards off",
    "no-guard-check": "two-threads with the loaded step's guard check off",
    "no-cudagraphs": "two-threads with the step loaded without CUDA graphs",
    "drop-steps": "two-threads, then the steps dropped (the last owner of their graphs) while an output lives on",
}
RESULT = "RESULT "
STEPS = 30
OWN_CACHE = Path("/tmp/mgie-aot-gc")  # where the step is compiled when no first start left one that serves


def _variant(args: argparse.Namespace) -> None:
    """One variant in this fresh process; prints what it reached, so a crash says where."""
    import faulthandler

    import torch
    from aot_step import load_unet

    from mgie_engine import device_turns
    from mgie_engine.compile_cache import use_cache_folder
    from mgie_engine.lifecycle import prepare_thread
    from mgie_engine.saved_steps import SavedSteps
    from mgie_engine.settings import EngineSettings

    faulthandler.enable()
    variant, cuda = args.variant, torch.cuda.is_available()
    use_cache_folder(args.cache)
    unet, device, dtype = load_unet(args.ckpt)
    if variant == "no-dict-tags" and hasattr(torch._dynamo.config, "use_recursive_dict_tags_for_guards"):
        torch._dynamo.config.use_recursive_dict_tags_for_guards = False
    options = None
    if variant == "no-cudagraphs":
        from mgie_engine.compilation import STATIC_STEP_OPTIONS, UNET_COMPILE_OPTIONS

        options = {"static": {**STATIC_STEP_OPTIONS, "triton.cudagraphs": False},
                   "symbolic": {**UNET_COMPILE_OPTIONS, "triton.cudagraphs": False},
                   "plain": {**UNET_COMPILE_OPTIONS, "triton.cudagraphs": False}}
    if not cuda:  # the CPU's inductor takes neither CUDA graphs nor these layouts
        options = {kind: {"layout_optimization": False} for kind in ("static", "symbolic", "plain")}
    saved = SavedSteps(args.cache, unet, options=options)
    latent = args.side // 8
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    step_args = (randn(1, 4, latent, latent), randn(3, 4, latent, latent),
                 randn(3, 77, unet.config.cross_attention_dim), torch.tensor([[500.0, 5.1, 5.0, -0.1, 0.4, 7.5, 1.5]],
                                                                             device=device), randn(1, 4, latent, latent))
    settings = EngineSettings(device="cuda:0" if cuda else "cpu")  # prepare_thread sets the device by its index
    reached: list[str] = []

    def note(what: str) -> None:
        reached.append(what)
        print(f"reached: {what}", flush=True)

    def run(count: int) -> torch.Tensor:
        out = None
        for _ in range(count):
            out = saved.run("static", step_args)
            if out is None:
                raise RuntimeError(f"the saved step did not serve (loaded {saved.loaded}, compiled {saved.compiled})")
            out = out.clone()
        if cuda:
            torch.cuda.synchronize()
        return out

    if variant == "one-thread":
        prepare_thread(settings)
        with torch.inference_mode():
            run(STEPS)
            note("ran")
            gc.collect()
            note("collected")
    else:
        state: dict = {}
        go_on, loaded = threading.Event(), threading.Event()

        def compile_thread() -> None:  # as serving_modes' compile thread: adopts the serving thread's trees
            prepare_thread(settings)
            device_turns.adopt_cudagraph_state(state["trees"])
            with torch.inference_mode():
                run(3)
                if variant == "no-guard-check":
                    for fn in saved._steps.values():
                        fn.disable_guard_check()
            note("loaded and recorded in the compile thread")
            loaded.set()
            if variant == "compile-thread-parked":  # its thread state and thread-locals are never torn down
                threading.Event().wait()

        def serving_thread() -> None:
            prepare_thread(settings)
            state["trees"] = device_turns.cudagraph_state()
            compiler = threading.Thread(target=compile_thread, name="compile", daemon=True)
            compiler.start()
            loaded.wait(timeout=args.timeout)
            if variant != "compile-thread-parked":
                compiler.join()
                note("the compile thread ended")
            with torch.inference_mode():
                out = run(STEPS)
                note("ran in the serving thread")
                if variant == "drop-steps":
                    saved._steps.clear()
                    gc.collect()
                    note("steps dropped and collected")
                    note(f"an output read after the drop: {float(out.float().abs().mean()):.4g}")
                gc.collect()
                note("collected in the serving thread")
                go_on.set()
                while variant == "exit-while-running":
                    run(1)

        server = threading.Thread(target=serving_thread, name="serving", daemon=True)
        server.start()
        go_on.wait(timeout=args.timeout)
        if variant != "exit-while-running":
            server.join(timeout=args.timeout)
    gc.collect()
    note("collected in the main thread")
    print(RESULT + json.dumps({"reached": reached, "loaded": saved.loaded, "compiled": saved.compiled}), flush=True)


def _child(args: argparse.Namespace, variant: str) -> dict:
    started = time.perf_counter()
    command = [sys.executable, __file__, "--variant", variant, "--ckpt", str(args.ckpt), "--cache", str(args.cache),
               "--side", str(args.side), "--timeout", str(args.timeout)]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout + 120)
    except subprocess.TimeoutExpired as err:
        return {"exit_code": None, "timed_out": True, "reached": _reached(err.stdout or "")}
    result = {"exit_code": run.returncode, "seconds": round(time.perf_counter() - started, 1),
              "reached": _reached(run.stdout), "crashed": run.returncode < 0}
    if run.returncode != 0:
        result["stderr_tail"] = [line for line in run.stderr.splitlines() if "pow_by_natural" not in line][-40:]
    lines = [line for line in run.stdout.splitlines() if line.startswith(RESULT)]
    if lines:
        result.update(json.loads(lines[-1][len(RESULT):]))
    return result


def _reached(stdout: str | bytes) -> list[str]:
    text = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout
    return [line.removeprefix("reached: ") for line in text.splitlines() if line.startswith("reached: ")]


def _default_cache() -> Path:
    """A folder an AOT=1 first start left (bench/startup_suite.sh), else our own."""
    found = sorted(Path("/tmp/mgie-coldstart/compile").glob("*/steps/*/static-1.bin"))
    return found[0].parents[2] if found else OWN_CACHE


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/mgie-full"), help="the full-size checkpoint (written if absent)")
    p.add_argument("--tokenizer-dir", type=Path, default=None)
    p.add_argument("--cache", type=Path, default=None, help="a compile cache folder with saved steps (see above)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"which, in order: {', '.join(VARIANTS)}")
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds a variant may take")
    p.add_argument("--small", action="store_true", help="shrunken dims, for a dry run on a CPU")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        _variant(args)
        return 0

    from run_info import run_info, save
    from write_full_size import ensure_full_size

    ensure_full_size(args.ckpt, args.small, args.tokenizer_dir)
    args.cache = args.cache or _default_cache()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    report = run_info(ckpt=str(args.ckpt), cache=str(args.cache), side=args.side, small=args.small,
                      variants={v: VARIANTS[v] for v in variants})
    report["results"] = {}
    name = "aot-gc-crash" + ("-small" if args.small else "")
    if not any(args.cache.glob("steps/*/static-1.bin")):
        # one-thread compiles and saves the step when there is none yet; its own run then counts as a compile
        print(f"no saved step in {args.cache}: the first variant compiles it", flush=True)
    for variant in variants:
        result = _child(args, variant)
        if "did not serve" in "\n".join(result.get("stderr_tail", [])) and args.cache != OWN_CACHE:
            # the engine's saved step refused these inputs (a tensor guard): compile one of our own and go on
            print(f"{variant}: the saved step in {args.cache} did not serve; compiling one in {OWN_CACHE}", flush=True)
            report["settings"]["cache"], args.cache = str(OWN_CACHE), OWN_CACHE
            result = _child(args, variant)
        report["results"][variant] = result
        print(f"{variant}: exit {result['exit_code']}, reached {result['reached'][-1:] or 'nothing'}", flush=True)
        save(report, args.out, name)
    print("wrote", save(report, args.out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
