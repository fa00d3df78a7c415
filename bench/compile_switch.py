"""Edits served while a worker compiles in the background, and after it switches to compiled kernels.

Starts one LocalWorker with the engine settings of the environment (MGIE_*; MGIE_COMPILE=auto compiles
on CUDA), then runs one edit after another from the moment the weights are loaded until the compile has
ended and ``--after`` more edits have run. Prints one JSON line per edit (time since start, the mode when
it started, its seconds, the worker's info: mode, compiles during service) and a summary line; with
``--out`` the summary is also written there as JSON. On a CPU (no compile) it runs ``--after`` edits.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import time
from pathlib import Path

import PIL.Image

from mgie_engine.protocol import EditJob
from mgie_engine.settings import EngineSettings
from mgie_engine.worker import LocalWorker


async def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    worker = LocalWorker(EngineSettings.from_env())
    worker.start()
    await worker.wait_ready()
    summary: dict = {"ready_s": round(time.perf_counter() - started, 1), "edits": []}
    print(json.dumps({"ready_s": summary["ready_s"], **worker.info()}), flush=True)
    buf = io.BytesIO()
    PIL.Image.new("RGB", (args.side, args.side), (90, 120, 200)).save(buf, "PNG")
    k = after = 0
    while after < args.after:
        mode = worker.modes.mode
        outcome = await worker.run(EditJob(job_id=f"{k:032x}", image=buf.getvalue(), instruction="make it snowy",
                                           seed=k, text_cfg=7.5, image_cfg=1.5, steps=args.steps))
        edit = {"t": round(time.perf_counter() - started, 1), "mode_at_start": mode,
                "edit_s": round(outcome.seconds, 3), **worker.info()}
        print(json.dumps(edit), flush=True)
        summary["edits"].append(edit)
        k, after = k + 1, after + worker.modes.settled.is_set()
    info = worker.info()
    summary.update(mode=info["mode"], compiles_in_service=info["compiles"], compile_s=info.get("compile_seconds"),
                   compile_error=info.get("compile_error"), compile_child=info.get("compile_child"))
    worker.shutdown()
    summary["joined"] = worker.join(60)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--side", type=int, default=512, help="input image side, pixels")
    parser.add_argument("--after", type=int, default=3, help="edits to run once the compile has ended")
    parser.add_argument("--out", type=Path, default=None, help="write the summary here as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    summary = asyncio.run(run(args))
    print(json.dumps({key: value for key, value in summary.items() if key != "edits"}), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
