"""`mgie-edit`: one edit from the command line, with the same engine the bot uses."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import MgieError
from .options import DEFAULT_SEED

log = logging.getLogger("mgie_engine.cli")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mgie-edit", description="Edit an image with MGIE from a text instruction.")
    p.add_argument("input", help="image to edit (PNG, JPEG, WEBP or GIF)")
    p.add_argument("--instruction", "-i", required=True, help="what to change, e.g. 'make the sky a sunset'")
    p.add_argument("--output", "-o", required=True, help="where to write the edited PNG")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--text-cfg", type=float, default=7.5, help="text guidance scale (higher follows the text more)")
    p.add_argument("--image-cfg", type=float, default=1.5, help="image guidance scale (higher keeps the input more)")
    p.add_argument("--steps", type=int, default=100, help="denoising steps")
    p.add_argument("--max-side", type=int, default=None, help="longest side in pixels (default MGIE_MAX_SIDE or 512)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result and timings")
    p.add_argument("--verbose", "-v", action="store_true")
    return p.parse_args(argv)


class _Bars:
    """tqdm bars on a terminal, nothing otherwise (logs and --json stay clean)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar = enabled, None

    def loading(self, message: str) -> None:
        if self.enabled:
            print(f"loading {message}...", file=sys.stderr, flush=True)

    def step(self, stage: str, k: int, n: int) -> None:
        if not self.enabled or stage != "denoise":
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=n, desc="denoising", unit="step", file=sys.stderr)
        self.bar.update(k - self.bar.n)
        if k >= n:
            self.bar.close()
            self.bar = None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from dotenv import load_dotenv

    load_dotenv()
    try:
        return _run(args)
    except MgieError as err:
        print(f"mgie-edit: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from .images import load_image
    from .models import load_models
    from .pipeline import EditRequest, MgiePipeline
    from .png import encode_png
    from .settings import EngineSettings

    settings = EngineSettings.from_env()
    bars = _Bars(sys.stderr.isatty() and not args.json)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    source = load_image(Path(args.input))
    timings["decode_input"] = time.perf_counter() - start

    start = time.perf_counter()
    models = load_models(settings, progress=bars.loading)
    timings["load"] = time.perf_counter() - start
    if models.random_weights:
        print("mgie-edit: WARNING: these checkpoints hold RANDOM weights (mgie_engine.tiny); "
              "the output is noise, not an edit.", file=sys.stderr)

    pipe = MgiePipeline(models, max_side=args.max_side or settings.max_side)
    result = pipe(EditRequest(image=source, instruction=args.instruction, seed=args.seed, text_cfg=args.text_cfg,
                              image_cfg=args.image_cfg, steps=args.steps), progress=bars.step)
    timings.update(result.timings)

    start = time.perf_counter()
    out = Path(args.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(encode_png(result.image))
    except OSError as err:
        print(f"mgie-edit: could not write {out}: {err}", file=sys.stderr)
        return 1
    timings["encode_output"] = time.perf_counter() - start
    timings["total"] = sum(v for k, v in timings.items() if k != "total")

    if args.json:
        print(json.dumps({
            "expressive_instruction": result.expressive_instruction, "instruction": result.instruction,
            "seed": result.seed, "text_cfg": result.text_cfg, "image_cfg": result.image_cfg, "steps": result.steps,
            "width": result.width, "height": result.height, "output": str(out), "device": str(models.device),
            "random_weights": models.random_weights, "timings": {k: round(v, 4) for k, v in timings.items()},
        }))
    else:
        print(f"{out}: {result.width}x{result.height}, seed {result.seed}, {timings['total']:.1f} s")
        print(f"expressive instruction: {result.expressive_instruction}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
