"""Before / after: an edit's input and its result side by side in one labelled image (pillow only).

Pure CPU work on stored images; callers run it off the event loop (bot/comparison.py uses the decode
threads of :class:`bot.intake.IntakeSlots`). Both pictures are shown at one height, the label of each
above it, and the whole is capped at :data:`MAX_WIDTH` x :data:`MAX_HEIGHT` so it stays a small upload.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mgie_engine.images import encode_under, load_image

log = logging.getLogger(__name__)

MAX_HEIGHT = 768
"""The pictures' common height at most (they are shown at the taller one's height up to this)."""
MAX_WIDTH = 2048
"""The whole comparison's width at most: wider pairs are scaled down together."""
BACKGROUND = (30, 31, 34)
TEXT = (242, 243, 245)

# Fonts tried in order for the labels: CJK-capable ones first (Japanese labels), then DejaVu (accents);
# a font is used only when it has every glyph of both labels, else the English labels are drawn.
FONT_FILES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/opentype/ipafont-gothic/ipagp.ttf",
    "/usr/share/fonts/truetype/fonts-japanese-gothic.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/usr/share/fonts/TTF/DejaVuSans-Bold.ttf",
)
_MISSING = "\U0010fffd"  # a private-use code point no font draws: what a missing glyph looks like


def _font(path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is None:
        return ImageFont.load_default(size)
    return ImageFont.truetype(path, size)


def _covers(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> bool:
    """Whether ``font`` has a glyph for every character of ``text`` (a missing one renders as .notdef)."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        return text.isascii()
    notdef = bytes(font.getmask(_MISSING))
    return all(ch.isspace() or bytes(font.getmask(ch)) != notdef for ch in text)


@functools.cache
def label_font_path(text: str) -> str | None:
    """The first installed font that draws all of ``text``; ``None`` for Pillow's own (Latin) font.

    Raises LookupError when no font has all its glyphs.
    """
    for path in (*(p for p in FONT_FILES if Path(p).is_file()), None):
        try:
            if _covers(_font(path, 24), text):
                return path
        except OSError as err:
            log.warning("label font %s unusable: %s", path, err)
    raise LookupError(f"no installed font draws {text!r}")


def _labels_and_font(labels: tuple[str, str], fallback: tuple[str, str]) -> tuple[tuple[str, str], str | None]:
    try:
        return labels, label_font_path("".join(labels))
    except LookupError:
        log.info("no font draws the labels %r; drawing %r instead", labels, fallback)
        return fallback, label_font_path("".join(fallback))


def _sizes(before: tuple[int, int], after: tuple[int, int], gap: int) -> tuple[int, int, int]:
    """(height, before width, after width): one height for both, within MAX_HEIGHT and MAX_WIDTH."""
    height = min(max(before[1], after[1]), MAX_HEIGHT)
    widths = [max(1, round(w * height / h)) for w, h in (before, after)]
    if sum(widths) + gap > MAX_WIDTH:
        scale = (MAX_WIDTH - gap) / sum(widths)
        height = max(1, int(height * scale))
        widths = [max(1, int(w * scale)) for w in widths]
    return height, widths[0], widths[1]


def side_by_side(before: bytes, after: bytes, labels: tuple[str, str],
                 fallback_labels: tuple[str, str] = ("Before", "After")) -> Image.Image:
    """One RGB image: ``before`` left and ``after`` right at the same height, each under its label.

    ``labels`` are drawn when an installed font has their glyphs, else ``fallback_labels`` (ASCII).
    Raises mgie_engine's BadImageError when a stored image cannot be decoded.
    """
    pictures = [load_image(data) for data in (before, after)]
    gap = max(4, min(pictures[0].height, pictures[1].height, MAX_HEIGHT) // 48)
    height, *widths = _sizes(pictures[0].size, pictures[1].size, gap)
    labels, font_path = _labels_and_font(labels, fallback_labels)
    size = max(11, min(36, height // 12))
    band = round(size * 1.7)
    canvas = Image.new("RGB", (widths[0] + gap + widths[1], band + height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    left = 0
    for picture, width, label in zip(pictures, widths, labels, strict=True):
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.LANCZOS)
        canvas.paste(picture, (left, band))
        font_size = size
        font = _font(font_path, font_size)
        while draw.textlength(label, font=font) > width - 4 and font_size > 8:
            font_size -= 1
            font = _font(font_path, font_size)
        draw.text((left + width / 2, band / 2), label, font=font, fill=TEXT, anchor="mm")
        left += width + gap
    return canvas


def comparison_file(before: bytes, after: bytes, labels: tuple[str, str], limit_bytes: int,
                    fallback_labels: tuple[str, str] = ("Before", "After")) -> tuple[bytes, str]:
    """:func:`side_by_side` encoded for an upload of at most ``limit_bytes``: (data, "png" or "webp"/"jpg")."""
    return encode_under(side_by_side(before, after, labels, fallback_labels), limit_bytes)
