"""`python -m mgie_engine.tiny FOLDER`: write tiny random checkpoints and print the settings to use them."""

from __future__ import annotations

import sys

from ..arguments import OneLineParser


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m mgie_engine.tiny",
                      description="Write tiny RANDOM-weight MGIE checkpoints in the released layout (about 16 MB) and "
                                  "print the settings that use them, with absolute paths: "
                                  "python -m mgie_engine.tiny ./tiny-ckpt >> .env")
    p.add_argument("folder", help="where to write them (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    args = p.parse_args(argv)
    from .writer import write_tiny_checkpoints  # imports torch: after the arguments are checked

    try:
        paths = write_tiny_checkpoints(args.folder, seed=args.seed)
    except OSError as err:
        print(f"python -m mgie_engine.tiny: cannot write to {args.folder} ({err.strerror or err}).", file=sys.stderr)
        return 2
    print("Wrote tiny checkpoints with RANDOM weights: edits made with them are noise, not real edits.",
          file=sys.stderr)
    print("Add these lines to .env (or export them) to use them; the paths are absolute, so the .env works "
          "from any folder:", file=sys.stderr)
    for key, value in paths.env().items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
