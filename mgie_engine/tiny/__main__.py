"""`python -m mgie_engine.tiny FOLDER`: write tiny random checkpoints and print the settings to use them."""

from __future__ import annotations

import argparse
import sys

from .writer import write_tiny_checkpoints


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mgie_engine.tiny",
                                description="Write tiny RANDOM-weight MGIE checkpoints in the released layout.")
    p.add_argument("folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = write_tiny_checkpoints(args.folder, seed=args.seed)
    print("Wrote tiny checkpoints with RANDOM weights: edits made with them are noise, not real edits.",
          file=sys.stderr)
    print("Add these lines to .env (or export them) to use them:", file=sys.stderr)
    for key, value in paths.env().items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
