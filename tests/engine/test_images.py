"""Tests for mgie_engine.images; every input is generated here with PIL so no binary fixtures drift."""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mgie_engine import images, png
from mgie_engine.errors import BadImageError
from mgie_engine.images import (
    MAX_ASPECT_RATIO,
    MAX_INPUT_BYTES,
    MAX_INPUT_PIXELS,
    SUPPORTED_FORMATS,
    encode_under,
    fit_size,
    load_image,
    prepare_image,
    snap_size,
)
from mgie_engine.png import encode_png

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def close_to(actual: tuple[int, ...], expected: tuple[int, ...], tol: int) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def quadrant_image(width: int = 64, height: int = 32) -> Image.Image:
    """Red top-left quadrant on blue, so any rotation or flip moves the red block somewhere else."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height // 2))
    return image


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG that declares a huge size but carries almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00"))
        + png_chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------------------------- constants


def test_constants() -> None:
    assert SUPPORTED_FORMATS == ("PNG", "JPEG", "WEBP", "GIF")
    assert MAX_INPUT_BYTES == 25 * 1024 * 1024
    assert MAX_INPUT_PIXELS == 40_000_000
    assert MAX_ASPECT_RATIO == 16


# ---------------------------------------------------------------------------------------------- load_image


@pytest.mark.parametrize(
    ("fmt", "params", "tol"),
    [
        ("PNG", {}, 0),
        ("JPEG", {"quality": 95}, 12),
        ("WEBP", {"lossless": True}, 0),
        ("WEBP", {"quality": 90}, 20),
        ("GIF", {}, 0),
    ],
)
def test_round_trip_each_format(fmt: str, params: dict[str, object], tol: int) -> None:
    source = quadrant_image()
    image = load_image(encode(source, fmt, **params))
    assert image.mode == "RGB"
    assert image.size == source.size
    assert close_to(image.getpixel((8, 8)), RED, tol)
    assert close_to(image.getpixel((56, 24)), BLUE, tol)


def test_path_and_bytes_decode_identically(tmp_path: Path) -> None:
    data = encode(quadrant_image(), "PNG")
    path = tmp_path / "in.png"
    path.write_bytes(data)
    from_bytes = np.asarray(load_image(data))
    assert np.array_equal(np.asarray(load_image(path)), from_bytes)
    assert np.array_equal(np.asarray(load_image(str(path))), from_bytes)
    assert np.array_equal(np.asarray(load_image(bytearray(data))), from_bytes)


def test_missing_path_is_bad_image(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="couldn't open"):
        load_image(tmp_path / "nope.png")


def test_non_bytes_input_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count descriptors")
def test_no_file_handles_left_open(tmp_path: Path) -> None:
    path = tmp_path / "in.gif"
    path.write_bytes(encode(quadrant_image(), "GIF"))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        load_image(path)
        with pytest.raises(BadImageError):
            load_image(tmp_path / "bad.png")
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize(
    ("orientation", "red_at"),
    [
        (1, (8, 8)),  # untouched: red stays top-left of the 64x32 image
        (6, (24, 8)),  # rotate 90 deg clockwise: top-left -> top-right of the 32x64 result
        (8, (8, 56)),  # rotate 90 deg counter-clockwise: top-left -> bottom-left
    ],
)
def test_exif_orientation_is_applied(fmt: str, orientation: int, red_at: tuple[int, int]) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    params: dict[str, object] = {"exif": exif.tobytes()}
    if fmt == "JPEG":
        params["quality"] = 95
    if fmt == "WEBP":
        params["lossless"] = True
    image = load_image(encode(quadrant_image(), fmt, **params))
    assert image.size == ((64, 32) if orientation == 1 else (32, 64))
    assert close_to(image.getpixel(red_at), RED, 12)
    red_pixels = np.all(np.abs(np.asarray(image).astype(int) - RED) <= 40, axis=-1)
    assert 0.2 < red_pixels.mean() < 0.3  # one quadrant, only one


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_rgba_is_flattened_on_white(fmt: str) -> None:
    source = Image.new("RGBA", (4, 4), (*RED, 255))
    source.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black must show as white
    source.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    image = load_image(encode(source, fmt, lossless=True) if fmt == "WEBP" else encode(source, fmt))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == WHITE
    assert close_to(image.getpixel((1, 0)), (127, 127, 127), 2)
    assert image.getpixel((2, 2)) == RED


def test_la_is_flattened_on_white() -> None:
    source = Image.new("LA", (4, 4), (30, 255))
    source.putpixel((0, 0), (0, 0))
    image = load_image(encode(source, "PNG"))
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((3, 3)) == (30, 30, 30)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_flattened_on_white(fmt: str) -> None:
    source = Image.new("P", (4, 4), 1)
    source.putpalette([0, 0, 0, *RED] + [0] * (254 * 3))
    source.putpixel((0, 0), 0)
    image = load_image(encode(source, fmt, transparency=0))
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((3, 3)) == RED


def test_cmyk_jpeg_becomes_rgb() -> None:
    source = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta + yellow = red
    source.paste((255, 0, 255, 0), (8, 0, 16, 16))  # cyan + yellow = green
    image = load_image(encode(source, "JPEG", quality=95))
    assert image.mode == "RGB"
    assert close_to(image.getpixel((2, 8)), RED, 12)
    assert close_to(image.getpixel((13, 8)), GREEN, 12)


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 32768, 65535, 257 * 200]], dtype=np.uint16)
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    image = load_image(encode(source, "PNG"))
    assert image.mode == "RGB"
    greys = [image.getpixel((x, 0)) for x in range(4)]
    assert greys[0] == BLACK
    assert close_to(greys[1], (128, 128, 128), 1)  # clipping would give 255 here
    assert greys[2] == WHITE
    assert greys[3] == (200, 200, 200)


def test_mode_i_is_treated_as_sixteen_bit() -> None:
    # Older PIL decoded 16-bit grey PNGs as "I" (Pillow 13 can't write it, so use prepare_image's path).
    values = np.full((8, 16), 32768, dtype=np.int32)
    values[:, 8:] = 65535
    image = prepare_image(Image.fromarray(values))
    assert image.mode == "RGB"
    assert close_to(image.getpixel((2, 4)), (128, 128, 128), 1)
    assert image.getpixel((13, 4)) == WHITE


def test_one_bit_becomes_black_and_white() -> None:
    source = Image.new("1", (8, 8), 0)
    source.putpixel((1, 1), 1)
    image = load_image(encode(source, "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((1, 1)) == WHITE
    assert image.getpixel((0, 0)) == BLACK


def test_greyscale_becomes_rgb() -> None:
    image = load_image(encode(Image.new("L", (4, 4), 77), "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize(("fmt", "params"), [("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {})])
def test_animation_takes_first_frame(fmt: str, params: dict[str, object]) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 3
    image = load_image(data)
    assert image.size == (8, 8)
    assert image.getpixel((4, 4)) == RED


def test_random_bytes_are_not_an_image() -> None:
    data = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(BadImageError, match="not an image I can read"):
        load_image(data)


def test_unsupported_format_is_rejected() -> None:
    with pytest.raises(BadImageError, match="PNG, JPEG, WEBP or GIF"):
        load_image(encode(quadrant_image(), "BMP"))


def test_empty_bytes() -> None:
    with pytest.raises(BadImageError, match="empty"):
        load_image(b"")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(BadImageError, match="empty"):
        load_image(path)


@pytest.mark.parametrize(("fmt", "params"), [("PNG", {}), ("JPEG", {}), ("WEBP", {}), ("GIF", {})])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_files_are_rejected(fmt: str, params: dict[str, object], keep: float) -> None:
    data = encode(noise(64, 64), fmt, **params)
    with pytest.raises(BadImageError):
        load_image(data[: int(len(data) * keep)])


def test_huge_declared_size_is_rejected_from_the_header() -> None:
    data = png_header_only(100_000, 100_000)
    with pytest.raises(Image.DecompressionBombError):  # proves PIL parsed the hand-made IHDR
        Image.open(io.BytesIO(data))
    start = time.perf_counter()
    with pytest.raises(BadImageError, match="size limit is 40 megapixels"):
        load_image(data)
    assert time.perf_counter() - start < 0.5


def test_pixel_cap_below_pils_own_limit() -> None:
    # 48 MP: over our 40 MP default but under PIL's bomb threshold, so only our header check can stop it.
    data = png_header_only(8000, 6000)
    with Image.open(io.BytesIO(data)) as probe:
        assert probe.size == (8000, 6000)
    start = time.perf_counter()
    with pytest.raises(BadImageError, match=r"8000x6000 pixels\); the size limit is 40 megapixels"):
        load_image(data)
    assert time.perf_counter() - start < 0.5


def test_custom_pixel_cap() -> None:
    data = encode(quadrant_image(64, 32), "PNG")
    assert load_image(data, max_pixels=64 * 32).size == (64, 32)
    with pytest.raises(BadImageError, match="size limit"):
        load_image(data, max_pixels=64 * 32 - 1)


def test_pil_global_limit_is_not_touched() -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImageError):
        load_image(png_header_only(100_000, 100_000))
    load_image(encode(quadrant_image(), "PNG"))
    assert before == Image.MAX_IMAGE_PIXELS


def test_byte_cap(tmp_path: Path) -> None:
    data = encode(noise(32, 32), "PNG")
    assert load_image(data, max_bytes=len(data)).size == (32, 32)
    with pytest.raises(BadImageError, match="too large"):
        load_image(data, max_bytes=len(data) - 1)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(BadImageError, match="too large"):
        load_image(path, max_bytes=len(data) - 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_leak_other_errors(data: bytes) -> None:
    try:
        image = load_image(data, max_pixels=1_000_000)
    except BadImageError:
        return
    assert image.mode == "RGB"


_SEEDS = [
    encode(noise(16, 12), "PNG"),
    encode(noise(16, 12), "JPEG"),
    encode(noise(16, 12), "WEBP"),
    encode(noise(16, 12), "GIF"),
    encode(Image.new("LA", (8, 8), (3, 100)), "PNG"),
    encode(quadrant_image(16, 8), "GIF", save_all=True, append_images=[noise(16, 8)]),
]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """Valid files with a few bytes changed or cut off: these get past the magic-number check."""
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_images())
def test_mutated_images_never_leak_other_errors(data: bytes) -> None:
    try:
        image = load_image(data, max_pixels=1_000_000)
    except BadImageError:
        return
    assert image.mode == "RGB"


# ---------------------------------------------------------------------------------------------- fit_size


@pytest.mark.parametrize(
    ("size", "kwargs", "expected"),
    [
        ((1, 1), {}, (8, 8)),
        ((7, 7), {}, (8, 8)),
        ((8, 8), {}, (8, 8)),
        ((15, 1), {}, (120, 8)),  # minimal upscale keeps the 15:1 shape instead of 8x8
        ((1, 16), {}, (8, 128)),
        ((100, 60), {}, (96, 56)),  # small: no upscale, each side rounded down
        ((300, 200), {}, (296, 200)),
        ((512, 512), {}, (512, 512)),
        ((513, 512), {}, (512, 504)),  # 512 * 512 / 513 = 510.9 -> 504
        ((640, 480), {}, (512, 384)),
        ((480, 640), {}, (384, 512)),
        ((1024, 1024), {}, (512, 512)),
        ((4096, 256), {}, (512, 32)),  # exactly 16:1 is allowed
        ((1920, 1080), {"max_side": 768, "multiple": 64}, (768, 384)),
        ((1000, 1000), {"max_side": 500}, (496, 496)),  # cap is max_side rounded down to the multiple
        ((100, 100), {"max_side": 4}, (8, 8)),  # never below one multiple
        ((33, 17), {"multiple": 1}, (33, 17)),
        ((64, 64), {"multiple": 16}, (64, 64)),
        ((70, 70), {"multiple": 16}, (64, 64)),
    ],
)
def test_fit_size_table(size: tuple[int, int], kwargs: dict[str, int], expected: tuple[int, int]) -> None:
    assert fit_size(*size, **kwargs) == expected


@pytest.mark.parametrize("size", [(4000, 3), (3, 4000), (4097, 256), (17, 1)])
def test_fit_size_rejects_extreme_aspect_ratio(size: tuple[int, int]) -> None:
    with pytest.raises(BadImageError, match="16:1"):
        fit_size(*size)


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-1, 5)])
def test_fit_size_rejects_empty(size: tuple[int, int]) -> None:
    with pytest.raises(BadImageError):
        fit_size(*size)


@pytest.mark.parametrize("kwargs", [{"multiple": 0}, {"max_side": 0}])
def test_fit_size_rejects_bad_arguments(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        fit_size(100, 100, **kwargs)


@st.composite
def allowed_sizes(draw: st.DrawFn) -> tuple[int, int]:
    short = draw(st.integers(1, 20_000))
    long = draw(st.integers(short, min(20_000, MAX_ASPECT_RATIO * short)))
    return (long, short) if draw(st.booleans()) else (short, long)


@settings(max_examples=500)
@given(allowed_sizes(), st.integers(128, 2048))
def test_fit_size_properties(size: tuple[int, int], max_side: int) -> None:
    """Bounds, plus the aspect tolerance: rounding is the only distortion.

    Stated tolerance: there is one scale s for which each output side lies in [s * input, s * input + 8),
    i.e. each side is the exactly scaled side rounded down by less than one multiple. Consequently the
    relative aspect error is below 8 / shortest output side (1.6 % for a 512 px short side).
    max_side >= 16 * 8 here so the cap never has to squash a 16:1 image.
    """
    width, height = size
    out_w, out_h = fit_size(width, height, max_side=max_side)
    for side in (out_w, out_h):
        assert side % 8 == 0
        assert 8 <= side <= max(max_side, 8)
    # Interval of scales s that put each side in [out - tiny, out + 8]; the two intervals must overlap.
    eps = 1e-6
    lo = max((out_w - eps) / width, (out_h - eps) / height)
    hi = min((out_w + 8) / width, (out_h + 8) / height)
    assert lo <= hi
    assert abs((out_w / out_h) / (width / height) - 1) < 8 / min(out_w, out_h)
    if min(width, height) >= 8:  # no upscaling unless the short side is below one multiple
        assert out_w <= width and out_h <= height


@given(st.integers(1, 20_000), st.integers(1, 20_000), st.integers(1, 2048), st.sampled_from([1, 8, 16, 64]))
def test_fit_size_bounds_for_any_arguments(width: int, height: int, max_side: int, multiple: int) -> None:
    try:
        out_w, out_h = fit_size(width, height, max_side=max_side, multiple=multiple)
    except BadImageError:
        assert max(width, height) > MAX_ASPECT_RATIO * min(width, height)
        return
    for side in (out_w, out_h):
        assert side % multiple == 0
        assert multiple <= side <= max(max_side, multiple)


# ---------------------------------------------------------------------------------------------- prepare


def test_prepare_image_resizes_and_converts() -> None:
    source = Image.new("RGBA", (640, 480), (*RED, 255))
    out = prepare_image(source)
    assert out.mode == "RGB"
    assert out.size == (512, 384)
    assert out.getpixel((100, 100)) == RED


def test_prepare_image_returns_a_new_image_when_size_is_kept() -> None:
    source = Image.new("RGB", (64, 64), BLUE)
    out = prepare_image(source)
    assert out is not source
    assert out.size == (64, 64)
    out.putpixel((0, 0), RED)
    assert source.getpixel((0, 0)) == BLUE


def test_prepare_image_custom_grid() -> None:
    assert prepare_image(noise(1000, 700), max_side=256, multiple=64).size == (256, 128)


# ---------------------------------------------------------------------------------------------- working grid


def test_snap_size_keeps_few_sizes_each_near_the_fitted_one() -> None:
    step, max_side = 32, 512
    cap = max_side // step * step
    fitted = [(w, h) for w in range(8, max_side + 1, 8) for h in range(8, max_side + 1, 8)]
    snapped = set()
    for width, height in fitted:
        size = snap_size(width, height, step, max_side)
        for before, after in zip((width, height), size, strict=True):
            assert after % step == 0 and step <= after <= cap, (width, height, size)
            # off by at most half a step; a side shorter than that can only grow to one step
            assert abs(after - before) <= step // 2 or (before < step // 2 and after == step), (width, height, size)
        snapped.add(size)
    assert len(snapped) <= (max_side // step) ** 2 < len(fitted)
    assert all(snap_size(w, h, 8, max_side) == (w, h) for w, h in fitted)  # the VAE's grid changes nothing


def test_snap_size_rounds_halves_up_and_keeps_to_the_cap() -> None:
    assert snap_size(48, 80, 32, 512) == (64, 96)  # 1.5 and 2.5 steps round up (banker's rounding: 64, 64)
    assert snap_size(40, 8, 32, 512) == (32, 32)
    assert snap_size(496, 504, 32, 500) == (480, 480)  # the cap: 500 px rounded down to the step
    assert snap_size(8, 8, 256, 128) == (256, 256)  # a step above max_side: one size, the step
    with pytest.raises(ValueError):
        snap_size(64, 64, 0, 512)


# ---------------------------------------------------------------------------------------------- encoding


def test_encode_png_round_trip() -> None:
    source = noise(40, 30)
    data = encode_png(source)
    assert data.startswith(b"\x89PNG")
    assert np.array_equal(np.asarray(load_image(data)), np.asarray(source))


# Reference PNG scanline filters (spec section 9), plain loops over small images, independent of the
# numpy code under test. a = byte bpp to the left, b = byte above, c = byte above-left; 0 off the image.


def paeth_predictor(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def predict(kind: int, a: int, b: int, c: int) -> int:
    return (0, a, b, (a + b) // 2, paeth_predictor(a, b, c))[kind]


def reference_filter(rows: list[bytes], bpp: int, kind: int, prior: bytes | None = None) -> bytes:
    prev = prior if prior is not None else bytes(len(rows[0]))
    out = bytearray()
    for row in rows:
        out.append(kind)
        for i, x in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            c = prev[i - bpp] if i >= bpp else 0
            out.append((x - predict(kind, a, prev[i], c)) % 256)
        prev = row
    return bytes(out)


def reference_unfilter(data: bytes, width: int, height: int, bpp: int, prior: bytes | None = None) -> list[bytes]:
    stride = width * bpp
    assert len(data) == height * (stride + 1)
    prev = prior if prior is not None else bytes(stride)
    rows = []
    for y in range(height):
        kind, line = data[y * (stride + 1)], data[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]
        assert kind <= 4
        row = bytearray()
        for i, x in enumerate(line):
            a = row[i - bpp] if i >= bpp else 0
            c = prev[i - bpp] if i >= bpp else 0
            row.append((x + predict(kind, a, prev[i], c)) % 256)
        rows.append(bytes(row))
        prev = bytes(row)
    return rows


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split a PNG into (type, payload) chunks, checking the signature, lengths and every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert len(payload) == length
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + payload)
        chunks.append((kind, payload))
        pos += 12 + length
    assert pos == len(data)
    return chunks


def idat_stream(data: bytes) -> bytes:
    return b"".join(payload for kind, payload in png_chunks(data) if kind == b"IDAT")


_MODE_BPP = {"L": 1, "RGB": 3, "RGBA": 4}


def sample_pixels(kind: str, width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    bands = _MODE_BPP[mode]
    shape = (height, width, bands)
    if kind == "noise":
        array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    elif kind == "gradient":
        y, x = np.mgrid[0:height, 0:width]
        ramps = [x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) % 256, 255 - x % 256]
        array = np.stack(ramps[:bands], -1).astype(np.uint8)
    else:
        array = np.zeros(shape, np.uint8)
    return Image.fromarray(array[:, :, 0] if bands == 1 else array, mode)


def bench_like_image(seed: int = 3, size: int = 512, sigma: float = 20) -> Image.Image:
    """bench/mgie_bench.py's image(): a colour gradient plus normal noise (sigma 0: the smooth gradient)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([x / size, y / size, (x + y) / (2 * size)], -1) * 200 + rng.normal(0, sigma, (size, size, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def pillow_png(image: Image.Image) -> bytes:
    return encode(image, "PNG", compress_level=1, compress_type=zlib.Z_RLE)


@pytest.mark.parametrize("kind", range(5))
@pytest.mark.parametrize("bpp", [1, 3, 4])
def test_reference_filters_agree_with_pillow(kind: int, bpp: int) -> None:
    """Pillow, a separate decoder, reads each reference filter back, so the reference itself can be trusted."""
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[bpp]
    source = sample_pixels("noise", 7, 5, mode)
    rows = [row.tobytes() for row in np.asarray(source).reshape(5, 7 * bpp)]
    filtered = reference_filter(rows, bpp, kind)
    assert reference_unfilter(filtered, 7, 5, bpp) == rows
    ihdr = struct.pack(">IIBBBBB", 7, 5, 8, {1: 0, 3: 2, 4: 6}[bpp], 0, 0, 0)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(filtered))
        + png_chunk(b"IEND", b"")
    )
    with Image.open(io.BytesIO(png)) as decoded:
        assert np.array_equal(np.asarray(decoded), np.asarray(source))


@pytest.mark.parametrize("bpp", [1, 3, 4])
@pytest.mark.parametrize("content", ["noise", "gradient", "black"])
@pytest.mark.parametrize("with_prior", [False, True])
def test_paeth_filter_matches_the_spec(bpp: int, content: str, with_prior: bool) -> None:
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[bpp]
    array = np.asarray(sample_pixels(content, 7, 6, mode)).reshape(6, 7 * bpp)
    # A strip after the first starts from the previous strip's last raw row, not from zeros.
    rows, prior = (array[1:], array[0]) if with_prior else (array[:5], np.zeros(7 * bpp, np.uint8))
    got = png._paeth_filter(rows, prior, bpp)
    assert got.shape == (5, 1 + 7 * bpp)
    raw = [row.tobytes() for row in rows]
    assert got.tobytes() == reference_filter(raw, bpp, 4, prior.tobytes())
    assert reference_unfilter(got.tobytes(), 7, 5, bpp, prior.tobytes()) == raw


def test_paeth_filter_takes_every_predictor_and_breaks_ties_in_spec_order() -> None:
    # Rows picked so each pixel exercises one case; p = a + b - c.
    cases = [  # (a, b, c) -> expected predictor
        ((10, 20, 10), 20),  # pa = 10, pb = 0: b
        ((20, 10, 10), 20),  # pa = 0: a
        ((10, 20, 30), 10),  # p = 0, pa = 10, pb = 20, pc = 30: a
        ((250, 5, 128), 128),  # p = 127, pa = 123, pb = 122, pc = 1: c
        ((100, 100, 100), 100),  # all tie: a
        ((0, 255, 255), 0),  # p = 0, pa = 0: a (no uint8 overflow in a + b)
        ((255, 0, 255), 0),  # p = 0, pa = 255, pb = 0: b
    ]
    for (a, b, c), expected in cases:
        assert paeth_predictor(a, b, c) == expected
        prior = np.array([c, b], np.uint8)  # bpp 1: the row above is c, b
        row = np.array([[a, 77]], np.uint8)  # x = 77 sits right of a, under b
        got = png._paeth_filter(row, prior, 1)
        assert got[0, 2] == (77 - expected) % 256, (a, b, c)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
@pytest.mark.parametrize("content", ["noise", "gradient", "black"])
@pytest.mark.parametrize(
    "size",
    [(1, 1), (1, 37), (37, 1), (7, 5), (333, 129), (61, 2049)],  # the last is split into several strips
)
def test_encode_png_fast_path_round_trips(mode: str, content: str, size: tuple[int, int]) -> None:
    width, height = size
    source = sample_pixels(content, width, height, mode, seed=width * height)
    data = encode_png(source)
    chunks = png_chunks(data)
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    colour_type = {"L": 0, "RGB": 2, "RGBA": 6}[mode]
    assert chunks[0][1] == struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    # One zlib stream: zlib.decompress checks the header, that the last block is final, and the adler32.
    filtered = zlib.decompress(idat_stream(data))
    assert len(filtered) == height * (1 + width * _MODE_BPP[mode])
    with Image.open(io.BytesIO(data)) as decoded:
        decoded.verify()
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.mode == mode
        assert decoded.size == size
        assert np.array_equal(np.asarray(decoded), np.asarray(source))
    if width * height <= 500:
        rows = reference_unfilter(filtered, width, height, _MODE_BPP[mode])
        assert b"".join(rows) == source.tobytes()


def test_encode_png_splits_large_images_into_strips(monkeypatch: pytest.MonkeyPatch) -> None:
    strips: list[int] = []
    real = png._deflate_strip

    def counting(rows: np.ndarray, prior: np.ndarray, bpp: int, last: bool) -> tuple[bytes, int, int]:
        strips.append(len(rows))
        return real(rows, prior, bpp, last)

    monkeypatch.setattr(png, "_deflate_strip", counting)
    source = bench_like_image()
    data = encode_png(source)
    assert strips == [64] * 8  # 512x512 RGB: even work for 2 or 4 threads
    assert np.array_equal(np.asarray(load_image(data)), np.asarray(source))

    strips.clear()
    encode_png(noise(100, 100))  # 30 KB: one strip, on the calling thread
    assert strips == [100]


def test_encode_png_output_does_not_depend_on_thread_count(monkeypatch: pytest.MonkeyPatch) -> None:
    source = bench_like_image(size=256)
    default = encode_png(source)
    with ThreadPoolExecutor(max_workers=1) as single:
        monkeypatch.setattr(png, "cpu_pool", lambda name: single)
        assert encode_png(source) == default


def test_encode_png_from_many_threads_at_once() -> None:
    """The worker encodes results on its own CPU pool, so several calls share the strip pool."""
    sources = [sample_pixels("noise", 300, 260 + i, seed=i) for i in range(6)]
    results: dict[int, bytes] = {}
    start = threading.Barrier(len(sources))

    def run(i: int) -> None:
        start.wait()
        results[i] = encode_png(sources[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sources))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, source in enumerate(sources):
        assert np.array_equal(np.asarray(load_image(results[i])), np.asarray(source))


@pytest.mark.parametrize("cut", [0, 1, 65520, 65521, 200_000, 299_999, 300_000])
def test_adler32_combine(cut: int) -> None:
    data = np.random.default_rng(cut).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    head, tail = data[:cut], data[cut:]
    assert png._adler32_combine(zlib.adler32(head), zlib.adler32(tail), len(tail)) == zlib.adler32(data)


def test_encode_png_is_not_much_larger_than_pillows() -> None:
    """Catches a filter change that costs size: Paeth is +1.6% here, and equal to Pillow on the gradient."""
    source = bench_like_image()
    ours, pillows = len(encode_png(source)), len(pillow_png(source))
    assert ours <= 1.05 * pillows, (ours, pillows)
    smooth = bench_like_image(sigma=0)  # where a fixed Average filter would be 2.5x larger
    assert len(encode_png(smooth)) <= 1.05 * len(pillow_png(smooth))


def _p_image() -> Image.Image:
    image = Image.new("P", (9, 7), 1)
    image.putpalette([0, 0, 0, *RED, *GREEN] + [0] * (253 * 3))
    image.putpixel((2, 3), 2)
    return image


@pytest.mark.parametrize(
    "make",
    [
        _p_image,
        lambda: Image.new("LA", (9, 7), (30, 200)),
        lambda: Image.frombytes("I;16", (9, 7), (np.arange(63, dtype="<u2") * 1000).tobytes()),
        lambda: Image.new("1", (9, 7), 1),
    ],
    ids=["P", "LA", "I;16", "1"],
)
def test_encode_png_other_modes_go_through_pillow(make: Callable[[], Image.Image]) -> None:
    source = make()
    data = encode_png(source)
    assert data == pillow_png(source)
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.mode == source.mode
        assert decoded.tobytes() == source.tobytes()


def test_encode_png_keeps_icc_profile_and_transparency_via_pillow() -> None:
    with_icc = noise(8, 8)
    with_icc.info["icc_profile"] = b"not really a profile"
    assert b"iCCP" in encode_png(with_icc)
    keyed = noise(8, 8)
    keyed.info["transparency"] = (0, 0, 0)
    assert b"tRNS" in encode_png(keyed)


def test_encode_png_empty_image_is_still_refused() -> None:
    with pytest.raises(ValueError):
        encode_png(Image.new("RGB", (0, 4)))


def test_encode_png_converts_modes_png_cannot_hold() -> None:
    data = encode_png(Image.new("CMYK", (4, 4), (0, 255, 255, 0)))
    assert load_image(data).getpixel((0, 0)) == RED


def test_encode_under_prefers_png_when_it_fits() -> None:
    source = noise(64, 64)
    png = encode_png(source)
    data, ext = encode_under(source, len(png))
    assert (data, ext) == (png, "png")


_EXT_FORMAT = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}


@pytest.mark.parametrize("limit", [300_000, 60_000, 8_000])
def test_encode_under_fits_noisy_image(limit: int) -> None:
    source = noise(512, 512)
    assert len(encode_png(source)) > limit
    data, ext = encode_under(source, limit)
    assert len(data) <= limit
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == _EXT_FORMAT[ext]
        decoded.load()
        assert min(decoded.size) >= 16
    assert load_image(data).mode == "RGB"


def test_encode_under_keeps_alpha_in_webp() -> None:
    source = noise(256, 256).convert("RGBA")
    source.putalpha(128)
    data, ext = encode_under(source, 40_000)
    assert len(data) <= 40_000
    if ext == "webp":
        with Image.open(io.BytesIO(data)) as decoded:
            assert decoded.mode == "RGBA"


def test_encode_under_rejects_impossible_limits() -> None:
    with pytest.raises(ValueError):
        encode_under(noise(64, 64), 0)
    with pytest.raises(ValueError):
        encode_under(noise(64, 64), 20)


# --- bounded decoding (reduce_to, strips) ---------------------------------------------------------------


def _peak_rss_mb_during(fn: Callable[[], object]) -> float:
    """How far this process's peak RSS rose above its RSS while ``fn`` ran (Linux: VmHWM reset via clear_refs)."""

    def field(name: str) -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(name)) / 1024

    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    before = field("VmRSS")
    result = fn()
    peak = field("VmHWM") - before
    del result
    return peak


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_a_40_megapixel_16_bit_png_decodes_in_bounded_memory() -> None:
    from bigimages import png_16bit_rgba

    data = png_16bit_rgba()
    # The decoder's own RGBA buffer (160 MB) plus strips; the old full-size conversions took ~0.9-1.3 GB.
    assert _peak_rss_mb_during(lambda: load_image(data, reduce_to=1024)) < 250
    assert _peak_rss_mb_during(lambda: load_image(data)) < 400  # plus the full-size RGB result itself


def _transparent_gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x ^ y) & 255, np.where(x < width // 3, 90, 255)], -1)
    return Image.fromarray(pixels.astype(np.uint8), "RGBA")


def test_strip_conversion_matches_a_whole_image_conversion() -> None:
    source = _transparent_gradient(1500, 900)  # over _STRIP_PIXELS: converted in strips
    data = encode(source, "PNG")
    whole = images._flatten_on_white(source)
    assert np.array_equal(np.asarray(load_image(data)), np.asarray(whole))
    reduced = load_image(data, reduce_to=400)  # factor 3: 1500 // 400
    assert reduced.size == (500, 300)
    assert np.array_equal(np.asarray(reduced), np.asarray(whole.reduce(3)))


def test_reduce_to_keeps_the_long_side_and_jpeg_decodes_small() -> None:
    source = Image.fromarray(np.asarray(_transparent_gradient(1600, 1200))[..., :3].copy(), "RGB")
    data = encode(source, "JPEG", quality=95)
    full, small = load_image(data), load_image(data, reduce_to=300)
    assert small.size == (400, 300)  # draft mode decoded at 1/4 scale
    reference = np.asarray(full.reduce(4)).astype(int)
    assert np.abs(np.asarray(small).astype(int) - reference).mean() < 3
    assert load_image(data, reduce_to=5000).size == (1600, 1200)  # never enlarged, never below reduce_to


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_after_reducing(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    big = quadrant_image().resize((1280, 640), Image.Resampling.NEAREST)
    image = load_image(encode(big, fmt, exif=exif.tobytes()), reduce_to=320)
    assert image.size == (160, 320)  # 1280x640 / 4, then turned upright
    assert close_to(image.getpixel((120, 40)), RED, 16)  # top-left quadrant ends up top-right


def test_sixteen_bit_grey_with_a_transparent_key_in_strips() -> None:
    values = np.full((900, 1200), 257 * 100, dtype=np.uint16)
    values[:, :600] = 0
    source = Image.fromarray(values)
    buf = io.BytesIO()
    source.save(buf, "PNG", transparency=0)
    image = load_image(buf.getvalue(), reduce_to=400)
    assert image.size == (400, 300)
    assert image.getpixel((10, 10)) == WHITE  # the keyed-out half shows white, not black
    assert image.getpixel((390, 290)) == (100, 100, 100)  # scaled, not clipped to 255
