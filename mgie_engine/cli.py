"""`mgie-edit`: one edit from the command line, with the same engine the bot uses.

Everything the user typed is checked before anything heavy is imported or loaded (torch alone takes
seconds to import, the real models minutes): the options, the settings, the input image and whether the
output can be written. Each problem is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from .arguments import OneLineParser
from .errors import BadImageError, MgieError
from .instructions import MAX_INSTRUCTION_CHARS, normalize_instruction
from .options import (
    DEFAULT_IMAGE_CFG,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_TEXT_CFG,
    IMAGE_CFG_RANGE,
    SEED_RANGE,
    STEPS_RANGE,
    TEXT_CFG_RANGE,
)
from .settings import MAX_SIDE_RANGE

log = logging.getLogger("mgie_engine.cli")


def _max_side(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of pixels, not {raw[:40]!r}") from None
    if not MAX_SIDE_RANGE[0] <= value <= MAX_SIDE_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be from {MAX_SIDE_RANGE[0]} to {MAX_SIDE_RANGE[1]}, not {value}")
    return value


def _parser() -> OneLineParser:
    p = OneLineParser(prog="mgie-edit", description="Edit an image with MGIE from a text instruction. Settings "
                      "(MGIE_CKPT_DIR, MGIE_DEVICE, ...) come from the environment and a .env file in the current "
                      "directory or above; see .env.example.")
    p.add_argument("input", help="image to edit (PNG, JPEG, WEBP or GIF)")
    p.add_argument("--instruction", "-i", required=True,
                   help=f"what to change, e.g. 'make the sky a sunset' (at most {MAX_INSTRUCTION_CHARS} characters)")
    p.add_argument("--output", "-o", required=True, help="where to write the edited PNG")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    p.add_argument("--text-cfg", type=float, default=DEFAULT_TEXT_CFG,
                   help=f"text guidance, {TEXT_CFG_RANGE[0]:g}-{TEXT_CFG_RANGE[1]:g}; higher follows the text more "
                        f"(default {DEFAULT_TEXT_CFG:g})")
    p.add_argument("--image-cfg", type=float, default=DEFAULT_IMAGE_CFG,
                   help=f"image guidance, {IMAGE_CFG_RANGE[0]:g}-{IMAGE_CFG_RANGE[1]:g}; higher keeps the input "
                        f"more (default {DEFAULT_IMAGE_CFG:g})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"denoising steps, {STEPS_RANGE[0]}-{STEPS_RANGE[1]} (default {DEFAULT_STEPS})")
    p.add_argument("--max-side", type=_max_side, default=None,
                   help=f"longest side in pixels, {MAX_SIDE_RANGE[0]}-{MAX_SIDE_RANGE[1]} "
                        "(default MGIE_MAX_SIDE, else 512)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the result and timings")
    p.add_argument("--verbose", "-v", action="store_true")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every option; an out-of-range value exits here with one line, before any import."""
    p = _parser()
    args = p.parse_args(argv)
    for flag, value, (low, high) in (("--text-cfg", args.text_cfg, TEXT_CFG_RANGE),
                                     ("--image-cfg", args.image_cfg, IMAGE_CFG_RANGE)):
        if not low <= value <= high:  # NaN fails too
            p.error(f"{flag} must be from {low:g} to {high:g}, not {value:g}")
    if not STEPS_RANGE[0] <= args.steps <= STEPS_RANGE[1]:
        p.error(f"--steps must be from {STEPS_RANGE[0]} to {STEPS_RANGE[1]}, not {args.steps}")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        p.error(f"--seed must be from {SEED_RANGE[0]} to {SEED_RANGE[1]}")
    try:
        args.instruction = normalize_instruction(args.instruction)
    except MgieError as err:
        p.error(f"--instruction: {err}")
    return args


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
    started = time.perf_counter()
    args = parse_args(argv)
    fmt = ("%(asctime)s %(levelname)s %(name)s: %(message)s" if args.verbose
           else "mgie-edit: %(levelname)s: %(message)s")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format=fmt)
    from .settings import EngineSettings, load_env_file
    from .unused_packages import skip_unused_packages

    load_env_file()
    skip_unused_packages()  # after .env (MGIE_KEEP_OPTIONAL_IMPORTS), before the model libraries' first import
    try:
        settings = EngineSettings.from_env()
        start = time.perf_counter()
        source = _read_input(Path(args.input))
        decode_input = time.perf_counter() - start
        out = _check_output(Path(args.output))
        return _run(args, settings, source, out, started, {"decode_input": decode_input})
    except MgieError as err:
        print(f"mgie-edit: {err}", file=sys.stderr)
        return 2


def _read_input(path: Path):
    """The decoded input, or an error that names the file (the engine's own message is written for the bot)."""
    from .images import load_image

    if not path.exists():
        raise BadImageError(f"{path}: no such file.")
    if path.is_dir():
        raise BadImageError(f"{path} is a folder; give the image file to edit.")
    try:
        return load_image(path)
    except MgieError as err:
        raise BadImageError(f"{path}: {err}") from err


def _check_output(out: Path) -> Path:
    """Fail now, not after minutes of editing, when the output cannot be written."""
    if out.is_dir():
        raise MgieError(f"--output {out} is a folder; give a file name such as {out / 'edited.png'}.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".mgie-edit-", suffix=".png"):
            pass
        if out.exists() and not os.access(out, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except (FileExistsError, NotADirectoryError) as err:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), out.parent)
        raise MgieError(f"--output {out} cannot be written: {blocker} is a file, not a folder.") from err
    except OSError as err:
        raise MgieError(f"--output {out} cannot be written ({err.strerror or err}).") from err
    return out


def _run(args: argparse.Namespace, settings, source, out: Path, started: float, timings: dict[str, float]) -> int:

    start = time.perf_counter()
    from .models import load_models
    from .pipeline import EditRequest, MgiePipeline
    from .png import encode_png

    timings["imports"] = time.perf_counter() - start
    bars = _Bars(sys.stderr.isatty() and not args.json)

    start = time.perf_counter()
    models = load_models(settings, progress=bars.loading)  # warns once, through logging, on random weights
    timings["load"] = time.perf_counter() - start

    # One edit, never compiled: the VAE's grid, unless MGIE_SIZE_STEP asks for another.
    pipe = MgiePipeline(models, max_side=args.max_side or settings.max_side,
                        size_step=settings.working_step(False, models.vae_scale_factor))
    result = pipe(EditRequest(image=source, instruction=args.instruction, seed=args.seed, text_cfg=args.text_cfg,
                              image_cfg=args.image_cfg, steps=args.steps), progress=bars.step)
    timings.update((k, v) for k, v in result.timings.items() if k != "total")  # ours is from the start

    start = time.perf_counter()
    try:
        out.write_bytes(encode_png(result.image))
    except OSError as err:
        print(f"mgie-edit: could not write {out}: {err}", file=sys.stderr)
        return 1
    timings["encode_output"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - started  # wall time from the start, imports and checks included

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
