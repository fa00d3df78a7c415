"""Image input/output for the editing pipeline: safe decoding, model-friendly sizes, size-capped encoding.

Everything that can fail because of what a user uploaded raises :class:`BadImageError` with a message
that can be shown as it is; PIL's own exceptions never escape :func:`load_image`.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError, features

from .errors import BadImageError

__all__ = [
    "MAX_ASPECT_RATIO",
    "MAX_INPUT_BYTES",
    "MAX_INPUT_PIXELS",
    "SUPPORTED_FORMATS",
    "encode_under",
    "fit_size",
    "load_image",
    "prepare_image",
    "snap_size",
]

MAX_INPUT_BYTES: int = 25 * 1024 * 1024
"""Matches Discord's largest ordinary attachment; anything bigger is not a photo someone meant to edit."""

MAX_INPUT_PIXELS: int = 40_000_000
"""40 MP covers current phone cameras; an RGB decode of that is ~120 MB, bounded per job."""

MAX_ASPECT_RATIO: int = 16
"""Beyond 16:1 the short side shrinks to a few multiples of 8 at 512 px and the edit is meaningless."""

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")

_NOT_AN_IMAGE = "That file is not an image I can read (PNG, JPEG, WEBP or GIF)."
_DAMAGED = "That image file is damaged or incomplete, so I can't read it."

# What PIL and its C decoders raise for hostile or broken input. struct/zlib errors come from header and
# chunk parsing. Deliberately not IndexError/KeyError/TypeError: those would hide bugs in our own code,
# and 60k mutated-file fuzz cases never produced them.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

_WHITE = (255, 255, 255)


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def _read_input(data: bytes | bytearray | memoryview | str | os.PathLike[str], max_bytes: int) -> bytes:
    """Read a path into memory first so paths and uploads take exactly the same decode path."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    elif isinstance(data, (str, os.PathLike)):
        try:
            size = os.stat(data).st_size
            if size > max_bytes:
                raise _too_large(size, max_bytes)
            with open(data, "rb") as fh:
                # Read one byte past the cap so a file that grew after stat() is still caught.
                raw = fh.read(max_bytes + 1)
        except BadImageError:
            raise
        except OSError as exc:
            raise BadImageError("I couldn't open that file; check that it exists and is readable.",
                                key="engine.image_unreadable") from exc
    else:
        raise TypeError(f"load_image() takes bytes or a path, not {type(data).__name__}")
    if not raw:
        raise BadImageError("That file is empty.", key="engine.image_empty")
    if len(raw) > max_bytes:
        raise _too_large(len(raw), max_bytes)
    return raw


def _too_many_pixels(width: int, height: int, max_pixels: int) -> BadImageError:
    return BadImageError(
        f"That image is too large ({width}x{height} pixels); the size limit is "
        f"{max_pixels / 1_000_000:g} megapixels.",
        key="engine.image_too_many_pixels", width=width, height=height, megapixels=f"{max_pixels / 1_000_000:g}"
    )


def _too_large(size: int, max_bytes: int) -> BadImageError:
    return BadImageError(f"That file is too large ({_mb(size)}); the limit is {_mb(max_bytes)}.",
                         key="engine.image_too_large", size=_mb(size), limit=_mb(max_bytes))


def _flatten_on_white(image: Image.Image) -> Image.Image:
    """Composite over white: transparent regions would otherwise turn black (PIL's default) in RGB."""
    # PIL has no La -> RGBA conversion; going through LA un-premultiplies it first.
    rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit grey to 8 bits; PIL's own convert() clips at 255, turning most images white."""
    values = np.asarray(image).astype(np.int64)
    # Our formats only put 16-bit samples into "I"; clamp anyway so a surprise can't wrap around.
    values = np.clip(values, 0, 65535)
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    out = Image.fromarray(grey)
    transparency = image.info.get("transparency")
    if isinstance(transparency, int):
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
        out.putalpha(Image.fromarray(alpha))
        return _flatten_on_white(out)
    return out.convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to RGB the way a viewer would display it."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _sixteen_bit_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return _flatten_on_white(image)
    if image.mode == "RGB":
        return image.copy()
    # L, P, 1, CMYK (the JPEG decoder already undoes Adobe's inverted CMYK), YCbCr.
    return image.convert("RGB")


_STRIP_PIXELS = 1 << 20
"""Rows are converted to RGB (and shrunk) about this many pixels at a time, so the only full-size buffer
a decode holds is the decoder's own, in the file's mode (at most 4 bytes a pixel: 160 MB at 40 MP)."""

_ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(image: Image.Image) -> Image.Transpose | None:
    """The EXIF orientation's transpose; None for none, or when a broken EXIF block can't be read (a broken
    EXIF block should not cost the user an image whose pixels decoded fine)."""
    try:
        return _ORIENTATIONS.get(image.getexif().get(0x0112))
    except _DECODE_ERRORS:
        return None


def _reduce_factor(width: int, height: int, reduce_to: int | None) -> int:
    """The largest whole factor that keeps the long side at least ``reduce_to`` (1: keep the size)."""
    if not reduce_to or reduce_to < 1:
        return 1
    return max(1, max(width, height) // reduce_to)


def _to_rgb_reduced(image: Image.Image, factor: int) -> Image.Image:
    """RGB (as :func:`_to_rgb` shows it) shrunk by ``factor``, converted a strip of rows at a time.

    Flattening on white is linear in the pixels, so averaging after it is the same as a premultiplied
    reduce; doing it per strip means no full-size RGB or RGBA copy is ever made.
    """
    width, height = image.size
    if width * height <= _STRIP_PIXELS:
        rgb = _to_rgb(image)
        return rgb.reduce(factor) if factor > 1 else rgb
    rows = max(factor, _STRIP_PIXELS // width // factor * factor)
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for top in range(0, height, rows):
        strip = _to_rgb(image.crop((0, top, width, min(height, top + rows))))
        out.paste(strip.reduce(factor) if factor > 1 else strip, (0, top // factor))
    return out


def load_image(
    data: bytes | str | os.PathLike[str],
    *,
    max_bytes: int = MAX_INPUT_BYTES,
    max_pixels: int = MAX_INPUT_PIXELS,
    reduce_to: int | None = None,
) -> Image.Image:
    """Decode untrusted input into a detached RGB image, or raise :class:`BadImageError`.

    The pixel cap is checked against the header before any pixel data is decoded, so a decompression
    bomb costs only its header parse. PIL's global ``MAX_IMAGE_PIXELS`` is left alone (other code in the
    process may rely on it) but still applies as an outer bound. Only the first frame of animated
    GIF/WEBP/PNG is decoded: the model edits stills. A path is read into memory up front, so paths and
    bytes behave identically and no file handle outlives the call.

    Memory: besides the input bytes, a decode holds the decoder's own buffer (at most 4 bytes a pixel) and
    small strips; RGB conversion, transparency and 16-bit scaling happen a strip at a time. With
    ``reduce_to`` the image may come back smaller by a whole factor, its long side still at least
    ``reduce_to`` (callers that fit it to a model size anyway): JPEG then decodes at 1/2 to 1/8 scale
    (draft mode), so even its decoder buffer stays small, and other formats shrink strip by strip.
    """
    raw = _read_input(data, max_bytes)
    try:
        with Image.open(io.BytesIO(raw), formats=SUPPORTED_FORMATS) as image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise BadImageError(_DAMAGED, key="engine.image_damaged")
            if width * height > max_pixels:
                raise _too_many_pixels(width, height, max_pixels)
            factor = _reduce_factor(width, height, reduce_to)
            if factor > 1 and image.format == "JPEG":
                image.draft(image.mode, (-(-width // factor), -(-height // factor)))
                factor = _reduce_factor(*image.size, reduce_to)
            image.load()
            transpose = _orientation(image)
            rgb = _to_rgb_reduced(image, factor)
            return rgb.transpose(transpose) if transpose is not None else rgb
    except BadImageError:
        raise
    except Image.DecompressionBombError as exc:
        # PIL's own cap fired inside Image.open, before we could read the size ourselves.
        limit = max_pixels
        if Image.MAX_IMAGE_PIXELS:
            limit = min(limit, 2 * Image.MAX_IMAGE_PIXELS)
        raise BadImageError(
            f"That image is too large; the size limit is {limit / 1_000_000:g} megapixels.",
            key="engine.image_over_megapixels", megapixels=f"{limit / 1_000_000:g}"
        ) from exc
    except UnidentifiedImageError as exc:
        raise BadImageError(_NOT_AN_IMAGE, key="engine.image_not_an_image") from exc
    except _DECODE_ERRORS as exc:
        raise BadImageError(_DAMAGED, key="engine.image_damaged") from exc


def fit_size(width: int, height: int, max_side: int = 512, multiple: int = 8) -> tuple[int, int]:
    """Pick the model input size for a ``width`` x ``height`` image.

    Rules, in order:

    * Aspect ratios beyond ``MAX_ASPECT_RATIO``:1 (of the input) are rejected with BadImageError.
    * Large images are scaled down so the long side is ``max_side`` rounded down to ``multiple``.
    * Small images are never scaled up, except by the least factor that brings the short side to
      ``multiple``: clamping a 15x1 strip to 8x8 would destroy its shape, scaling it to 120x8 does not.
    * Each side is then rounded *down* to a multiple of ``multiple`` (never up, so a side never exceeds
      the scaled size or the cap), with ``multiple`` as the minimum.

    So rounding is the only distortion: each side is the exactly scaled side minus less than one
    ``multiple``, and the relative aspect error is below ``multiple / min(result)``. When ``max_side``
    is too small to hold the shape (``max_side < MAX_ASPECT_RATIO * multiple``), the cap wins.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if width < 1 or height < 1:
        raise BadImageError(f"That image has no pixels ({width}x{height}).", key="engine.image_no_pixels",
                            width=width, height=height)
    long_side, short_side = max(width, height), min(width, height)
    if long_side > MAX_ASPECT_RATIO * short_side:
        raise BadImageError(
            f"That image is too long and thin ({width}x{height}); I can edit images up to "
            f"{MAX_ASPECT_RATIO}:1, so please crop it first.",
            key="engine.image_too_thin", width=width, height=height, ratio=MAX_ASPECT_RATIO
        )
    cap = max(max_side // multiple * multiple, multiple)
    scale = min(1.0, cap / long_side)
    if short_side * scale < multiple:
        scale = multiple / short_side

    def side(length: int) -> int:
        # The epsilon keeps 7.9999999 (float error on an exact multiple) from dropping a whole step.
        rounded = math.floor(length * scale / multiple + 1e-9) * multiple
        return min(cap, max(multiple, rounded))

    return side(width), side(height)


def snap_size(width: int, height: int, step: int, max_side: int) -> tuple[int, int]:
    """The working size for an already fitted ``width`` x ``height``: each side rounded to the nearest
    multiple of ``step`` (halves up), at least ``step``, at most ``max_side`` rounded down to ``step``.

    Why: a compiled worker records one CUDA graph per latent size, kept for good (~5 MB and ~1 s each);
    sides that are multiples of 8 allow (max_side/8)^2 sizes, a ``step`` grid at most (max_side/step)^2.
    The cost is a stretch: each side is off by at most ``step / 2`` (more only where a clamp applies: a side
    below ``step / 2``, or near the cap when ``max_side`` is not a multiple of ``step``), and the result is
    resized back to the fitted size, so only that stretch's resampling is left of it.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    cap = max(max_side // step * step, step)

    def side(length: int) -> int:
        nearest = (2 * length + step) // (2 * step) * step  # floor(length / step + 1/2), in exact integers
        return min(cap, max(step, nearest))

    return side(width), side(height)


def prepare_image(image: Image.Image, max_side: int = 512, multiple: int = 8) -> Image.Image:
    """Return a new RGB image at :func:`fit_size`; LANCZOS keeps detail the editor is asked to change."""
    rgb = image if image.mode == "RGB" else _to_rgb(image)
    size = fit_size(rgb.width, rgb.height, max_side, multiple)
    if size == rgb.size:
        return rgb.copy() if rgb is image else rgb
    return rgb.resize(size, Image.Resampling.LANCZOS)


_LOSSY_QUALITIES = (95, 90, 85, 80, 70, 60, 50, 40)
_DOWNSCALE_STEP = 0.75
_DOWNSCALE_QUALITY = 80
_MIN_SIDE = 16


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def encode_under(image: Image.Image, limit_bytes: int) -> tuple[bytes, str]:
    """Encode to at most ``limit_bytes``, giving up as little quality as possible; return (data, ext).

    Order: PNG, lossless WEBP, lossy WEBP (JPEG where PIL lacks WEBP) at falling quality, then shrink by
    a quarter per step. Alpha is kept where the format allows; JPEG gets it flattened on white.
    Raises ValueError if even a tiny thumbnail cannot fit: that limit is a configuration bug.
    """
    if limit_bytes <= 0:
        raise ValueError(f"limit_bytes must be positive, got {limit_bytes}")
    keep_alpha = _has_alpha(image)
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA") if keep_alpha else _to_rgb(image)

    from .png import encode_png

    png = encode_png(image)
    if len(png) <= limit_bytes:
        return png, "png"

    has_webp = features.check("webp")

    def lossy(img: Image.Image, quality: int) -> tuple[bytes, str]:
        buf = io.BytesIO()
        if has_webp:
            img.save(buf, "WEBP", quality=quality, method=4)
            return buf.getvalue(), "webp"
        flat = _flatten_on_white(img) if img.mode == "RGBA" else img
        flat.save(buf, "JPEG", quality=quality, optimize=True, subsampling=0 if quality >= 90 else 2)
        return buf.getvalue(), "jpg"

    if has_webp:
        buf = io.BytesIO()
        image.save(buf, "WEBP", lossless=True, quality=80, method=4)
        if buf.tell() <= limit_bytes:
            return buf.getvalue(), "webp"

    for quality in _LOSSY_QUALITIES:
        encoded, ext = lossy(image, quality)
        if len(encoded) <= limit_bytes:
            return encoded, ext

    current = image
    while min(current.size) * _DOWNSCALE_STEP >= _MIN_SIDE:
        new_size = (
            max(1, round(current.width * _DOWNSCALE_STEP)),
            max(1, round(current.height * _DOWNSCALE_STEP)),
        )
        current = image.resize(new_size, Image.Resampling.LANCZOS)
        encoded, ext = lossy(current, _DOWNSCALE_QUALITY)
        if len(encoded) <= limit_bytes:
            return encoded, ext
    raise ValueError(f"cannot encode a {image.width}x{image.height} image in {limit_bytes} bytes")
