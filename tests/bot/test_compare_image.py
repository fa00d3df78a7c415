"""bot/compare.py: the side-by-side picture itself (sizes, caps, labels), without Discord."""

from __future__ import annotations

import io

import numpy as np
from conftest import make_image
from PIL import Image

from bot import compare


def png(width: int, height: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    make_image(width, height, seed).save(buf, "PNG")
    return buf.getvalue()


def test_pictures_of_different_sizes_are_shown_at_one_height_with_their_shapes_kept() -> None:
    image = compare.side_by_side(png(80, 40), png(30, 60, seed=1), ("Before", "After"))
    band = image.height - 60
    pixels = np.asarray(image)
    # 80x40 is scaled to 120x60; 30x60 stays; a gap of a few pixels between them.
    gap = image.width - 120 - 30
    assert 0 < gap <= 8 and band > 10
    right = np.asarray(Image.open(io.BytesIO(png(30, 60, seed=1))).convert("RGB"))
    assert np.array_equal(pixels[band:, 120 + gap:], right)


def test_a_large_pair_is_capped_in_width_and_height() -> None:
    image = compare.side_by_side(png(3000, 1000), png(3000, 1000, seed=1), ("Before", "After"))
    assert image.width <= compare.MAX_WIDTH
    assert image.height - image.height // 10 <= compare.MAX_HEIGHT  # pictures within the cap, plus the band
    tall = compare.side_by_side(png(300, 2000), png(300, 2000, seed=1), ("Before", "After"))
    assert tall.height <= compare.MAX_HEIGHT + 64 and tall.width < 2 * 300


def test_labels_no_installed_font_can_draw_fall_back_to_english() -> None:
    before, after = png(64, 48), png(64, 48, seed=1)
    undrawable = compare.side_by_side(before, after, ("\U000f0001", "\U000f0002"))
    english = compare.side_by_side(before, after, ("Before", "After"))
    assert np.array_equal(np.asarray(undrawable), np.asarray(english))
    other = compare.side_by_side(before, after, ("Vorher", "Nachher"))
    assert not np.array_equal(np.asarray(other), np.asarray(english))


def test_the_file_fits_the_upload_limit() -> None:
    data, ext = compare.comparison_file(png(512, 512), png(512, 512, seed=1), ("Before", "After"), 60_000)
    assert len(data) <= 60_000 and ext in ("webp", "jpg")
    data, ext = compare.comparison_file(png(64, 48), png(64, 48, seed=1), ("Before", "After"), 10 * 2**20)
    assert ext == "png" and Image.open(io.BytesIO(data)).size[1] > 48
