"""Write docs/compare-example.png: one edit on the tiny RANDOM-weight checkpoint, shown by the bot's own
Compare code (bot/compare.py). The weights are random, so the "after" is noise: the picture shows what
users see when they press Compare, not what MGIE can do.

    PYTHONPATH=. .venv/bin/python docs/make_compare_example.py [--output docs/compare-example.png]

Runs on the CPU in well under a minute (a 256x192 picture, 10 steps).
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from bot import i18n
from bot.compare import side_by_side
from mgie_engine.png import encode_png


def scene(width: int = 256, height: int = 192) -> Image.Image:
    """A simple drawn landscape (sky, sun, hills, a house): something recognisable as the "before"."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for y in range(height):  # sky: light blue at the horizon, deeper above
        t = y / height
        draw.line([(0, y), (width, y)], fill=(int(70 + 120 * t), int(130 + 90 * t), int(220 + 30 * t)))
    draw.ellipse([190, 20, 230, 60], fill=(255, 225, 120))
    draw.ellipse([-60, 110, 180, 260], fill=(70, 140, 70))
    draw.ellipse([100, 120, 330, 260], fill=(50, 115, 55))
    draw.rectangle([60, 105, 110, 145], fill=(200, 170, 130))
    draw.polygon([(55, 108), (85, 82), (115, 108)], fill=(150, 60, 50))
    draw.rectangle([78, 122, 92, 145], fill=(90, 60, 40))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("compare-example.png"))
    args = parser.parse_args()

    from mgie_engine.models import load_models
    from mgie_engine.pipeline import EditRequest, MgiePipeline
    from mgie_engine.settings import EngineSettings
    from mgie_engine.tiny import write_tiny_checkpoints

    with tempfile.TemporaryDirectory() as folder:
        paths = write_tiny_checkpoints(folder, seed=0)
        models = load_models(EngineSettings(ckpt_dir=str(paths.mgie), ip2p=str(paths.ip2p), clip=str(paths.clip),
                                            device="cpu"))
        result = MgiePipeline(models, max_side=256)(EditRequest(
            image=scene(), instruction="make the sky a sunset", seed=13331, text_cfg=7.0, image_cfg=2.0, steps=10))
    before = io.BytesIO()
    scene().save(before, "PNG")
    labels = (i18n.text("compare.before"), i18n.text("compare.after"))
    args.output.write_bytes(encode_png(side_by_side(before.getvalue(), encode_png(result.image), labels)))
    print(f"wrote {args.output} (tiny random-weight checkpoint: the 'after' is noise)")


if __name__ == "__main__":
    main()
