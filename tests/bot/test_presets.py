"""Tests for bot.presets; every image is drawn here with PIL/numpy so the expectations never depend on files."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image, ImageDraw

from bot.presets import (
    MIN_GUIDED_IMAGE_CFG,
    PRESET_CHOICES,
    PRESETS,
    STRONG_TEXT_POINT,
    CfgChoice,
    choose_guidance,
    edge_density,
    instruction_complexity,
)

LONG_MULTI_PART = ("Replace the grey sky with a dramatic orange sunset, add a flock of birds flying over the "
                   "mountains, then make the lake reflect the warm light and turn the pine trees dark green.")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def flat(size: tuple[int, int] = (64, 48), colour: tuple[int, int, int] = (128, 128, 128)) -> Image.Image:
    return Image.new("RGB", size, colour)


def noise(size: tuple[int, int] = (256, 192), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def checkerboard(side: int = 256, cell: int = 4) -> Image.Image:
    cells = (np.indices((side, side)) // cell).sum(axis=0) % 2
    return Image.fromarray((cells * 255).astype(np.uint8))


def scene(width: int, height: int) -> Image.Image:
    """A sky, hills, a sun and a few fence posts, drawn in proportion so any size shows the same picture."""
    im = Image.new("RGB", (width, height), (120, 170, 230))
    d = ImageDraw.Draw(im)
    d.ellipse([0.70 * width, 0.10 * height, 0.85 * width, 0.30 * height], fill=(250, 220, 80))
    d.polygon([(0, 0.65 * height), (0.4 * width, 0.45 * height), (width, 0.7 * height), (width, height),
               (0, height)], fill=(60, 130, 60))
    for i in range(8):
        x = (0.1 + 0.1 * i) * width
        d.rectangle([x, 0.75 * height, x + 0.02 * width, 0.95 * height], fill=(90, 60, 30))
    return im


# --- presets ---------------------------------------------------------------------------------------------


def test_preset_table():
    assert PRESETS == {"preserve": (7.0, 2.0), "balanced": (7.5, 1.5), "dramatic": (8.5, 0.7)}
    assert PRESET_CHOICES == ("auto", "preserve", "balanced", "dramatic")


@pytest.mark.parametrize("name", ["preserve", "balanced", "dramatic"])
def test_named_presets_return_their_values(name):
    g = choose_guidance(name, noise(), LONG_MULTI_PART)
    assert isinstance(g, CfgChoice)
    assert (g.text_cfg, g.image_cfg, g.preset) == (*PRESETS[name], name)
    assert f"{PRESETS[name][0]:.1f}" in g.reason and f"{PRESETS[name][1]:.1f}" in g.reason


def test_preset_name_is_forgiving_about_case_and_spaces():
    assert choose_guidance(" Preserve ", flat(), "x").preset == "preserve"


def test_dramatic_reason_says_guidance_is_off():
    reason = choose_guidance("dramatic", flat(), "make it red").reason
    assert "0.7" in reason and "guidance off" in reason


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError) as err:
        choose_guidance("wild", flat(), "make it red")
    for choice in PRESET_CHOICES:
        assert choice in str(err.value)


def test_unknown_preset_is_rejected_even_with_both_overrides():
    with pytest.raises(ValueError):
        choose_guidance("wild", flat(), "x", text_cfg=7.0, image_cfg=1.5)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_override_is_rejected(bad):
    with pytest.raises(ValueError, match="finite"):
        choose_guidance("auto", flat(), "x", text_cfg=bad)


# --- auto ------------------------------------------------------------------------------------------------


def test_simple_scene_short_instruction_is_preserve():
    g = choose_guidance("auto", flat(), "make it red")
    assert (g.text_cfg, g.image_cfg, g.preset) == (7.0, 2.0, "auto")
    assert "simple scene" in g.reason and "short instruction (3 words)" in g.reason
    assert "(1 word)" in choose_guidance("auto", flat(), "sepia").reason


@pytest.mark.parametrize("image", [noise(), checkerboard()], ids=["noise", "checkerboard"])
def test_busy_scene_long_multi_part_instruction_leans_to_text(image):
    g = choose_guidance("auto", image, LONG_MULTI_PART)
    assert g.text_cfg >= 8.0
    assert MIN_GUIDED_IMAGE_CFG <= g.image_cfg <= 1.5
    assert (g.text_cfg, g.image_cfg) == STRONG_TEXT_POINT


def test_middle_cases_fall_between():
    busy_short = choose_guidance("auto", noise(), "make it red")
    simple_long = choose_guidance("auto", flat(), LONG_MULTI_PART)
    for g in (busy_short, simple_long):
        assert 7.0 < g.text_cfg < 8.5 and 1.2 < g.image_cfg < 2.0
    # The instruction weighs more than the scene (the study ties text strength to the edit asked for).
    assert simple_long.text_cfg > busy_short.text_cfg


def test_reason_mentions_the_numbers():
    g = choose_guidance("auto", noise(), LONG_MULTI_PART)
    density = f"{edge_density(noise()):.0%}"
    for part in (density, "33 words", "4 edits", f"text {g.text_cfg:.1f}", f"image {g.image_cfg:.1f}"):
        assert part in g.reason, part
    assert g.reason.startswith("auto:") and g.reason.endswith(".") and g.reason.count(". ") == 0


# --- overrides -------------------------------------------------------------------------------------------


def test_text_override_keeps_the_auto_image_value():
    g = choose_guidance("auto", flat(), "make it red", text_cfg=9.25)
    assert (g.text_cfg, g.image_cfg, g.preset) == (9.25, 2.0, "auto")
    assert "text 9.25 set by hand" in g.reason and "image 2.0" in g.reason


def test_image_override_on_a_named_preset():
    g = choose_guidance("balanced", flat(), "x", image_cfg=1.8)
    assert (g.text_cfg, g.image_cfg, g.preset) == (7.5, 1.8, "balanced")
    assert "image 1.8 set by hand" in g.reason and "text 7.5" in g.reason


def test_both_overrides_make_it_custom():
    g = choose_guidance("dramatic", noise(), LONG_MULTI_PART, text_cfg=6, image_cfg=1.25)
    assert (g.text_cfg, g.image_cfg, g.preset) == (6.0, 1.25, "custom")
    assert "by hand" in g.reason and "6.0" in g.reason and "1.25" in g.reason
    assert isinstance(g.text_cfg, float)


def test_hand_set_image_below_one_is_kept_but_explained():
    g = choose_guidance("auto", flat(), "make it red", image_cfg=0.5)
    assert g.image_cfg == 0.5 and "guidance off" in g.reason


# --- edge density ----------------------------------------------------------------------------------------


def test_edge_density_extremes():
    assert edge_density(flat()) == 0.0
    assert edge_density(noise()) > 0.8
    assert edge_density(checkerboard()) > 0.6
    assert 0.0 < edge_density(scene(512, 384)) < 0.15


def test_edge_density_is_roughly_scale_invariant():
    big = scene(1024, 768)
    small = big.resize((512, 384), Image.Resampling.LANCZOS)
    assert abs(edge_density(big) - edge_density(small)) < 0.05
    assert abs(edge_density(scene(2000, 1500)) - edge_density(scene(400, 300))) < 0.05
    textured = checkerboard(1024, 16)
    assert abs(edge_density(textured) - edge_density(textured.resize((512, 512)))) < 0.05


@pytest.mark.parametrize("size", [(1, 1), (1, 500), (500, 1), (3000, 2), (2, 3000), (2, 2)])
def test_tiny_and_thin_images(size):
    for image in (flat(size), noise(size)):
        assert 0.0 <= edge_density(image) <= 1.0
        g = choose_guidance("auto", image, LONG_MULTI_PART)
        assert 7.0 <= g.text_cfg <= 8.5


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "1", "L", "F", "CMYK"])
def test_image_modes(mode):
    white = (255, 255, 255)  # exactly in every palette, so 'P' and '1' do not dither it
    assert edge_density(flat(colour=white).convert(mode)) == 0.0
    assert edge_density(noise().convert(mode)) > 0.5


@pytest.mark.parametrize("dtype", [np.uint16, np.int32], ids=["I;16", "I"])
def test_sixteen_bit_is_scaled_not_clipped(dtype):
    values = np.full((64, 64), 30000, dtype=dtype)
    values[:, 32:] = 60000  # clipped to 255 on both sides, this edge would vanish
    assert edge_density(Image.fromarray(values)) > 0.0
    assert edge_density(Image.fromarray(values[:, :32].copy())) == 0.0
    grey_noise = np.asarray(noise().convert("L"), dtype=dtype) * 257
    assert edge_density(Image.fromarray(grey_noise)) == edge_density(noise().convert("L"))


def test_transparent_pixels_are_flattened_on_white():
    im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    im.paste((255, 255, 255, 255), (0, 0, 32, 64))
    assert edge_density(im) == 0.0


# --- instruction complexity ------------------------------------------------------------------------------


def test_instruction_complexity_ends():
    assert instruction_complexity("make it red") == 0.0
    assert instruction_complexity("Make the tree leaves green") == 0.0
    assert instruction_complexity("") == 0.0
    assert instruction_complexity(LONG_MULTI_PART) > 0.9
    one_long_clause = "make the old wooden boat in the middle of the calm lake look like it was painted " * 2
    assert 0.3 < instruction_complexity(one_long_clause) < 0.6
    assert 0.3 < instruction_complexity("red hat, blue coat, green shoes, yellow scarf") < 0.6


def test_cjk_instructions():
    short = instruction_complexity("空を夕焼けにして")
    long_ = instruction_complexity("把天空变成橙色的日落，然后让湖面反射温暖的光，再把远处的树木变成深绿色、给山顶加上积雪")
    assert short == 0.0
    assert long_ > 0.5
    g = choose_guidance("auto", flat(), "把天空变成橙色的日落，然后让湖面反射温暖的光")
    assert g.text_cfg > 7.0 and "~10 words" in g.reason and "2 edits" in g.reason


def test_korean_counts_by_spaces():
    assert instruction_complexity("하늘을 빨갛게 만들어") == 0.0


# --- properties ------------------------------------------------------------------------------------------

_TOKENS = st.sampled_from(["make", "the", "sky", "red", "and", "an", "d", "then", "th", "en", ",", ".", "，",
                           "然后", "天空", "红", "の", "don't", "3.5", " "])
_INSTRUCTIONS = st.one_of(st.text(max_size=60), st.lists(_TOKENS, max_size=40).map(lambda t: "".join(t)),
                          st.lists(_TOKENS, max_size=40).map(" ".join))


def _random_image(width: int, height: int, contrast: int, seed: int) -> Image.Image:
    """Noise of a given contrast (1..255 levels), so densities spread over the whole range, thin sizes too."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.integers(0, contrast + 1, (height, width)) + 128 - contrast // 2).astype(np.uint8))


_IMAGES = st.one_of(
    arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24)), elements=st.integers(0, 255)).map(
        Image.fromarray),
    st.builds(_random_image, st.integers(1, 300), st.integers(1, 40), st.integers(1, 255), st.integers(0, 2**32)),
)


def _auto_bounds(g: CfgChoice) -> None:
    assert 7.0 <= g.text_cfg <= 8.5 and MIN_GUIDED_IMAGE_CFG <= g.image_cfg <= 2.0
    assert round(g.text_cfg, 1) == g.text_cfg and round(g.image_cfg, 1) == g.image_cfg


@FAST
@given(_INSTRUCTIONS, _INSTRUCTIONS)
def test_longer_instruction_never_weakens_text(base, extra):
    assert 0.0 <= instruction_complexity(base) <= 1.0
    assert instruction_complexity(base) <= instruction_complexity(base + extra)
    image = checkerboard(32, 4)
    a, b = choose_guidance("auto", image, base), choose_guidance("auto", image, base + extra)
    _auto_bounds(a)
    assert a.text_cfg <= b.text_cfg and a.image_cfg >= b.image_cfg


@FAST
@given(_IMAGES, _IMAGES, _INSTRUCTIONS, _INSTRUCTIONS)
def test_more_edges_and_words_never_weaken_text(im1, im2, base, extra):
    if edge_density(im1) > edge_density(im2):
        im1, im2 = im2, im1
    a, b = choose_guidance("auto", im1, base), choose_guidance("auto", im2, base + extra)
    _auto_bounds(a)
    _auto_bounds(b)
    assert a.text_cfg <= b.text_cfg and a.image_cfg >= b.image_cfg
    assert a.reason.startswith("auto:")
