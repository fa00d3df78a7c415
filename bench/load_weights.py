"""How long loading the released layout takes at full size, part by part, plain copies against staged ones.

    python bench/load_weights.py [--ckpt /tmp/mgie-full] [--tokenizer-dir DIR] [--modes fast,plain]
                                 [--cache cold,warm] [--out bench/results]

Writes the full-size random checkpoint (``write_full_size.py``) under ``--ckpt`` first if it is not there,
then loads it with ``mgie_engine.models.load_models`` once per mode and page-cache state: "cold" drops the
files from the page cache first (a first start after a boot or a download), "warm" reads them from memory
(a restart). Reports seconds per part (LLM with its embeddings, edit head, CLIP, UNet, VAE, the rest) and
GB/s of checkpoint bytes; ``--small`` dry-runs it on a CPU.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from run_info import run_info, save  # noqa: E402
from write_full_size import ensure_full_size, evict_page_cache  # noqa: E402

from mgie_engine.models import load_models  # noqa: E402
from mgie_engine.settings import EngineSettings  # noqa: E402

# load_models' progress messages that start each part (in order), and the part each starts.
PART_STARTS = (("tokenizer", "tokenizer"), ("mllm.pt", "llm"), ("edit head", "edit_head"),
               ("vision tower", "clip"), ("instruct-pix2pix", "unet"), ("VAE", "vae"), ("the weights onto", "rest"))


def part_files(paths) -> dict[str, list[Path]]:
    """The checkpoint files each part reads."""
    llava, mgie = paths.mgie / "LLaVA-7B-v1", paths.mgie / "mgie_7b"
    return {"llm": [*llava.glob("pytorch_model-*.bin"), mgie / "mllm.pt"], "clip": [paths.clip / "model.safetensors"],
            "unet": [mgie / "unet.pt"], "vae": [paths.ip2p / "vae" / "diffusion_pytorch_model.safetensors"]}


def timed_load(settings: EngineSettings, staged: bool) -> tuple[float, dict[str, float]]:
    """One load: total seconds and seconds per part (the device synchronized at each part's start)."""
    marks: list[tuple[str, float]] = []

    def mark(message: str) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        part = next((name for prefix, name in PART_STARTS if message.startswith(prefix)), None)
        if part is not None and all(part != seen for seen, _ in marks):
            marks.append((part, time.perf_counter()))
        print(f"  {time.perf_counter() - started:7.2f} s  {message}", flush=True)

    started = time.perf_counter()
    models = load_models(settings, progress=mark, staged=staged)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    total = time.perf_counter() - started
    ends = [t for _, t in marks[1:]] + [started + total]
    parts = {name: end - begin for (name, begin), end in zip(marks, ends, strict=True)}
    parts["before_tokenizer"] = marks[0][1] - started if marks else 0.0
    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return total, parts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/mgie-full"), help="where the full-size checkpoint is (or goes)")
    p.add_argument("--tokenizer-dir", type=Path, default=None)
    p.add_argument("--modes", default="fast,plain", help="fast (staged copies), plain (one .to per tensor)")
    p.add_argument("--cache", default="cold,warm", help="page cache before each load: cold (dropped), warm")
    p.add_argument("--small", action="store_true", help="shrunken dims, for a dry run on a CPU")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()

    started = time.perf_counter()
    paths = ensure_full_size(args.ckpt, args.small, args.tokenizer_dir)
    print(f"checkpoint ready in {time.perf_counter() - started:.0f} s at {args.ckpt}", flush=True)
    files = part_files(paths)
    gb = {part: sum(f.stat().st_size for f in fs) / 1e9 for part, fs in files.items()}
    settings = EngineSettings(ckpt_dir=str(paths.mgie), ip2p=str(paths.ip2p), clip=str(paths.clip))
    report = run_info(ckpt=str(args.ckpt), small=args.small, modes=args.modes, cache=args.cache,
                      dtype=str(settings.torch_dtype()).removeprefix("torch."), device=str(settings.torch_device()))
    report.update(checkpoint_gb=gb, total_gb=sum(gb.values()), loads=[], complete=False)
    name = "load-weights" + ("-small" if args.small else "")
    for cache in args.cache.split(","):
        for mode in args.modes.split(","):
            if cache == "cold":
                evict_page_cache(args.ckpt)
            print(f"load: {mode} copies, {cache} page cache", flush=True)
            total, parts = timed_load(settings, staged=mode == "fast")
            run = {"mode": mode, "cache": cache, "seconds": total, "parts_seconds": parts,
                   "gb_per_second": report["total_gb"] / total,
                   "parts_gb_per_second": {k: gb[k] / parts[k] for k in gb if parts.get(k)}}
            report["loads"].append(run)
            print(f"{mode:>5} / {cache}: {total:.2f} s, {run['gb_per_second']:.2f} GB/s; "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()), flush=True)
            save(report, args.out, name)
    report["complete"] = True
    print("wrote", save(report, args.out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
