"""The README's preview sequence, made by the bot: one /edit on the tiny random-weight checkpoint, run by the
real bot against the loopback fake Discord, its progress message's live previews and result saved as one
labelled strip.

    python tools/preview_sequence.py [--out docs/preview-sequence.png] [--steps 100] [--frames 6]

The tiny checkpoint's weights are random, so the pictures are noise (the strip says so): what it shows is
the sequence a user sees, not a real edit.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import sys
import tempfile
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "support")]

LABEL = "tiny random-weight checkpoint: noise"
TILE = 256
PAD = 8
CAPTION = 18


def pick(items: list, count: int) -> list:
    """``count`` items spread evenly over ``items``, first and last included."""
    if len(items) <= count:
        return items
    return [items[round(k * (len(items) - 1) / (count - 1))] for k in range(count)]


async def run_bot(steps: int, preview_seconds: float) -> tuple[bytes, list[tuple[str, bytes]], bytes]:
    """(input PNG, [(progress line, preview JPEG)...], result PNG) from one edit through the bot."""
    from botharness import basic_world, bot_running, make_config, png_bytes
    from conftest import tiny_settings
    from fakediscord import FakeDiscord

    from bot.discord_endpoints import apply_endpoints
    from mgie_engine.models import load_models
    from mgie_engine.settings import EngineSettings
    from mgie_engine.tiny import write_tiny_checkpoints

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_tiny_checkpoints(Path(tmp) / "tiny", seed=0, plant_visual_tokens=True)
        models = load_models(tiny_settings(paths))
        async with FakeDiscord(heartbeat_interval=0.5) as fake:
            apply_endpoints(fake.api_base, fake.gateway_url)
            try:
                fake, guild, channel, alice = basic_world(fake)
                config = make_config(fake, Path(tmp) / "data", [guild.id], progress_interval=0.25,
                                     engine=EngineSettings(device="cpu", max_side=128, preview_seconds=preview_seconds))
                source = png_bytes(128, 96, seed=3)
                async with bot_running(fake, config, models):
                    att = fake.upload_user_attachment(channel, "input.png", source)
                    inter = await fake.slash(alice, channel, "edit", {"image": att, "steps": steps,
                                                                      "instruction": "make the sky a sunset"})
                    msg = await fake.wait_for_original(inter, lambda m: m.embeds and m.attachments, timeout=300)
            finally:
                apply_endpoints(None, None)
            frames, seen = [], set()
            for version in msg.history:
                for a in version.get("attachments", []):
                    if a["filename"] == "preview.jpg" and a["id"] not in seen:
                        seen.add(a["id"])
                        line = (version.get("content") or "").splitlines()[0] if version.get("content") else ""
                        frames.append((line, fake.state.attachments[int(a["id"])].data))
            return source, frames, msg.attachments[0].data


def caption(line: str) -> str:
    step = re.search(r"step (\d+)/(\d+)", line)
    return f"shown at step {step.group(1)}/{step.group(2)}" if step else "preview"


def strip(source: bytes, frames: list[tuple[str, bytes]], result: bytes, count: int) -> PIL.Image.Image:
    tiles = [("input", source)] + [(caption(line), data) for line, data in pick(frames, count)] + [("result", result)]
    images = []
    for _, data in tiles:
        image = PIL.Image.open(io.BytesIO(data)).convert("RGB")
        scale = TILE / max(image.size)
        images.append(image.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.NEAREST))
    height = max(i.height for i in images)
    out = PIL.Image.new("RGB", (PAD + sum(i.width + PAD for i in images), CAPTION + PAD + height + CAPTION + PAD),
                        (255, 255, 255))
    draw = PIL.ImageDraw.Draw(out)
    draw.text((PAD, 4), f"Live previews on the progress message, as the bot sent them ({LABEL})", fill=(0, 0, 0))
    x = PAD
    for (label, _), image in zip(tiles, images, strict=True):
        out.paste(image, (x, CAPTION + PAD))
        draw.text((x, CAPTION + PAD + height + 4), label, fill=(0, 0, 0))
        x += image.width + PAD
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "preview-sequence.png")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--frames", type=int, default=6, help="previews shown in the strip (spread over those sent)")
    p.add_argument("--preview-seconds", type=float, default=0.1, help="the worker's preview interval")
    args = p.parse_args()
    source, frames, result = asyncio.run(run_bot(args.steps, args.preview_seconds))
    if not frames:
        raise SystemExit("the bot sent no preview (was the edit shorter than the preview interval?)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    strip(source, frames, result, args.frames).quantize(256).save(args.out, format="PNG", optimize=True)
    print(f"{len(frames)} previews sent; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
