"""From process start to full speed: a real worker process, started as mgie-bot starts its embedded worker.

    python bench/coldstart.py --phase first|warm|both [--ckpt /tmp/mgie-full] [--cache-dir /tmp/mgie-coldstart]
                              [--max-batch 8] [--tokenizer-dir DIR] [--out bench/results]

Each phase launches a fresh Python process (this script with ``--child``) that does what ``mgie-bot`` does for
its in-process engine: ``EngineSettings.from_env()``, ``WorkerPool.from_settings`` (load -> the production
warm-up -> serve, whatever ``mgie_engine.lifecycle`` does today), and the bot's ``JobQueue`` in front of it. From
its first line it submits edits at the home shape (``--side`` squares, guided), one after another, each as
soon as the last is back, and logs per edit: when submitted and done (seconds since the process was
launched), latency, and the worker's state and mode (``info()["mode"]`` where the worker reports one:
"eager (compiling)", "compiled", ...). It stops ``--steady-edits`` edits after the worker reached its final
mode (a mode other than "... (compiling)"; without a mode field: READY), or at ``--deadline``.

Reported (JSON per phase): weights loaded, worker ready, first edit served, full speed (the first edit whose
latency is within 10% of the steady compiled latency, the median of the last ``--steady-edits``), every edit,
mode changes, compiles counted by dynamo. Phase "first" starts with an empty compile cache folder and the
checkpoint dropped from the page cache; "warm" reuses the same cache folder (run it right after "first", in
the same machine session: the cache and the checkpoint live under /tmp). The checkpoint is the full-size
random one of ``write_full_size.py``, written first if missing (not timed here). ``--small`` dry-runs on a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

FULL_SPEED_MARGIN = 1.10  # "full speed": an edit within 10% of the steady compiled latency
# Seconds the child gets past --deadline to shut down before it is killed: it has written its last event by
# then, and a compile batch in flight can hold its shutdown longer than a device call has left.
CHILD_GRACE = 20.0


# -- the child: one worker process --------------------------------------------------------------------------------
class EventLog:
    """JSON lines, flushed as they come, with wall-clock times (the parent knows when it launched us)."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life
        self.lock = threading.Lock()

    def write(self, event: str, **fields) -> None:
        with self.lock:
            self.fh.write(json.dumps({"t": time.time(), "event": event, **fields}) + "\n")
            self.fh.flush()


def final_mode(info: dict, state: str) -> bool:
    """Whether the worker serves the way it will from now on: a mode other than "... (compiling)", or READY
    for workers that report no mode (they warm up before serving)."""
    mode = info.get("mode")
    if mode is None:
        return state == "ready"
    return state == "ready" and "compiling" not in str(mode)


async def child(args: argparse.Namespace) -> int:
    log = EventLog(args.events)
    log.write("child_started")
    faulthandler.enable()  # a native crash prints every thread's Python stack
    import torch
    from mgie_bench import INSTRUCTIONS, encode, image

    import mgie_engine.models as models_module
    from bot.queue import JobQueue
    from mgie_engine.pool import WorkerPool
    from mgie_engine.protocol import EditJob
    from mgie_engine.settings import EngineSettings

    log.write("imported")
    load_models = models_module.load_models

    def timed_load(*a, **kw):  # the worker thread calls it through lifecycle.load
        log.write("load_started")
        models = load_models(*a, **kw)
        if models.device.type == "cuda":
            torch.cuda.synchronize(models.device)
        log.write("weights_loaded")
        return models

    models_module.load_models = timed_load
    settings = EngineSettings.from_env()
    pool = WorkerPool.from_settings(settings)
    worker = pool.workers[0]
    waiters: dict[str, asyncio.Future] = {}

    def on_event(event) -> None:
        if event.kind in ("done", "failed", "cancelled") and event.job_id in waiters:
            waiters.pop(event.job_id).set_result(event)

    pool.start()
    queue = JobQueue(pool.workers, on_event=on_event, max_total=1000)
    queue.start()
    stop = asyncio.Event()
    seen = {"state": None, "mode": None, "phase": None}
    final_at: list[float] = []

    def note(state: str, info: dict) -> None:
        # compile_phase: "child" (a compile child runs), then "in-process" (lifecycle, compile_child.py)
        if (state, info.get("mode"), info.get("compile_phase")) != (seen["state"], seen["mode"], seen["phase"]):
            seen.update(state=state, mode=info.get("mode"), phase=info.get("compile_phase"))
            log.write("worker", state=state, mode=info.get("mode"), compile_phase=info.get("compile_phase"),
                      info=_jsonable(info))
            print(f"[child] worker {state} mode={info.get('mode')} compile_phase={info.get('compile_phase')}",
                  flush=True)
        if not final_at and final_mode(info, state):
            final_at.append(time.time())

    async def watch() -> None:
        """The worker's state the moment it is ready, then its info (the mode) twice a second: ``info()``
        queries the GPU, as the bot's status and heartbeat do, and is not polled faster than they might."""
        note(worker.state.value, {})
        await worker.wait_ready()
        while not stop.is_set():
            state = worker.state.value
            note(state, worker.info() if state == "ready" else {})
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch())
    deadline = args.launched + args.deadline
    n, after_final = 0, 0
    while time.time() < deadline and after_final < args.steady_edits:
        if worker.state.value == "failed":  # every edit would fail at once: say why and stop
            log.write("worker_failed", error=worker.error)
            print(f"[child] the worker failed: {worker.error}", flush=True)
            break
        item = {"image": encode(image(10_000 + n, args.side)), "instruction": INSTRUCTIONS[n % len(INSTRUCTIONS)]}
        job = EditJob(job_id=uuid.uuid4().hex, image=item["image"], instruction=item["instruction"], seed=n,
                      text_cfg=7.5, image_cfg=1.5, steps=args.steps)
        future = asyncio.get_running_loop().create_future()
        waiters[job.job_id] = future
        mode_at_submit, counted = seen["mode"], bool(final_at)
        submitted = time.time()
        queue.submit(job, user_id=1)
        try:
            event = await asyncio.wait_for(future, max(1.0, deadline - time.time()))
        except TimeoutError:
            log.write("edit_unfinished", n=n, submitted=submitted)
            break
        done = time.time()
        log.write("edit", n=n, submitted=submitted, done=done, latency=done - submitted, ok=event.kind == "done",
                  error=event.error, mode_at_submit=mode_at_submit, mode_at_done=seen["mode"],
                  compile_phase_at_done=seen["phase"],
                  state_at_done=seen["state"], after_final=counted)
        print(f"[child] edit {n}: {done - submitted:.2f} s ({event.kind}, mode {seen['mode']}), "
              f"{done - args.launched:.1f} s since launch", flush=True)
        n += 1
        after_final += counted
    stop.set()
    await watcher
    log.write("finished", final_at=final_at[0] if final_at else None, info=_jsonable(worker.info()),
              dynamo=_dynamo_counters(), peak_gib=(torch.cuda.max_memory_allocated() / 2**30
                                                   if torch.cuda.is_available() else 0.0))
    await queue.stop()
    pool.shutdown()
    pool.join(30)
    return 0


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _dynamo_counters() -> dict:
    """dynamo's counters (frames compiled, graphs, recompiles), where this torch keeps them."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {group: dict(values) for group, values in counters.items() if values}


# -- the parent: phases and the report ----------------------------------------------------------------------------
def summarize(events: list[dict], launched: float, steady_edits: int) -> dict:
    """Timestamps since launch, every edit, steady latency and when full speed was reached."""
    def first(name: str) -> float | None:
        return next((e["t"] - launched for e in events if e["event"] == name), None)

    edits = [{"n": e["n"], "submitted_s": e["submitted"] - launched, "done_s": e["done"] - launched,
              "latency_s": e["latency"], "ok": e["ok"], "error": e["error"], "mode_at_submit": e["mode_at_submit"],
              "mode_at_done": e["mode_at_done"], "compile_phase_at_done": e.get("compile_phase_at_done"),
              "after_final_mode": e["after_final"]}
             for e in events if e["event"] == "edit"]
    finished = next((e for e in events if e["event"] == "finished"), {})
    ready = next((e["t"] - launched for e in events if e["event"] == "worker" and e["state"] == "ready"), None)
    steady = [e["latency_s"] for e in edits if e["after_final_mode"] and e["ok"]][-steady_edits:]
    steady_latency = statistics.median(steady) if len(steady) >= min(3, steady_edits) else None
    full = next((e for e in edits if e["ok"] and steady_latency and e["latency_s"] <= FULL_SPEED_MARGIN * steady_latency),
                None)
    served = next((e for e in edits if e["ok"]), None)
    return {
        "child_started_s": first("child_started"), "imported_s": first("imported"),
        "load_started_s": first("load_started"), "weights_loaded_s": first("weights_loaded"),
        "worker_ready_s": ready, "final_mode_s": finished["final_at"] - launched if finished.get("final_at") else None,
        "first_edit_served_s": served["done_s"] if served else None,
        "first_edit_latency_s": served["latency_s"] if served else None,
        "steady_latency_s": steady_latency, "steady_edits": len(steady),
        "full_speed_s": full["done_s"] if full else None,
        "modes": [{"at_s": e["t"] - launched, "state": e["state"], "mode": e["mode"],
                   "compile_phase": e.get("compile_phase")} for e in events if e["event"] == "worker"],
        "edits": edits, "failed_edits": sum(not e["ok"] for e in edits),
        "unfinished_edit": any(e["event"] == "edit_unfinished" for e in events),
        "worker_error": next((e["error"] for e in events if e["event"] == "worker_failed"), None),
        "worker_info_at_end": finished.get("info"), "dynamo_counters": finished.get("dynamo"),
        "peak_gib": finished.get("peak_gib"), "complete": bool(finished) and full is not None,
    }


def run_phase(phase: str, args: argparse.Namespace, paths, work: Path) -> dict:
    from write_full_size import evict_page_cache

    cache = args.cache_dir
    if phase == "first":
        shutil.rmtree(cache, ignore_errors=True)
        if not args.keep_page_cache:
            evict_page_cache(args.ckpt)
    cache.mkdir(parents=True, exist_ok=True)
    cache_files = sum(1 for f in cache.rglob("*") if f.is_file())
    events_path = work / f"events-{phase}.jsonl"
    events_path.unlink(missing_ok=True)
    env = {**os.environ, **paths.env(), "MGIE_MAX_BATCH": str(args.max_batch), "MGIE_MAX_SIDE": str(args.side),
           "MGIE_COMPILE": args.compile, "MGIE_COMPILE_CACHE_DIR": str(cache / "compile"),
           "MGIE_DATA_DIR": str(cache / "data"), "PYTHONPATH": os.pathsep.join(
               [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "PYTHONUNBUFFERED": "1"}
    if args.small:
        env["MGIE_DEVICE"] = "cpu"
    print(f"== phase {phase}: {cache_files} files in {cache} at start; MGIE_COMPILE={args.compile}, "
          f"MGIE_MAX_BATCH={args.max_batch}", flush=True)
    launched = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--events", str(events_path),
           "--launched", repr(launched), "--deadline", str(args.deadline), "--steady-edits", str(args.steady_edits),
           "--side", str(args.side), "--steps", str(args.steps)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    try:
        rc = proc.wait(timeout=args.deadline + CHILD_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    events = [json.loads(line) for line in events_path.read_text().splitlines() if line.strip()]
    result = {"phase": phase, "exit_code": rc, "cache_files_at_start": cache_files,
              "page_cache": "kept" if phase == "warm" or args.keep_page_cache else "dropped",
              **summarize(events, launched, args.steady_edits)}
    keys = ("weights_loaded_s", "worker_ready_s", "first_edit_served_s", "final_mode_s", "full_speed_s",
            "steady_latency_s")
    print(f"== phase {phase}: " + ", ".join(f"{k} {result[k]:.1f}" if isinstance(result[k], float) else f"{k} -"
                                          for k in keys), flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phase", choices=("first", "warm", "both"), default="both")
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/mgie-full"))
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/mgie-coldstart"),
                   help="the compile cache and data folder the worker gets (emptied by --phase first)")
    p.add_argument("--tokenizer-dir", type=Path, default=None)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--compile", default=None, help="MGIE_COMPILE for the worker (default: 1 on CUDA, 0 on a CPU)")
    p.add_argument("--side", type=int, default=512, help="the home shape: side x side edits, MGIE_MAX_SIDE")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--steady-edits", type=int, default=5)
    p.add_argument("--deadline", type=float, default=540.0, help="seconds per phase from launch; then it stops")
    p.add_argument("--keep-page-cache", action="store_true", help="phase first: leave the checkpoint in the page cache")
    p.add_argument("--small", action="store_true", help="shrunken dims on a CPU, for a dry run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    # the child's own arguments
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--events", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        logging.basicConfig(level=logging.INFO, format="[child] %(asctime)s %(name)s: %(message)s")
        return asyncio.run(child(args))

    import torch
    from run_info import aot_suffix, run_info, save
    from write_full_size import ensure_full_size

    if args.compile is None:
        args.compile = "1" if torch.cuda.is_available() and not args.small else "0"
    started = time.perf_counter()
    paths = ensure_full_size(args.ckpt, args.small, args.tokenizer_dir)
    print(f"checkpoint ready in {time.perf_counter() - started:.0f} s at {args.ckpt}", flush=True)
    report = run_info(phase=args.phase, max_batch=args.max_batch, compile=args.compile, side=args.side,
                      steps=args.steps, steady_edits=args.steady_edits, deadline=args.deadline, small=args.small,
                      ckpt=str(args.ckpt), cache_dir=str(args.cache_dir), full_speed_margin=FULL_SPEED_MARGIN)
    report["phases"] = {}
    name = f"coldstart-b{args.max_batch}-{args.phase}" + aot_suffix() + ("-small" if args.small else "")
    work = args.cache_dir.parent / (args.cache_dir.name + "-events")
    work.mkdir(parents=True, exist_ok=True)
    for phase in ("first", "warm") if args.phase == "both" else (args.phase,):
        report["phases"][phase] = run_phase(phase, args, paths, work)
        save(report, args.out, name)
    report["complete"] = all(r["complete"] for r in report["phases"].values())
    print("wrote", save(report, args.out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
