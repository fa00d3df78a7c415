"""Property tests: whatever a user uploads or types, the bot gets a clean value or a typed, user-facing error.

Each fuzzed function has one contract. Images: ``prepare_image(load_image(data))`` is RGB with sides that are
multiples of 8 and at most 512, or BadImageError. Text: ``normalize_instruction`` returns clean text or
BadRequestError; ``clean_expressive`` never raises. Options: ``check_options`` accepts exactly the documented
ranges, else BadRequestError. Presets: every preset's guidance is inside those ranges. Any other exception
is a bug, because only MgieError messages are shown to users.

Hypothesis runs 10,750 generated examples in all (1000 + 4000 + 500 + 600 + 300 for images, 1500 + 150 for
instructions, 800 for clean_expressive, 1500 for options, 400 for presets; ``max_examples`` per test below),
plus 64 parametrized cases; the file takes 25-35 s on two cores. ``--hypothesis-show-statistics`` shows how
the image cases split between decoded and each refusal, so a fuzzer stuck on one path is visible.
"""

from __future__ import annotations

import io
import re
import struct
import unicodedata
import warnings
import zlib
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.presets import MIN_GUIDED_IMAGE_CFG, PRESET_CHOICES, choose_guidance
from mgie_engine.errors import BadImageError, BadRequestError
from mgie_engine.images import MAX_ASPECT_RATIO, MAX_INPUT_PIXELS, load_image, prepare_image
from mgie_engine.instructions import MAX_INSTRUCTION_CHARS, clean_expressive, normalize_instruction
from mgie_engine.options import IMAGE_CFG_RANGE, SEED_RANGE, STEPS_RANGE, TEXT_CFG_RANGE, check_options

MAX_SIDE = 512


def fuzz(n: int) -> settings:
    """No deadline: the first PIL/libwebp call of a run is slow, and a timing flake is not a finding."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _quiet_pil():
    """PIL warns about odd palettes and big images; the contract is about exceptions, not warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------------ images


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def edit_input(data: bytes) -> Image.Image | None:
    """Run the bot's decode path; return the model input, or None after a BadImageError fit for a user."""
    try:
        image = prepare_image(load_image(data))
    except BadImageError as err:
        message = str(err)
        assert message and len(message) < 300 and "Traceback" not in message
        _note("refused: " + message.split("(")[0].split(";")[0][:48])
        return None
    _note("decoded")
    assert image.mode == "RGB"
    assert image.width % 8 == 0 and image.height % 8 == 0
    assert 8 <= min(image.size) and max(image.size) <= MAX_SIDE
    return image


def _note(outcome: str) -> None:
    """Tally outcomes for ``--hypothesis-show-statistics``, so a fuzzer that only ever hits one path shows."""
    if currently_in_test_context():
        event(outcome)


def pixels(width: int, height: int, seed: int, channels: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def sixteen_bit(width: int, height: int, seed: int) -> Image.Image:
    values = np.random.default_rng(seed).integers(0, 65536, (height, width), dtype=np.uint16)
    return Image.fromarray(values).convert("I;16") if values.size else Image.new("I;16", (width, height))


# Every mode the four formats can hold (as PIL writes them), with what each save needs.
VARIANTS: dict[str, tuple[str, str, dict[str, object]]] = {
    "png-rgb": ("PNG", "RGB", {}),
    "png-rgba": ("PNG", "RGBA", {}),
    "png-la": ("PNG", "LA", {}),
    "png-l": ("PNG", "L", {}),
    "png-l-trns": ("PNG", "L", {"transparency": 7}),
    "png-1": ("PNG", "1", {}),
    "png-p": ("PNG", "P", {}),
    "png-p-trns": ("PNG", "P", {"transparency": 3}),
    "png-rgb-trns": ("PNG", "RGB", {"transparency": (1, 2, 3)}),
    "png-16": ("PNG", "I;16", {}),
    "png-interlaced": ("PNG", "RGB", {"interlace": 1}),
    "jpeg-rgb": ("JPEG", "RGB", {}),
    "jpeg-progressive": ("JPEG", "RGB", {"progressive": True, "quality": 60}),
    "jpeg-l": ("JPEG", "L", {}),
    "jpeg-cmyk": ("JPEG", "CMYK", {}),
    "webp-rgb": ("WEBP", "RGB", {"quality": 70}),
    "webp-rgba": ("WEBP", "RGBA", {"lossless": True}),
    "gif-p": ("GIF", "P", {}),
    "gif-p-trns": ("GIF", "P", {"transparency": 0}),
    "gif-l": ("GIF", "L", {}),
    "gif-anim": ("GIF", "RGB", {"save_all": True}),
    "webp-anim": ("WEBP", "RGBA", {"save_all": True}),
}


def make_file(variant: str, width: int, height: int, seed: int, orientation: int | None = None) -> bytes:
    fmt, mode, params = VARIANTS[variant]
    if mode == "I;16":
        image = sixteen_bit(width, height, seed)
    else:
        image = Image.fromarray(pixels(width, height, seed), "RGBA").convert(mode)
    params = dict(params)
    if params.get("save_all"):
        params["append_images"] = [image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)]
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    return encode(image, fmt, **params)


sizes = st.tuples(st.integers(1, 40), st.integers(1, 40))
seeds = st.integers(0, 2**32 - 1)


def fix_png_crcs(data: bytearray) -> bytearray:
    """Recompute every complete chunk's CRC, so mutations reach the decoders instead of PIL's CRC check."""
    pos = 8
    while pos + 12 <= len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        end = pos + 8 + length
        if end + 4 > len(data):
            break
        data[end:end + 4] = struct.pack(">I", zlib.crc32(data[pos + 4:end]))
        pos = end + 4
    return data


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """A valid file, then truncated, byte-flipped, spliced or with a range cut out: past the magic number."""
    width, height = draw(sizes)
    variant = draw(st.sampled_from(sorted(VARIANTS)))
    orientation = draw(st.none() | st.integers(0, 9))
    data = bytearray(make_file(variant, width, height, draw(seeds), orientation))
    # Positions come from a drawn Random: Hypothesis's own integers lean to the ends, which mostly cut the
    # file down to its signature and never reach the decoders.
    rnd = draw(st.randoms(use_true_random=True))
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        kind = draw(st.sampled_from(["truncate", "flip", "flip", "insert", "delete"]))
        # Mostly past the signature (a broken magic number is test_random_bytes' job), sometimes anywhere.
        start = 0 if len(data) <= 12 or rnd.random() < 0.1 else 12
        at = rnd.randrange(start, len(data))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip":
            for _ in range(rnd.randint(1, 8)):
                data[rnd.randrange(start, len(data))] ^= rnd.randrange(1, 256)
        elif kind == "insert":
            data[at:at] = rnd.randbytes(rnd.randint(1, 32))
        else:
            del data[at:at + rnd.randint(1, 64)]
    if data.startswith(b"\x89PNG") and draw(st.booleans()):
        data = fix_png_crcs(data)
    return bytes(data)


MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"RIFF\x00\x10\x00\x00WEBPVP8 ",
         b"RIFF\x00\x10\x00\x00WEBPVP8L", b"RIFF\x00\x10\x00\x00WEBPVP8X"]


@fuzz(1000)
@given(st.sampled_from(MAGIC), st.binary(max_size=4096))
def test_random_bytes(magic: bytes, tail: bytes) -> None:
    edit_input(magic + tail)


@fuzz(4000)
@given(mutated_files())
def test_damaged_files(data: bytes) -> None:
    edit_input(data)


def png_with_size(data: bytes, width: int, height: int) -> bytes:
    ihdr = data[16:29]
    patched = struct.pack(">II", width, height) + ihdr[8:]
    return data[:16] + patched + struct.pack(">I", zlib.crc32(b"IHDR" + patched)) + data[33:]


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    at = data.index(b"\xff\xc0")
    return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


def gif_with_size(data: bytes, width: int, height: int) -> bytes:
    """Patch the logical screen and the first frame's descriptor, walking past palette and extensions."""
    out = bytearray(data)
    out[6:10] = struct.pack("<HH", width, height)
    pos = 13 + (3 << ((out[10] & 7) + 1) if out[10] & 0x80 else 0)
    while out[pos] == 0x21:  # extension: label, then sub-blocks up to a zero length
        pos += 2
        while out[pos]:
            pos += out[pos] + 1
        pos += 1
    assert out[pos] == 0x2C
    out[pos + 5:pos + 9] = struct.pack("<HH", width, height)
    return bytes(out)


def webp_with_size(data: bytes, width: int, height: int) -> bytes:
    out = bytearray(data)
    chunk = bytes(out[12:16])
    if chunk == b"VP8L":  # 14 bits each of width-1 and height-1 after the 0x2f signature
        bits = struct.unpack("<I", out[21:25])[0] & ~0x0FFFFFFF
        bits |= ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
        out[21:25] = struct.pack("<I", bits)
    elif chunk == b"VP8 ":  # 3-byte frame tag, 3-byte start code, then 14-bit width and height
        out[26:30] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
    else:  # VP8X: 24-bit canvas width-1 and height-1
        out[24:30] = ((width - 1) & 0xFFFFFF).to_bytes(3, "little") + ((height - 1) & 0xFFFFFF).to_bytes(3, "little")
    return bytes(out)


PATCHERS = {
    "PNG": (png_with_size, 2**31 - 1, {}),
    "JPEG": (jpeg_with_size, 65535, {}),
    "GIF": (gif_with_size, 65535, {}),
    "WEBP-lossless": (webp_with_size, 16384, {"lossless": True}),
    "WEBP-lossy": (webp_with_size, 16383, {"quality": 50}),
    "WEBP-extended": (webp_with_size, 2**24, {"lossless": True, "exif": b"Exif\0\0II*\0\x08\0\0\0\0\0"}),
}


@fuzz(500)
@given(st.sampled_from(sorted(PATCHERS)), st.data())
def test_huge_declared_dimensions(kind: str, data: st.DataObject) -> None:
    patch, limit, params = PATCHERS[kind]
    side = st.one_of(st.integers(1, 64), st.integers(1, limit), st.just(limit))
    width, height = data.draw(side, "width"), data.draw(side, "height")
    original = encode(Image.fromarray(pixels(16, 16, 0, 3)), kind.split("-")[0], **params)
    crafted = patch(original, width, height)
    if width * height <= MAX_INPUT_PIXELS:
        edit_input(crafted)
        return
    # Over the pixel cap: refused from the header, before a pixel buffer is allocated. WEBP may instead
    # fail libwebp's own consistency check of the patched canvas ("damaged"); refused either way.
    with pytest.raises(BadImageError, match="too large" if kind in ("PNG", "JPEG", "GIF") else ""):
        load_image(crafted)
    _note(f"{kind}: refused over the cap")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_mode_decodes(variant: str) -> None:
    image = edit_input(make_file(variant, 37, 21, seed=1))
    assert image is not None and image.size == (37 // 8 * 8, 21 // 8 * 8)


@pytest.mark.parametrize("fmt", ["jpeg-rgb", "png-rgba", "webp-rgb"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations(fmt: str, orientation: int) -> None:
    data = make_file(fmt, 40, 16, seed=2, orientation=orientation)
    swapped = orientation >= 5  # 5-8 rotate by a quarter turn
    assert load_image(data).size == ((16, 40) if swapped else (40, 16))
    image = edit_input(data)
    assert image is not None and image.size == ((16, 40) if swapped else (40, 16))


@fuzz(600)
@given(st.sampled_from(sorted(VARIANTS)), sizes, seeds, st.none() | st.integers(-5, 70000))
def test_valid_files_always_decode(variant: str, size: tuple[int, int], seed: int, orientation: int | None) -> None:
    """Intact files of any mode and EXIF orientation (even nonsense ones) are edited, never refused."""
    image = edit_input(make_file(variant, *size, seed, orientation if orientation in range(0, 65536) else None))
    assert image is not None or max(size) > MAX_ASPECT_RATIO * min(size)


@fuzz(300)
@given(st.sampled_from(sorted(VARIANTS)), st.integers(1, 3), st.integers(1, 400), st.booleans(), seeds)
def test_tiny_and_thin_images(variant: str, short: int, long: int, tall: bool, seed: int) -> None:
    width, height = (short, long) if tall else (long, short)
    image = edit_input(make_file(variant, width, height, seed))
    if long <= MAX_ASPECT_RATIO * short:
        assert image is not None
        assert (image.width >= image.height) == (width >= height) or image.width == image.height
    else:
        assert image is None  # too thin to edit: refused with a message, not squashed


@pytest.mark.parametrize("mode", ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
                                  "HSV", "I", "F", "I;16", "I;16B", "I;16L"])
def test_prepare_image_takes_any_pil_mode(mode: str) -> None:
    image = prepare_image(Image.new(mode, (9, 30)))
    assert image.mode == "RGB" and image.size == (8, 24)


# ------------------------------------------------------------------------------------------- instructions

IGNORED = {"Cc", "Cf", "Cs", "Co", "Cn"}
ZERO_WIDTH_AND_BIDI = "\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\u2066\u2067\u2068\u2069\ufeff"
SPACES = " \t\n\r\x0b\x0c\x1c\x85\xa0\u1680\u2000\u2007\u200a\u2028\u2029\u202f\u205f\u3000"

any_char = st.characters(exclude_categories=("Cs",))
flavoured = st.one_of(
    any_char,
    st.sampled_from(ZERO_WIDTH_AND_BIDI + SPACES),
    st.characters(min_codepoint=0x0590, max_codepoint=0x06FF),  # Hebrew, Arabic
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji
    st.characters(max_codepoint=0x7F),  # ASCII incl. control characters
)
instructions = st.one_of(
    st.text(any_char, max_size=400),
    st.text(flavoured, max_size=400),
    st.builds(lambda unit, n: unit * n, st.text(flavoured, min_size=1, max_size=12), st.integers(1, 800)),
)


def visible(text: str) -> int:
    return sum(1 for ch in text if not ch.isspace() and unicodedata.category(ch) not in IGNORED)


@fuzz(1500)
@given(instructions, st.sampled_from([MAX_INSTRUCTION_CHARS, MAX_INSTRUCTION_CHARS, 1, 20, 5000]))
def test_normalize_instruction(text: str, max_chars: int) -> None:
    shown = visible(text)
    try:
        cleaned = normalize_instruction(text, max_chars=max_chars)
    except BadRequestError as err:
        # Refused only when nothing visible is left or the cleaned text (at least `shown` long) is too long.
        assert shown == 0 or 2 * shown - 1 > max_chars, str(err)
        return
    assert 0 < len(cleaned) <= max_chars
    assert cleaned == cleaned.strip() and "  " not in cleaned
    assert all(ch == " " or not ch.isspace() for ch in cleaned)
    assert not any(unicodedata.category(ch) in IGNORED for ch in cleaned)
    assert visible(cleaned) == shown  # nothing visible was dropped
    assert normalize_instruction(cleaned, max_chars=max_chars) == cleaned


@fuzz(150)
@given(st.one_of(st.none(), st.integers(), st.floats(), st.binary(), st.lists(st.text(max_size=3))))
def test_normalize_instruction_refuses_non_text(value: object) -> None:
    with pytest.raises(BadRequestError):
        normalize_instruction(value)  # type: ignore[arg-type]


MARKERS = st.sampled_from(["ASSISTANT:", "</s>", "[IMG0]", "[IMG1]", "alternative", "Alternative", ".", "..", " ",
                           "\n", "USER:"])


@fuzz(800)
@given(st.lists(st.one_of(st.text(any_char, max_size=40), MARKERS), max_size=12).map("".join))
def test_clean_expressive_never_raises(text: str) -> None:
    out = clean_expressive(text)
    assert isinstance(out, str)
    assert out == "" or out.endswith(".")
    assert "</s>" not in out and "[IMG0]" not in out
    assert re.search("alternative", out, flags=re.IGNORECASE) is None


# ------------------------------------------------------------------------------------------------ options

HUGE_INTS = [2**63 - 1, 2**63, 2**64, -(2**64), 2**1100, -(2**1100), 10**5000, -(10**5000)]
EDGES = [0, 1, 10, 20, 200, 201, -0.0, 0.0, 1.0, 10.0, 20.0, 1e-300, -1e-300, 20.000000000000004,
         0.9999999999999999, 1e308, -1e308]
floats_and_ints = st.one_of(
    st.floats(),  # includes nan, +-inf, -0.0, subnormals, 1.8e308
    st.floats(-1, 25),
    st.integers(),
    st.integers(-5, 250),
    st.booleans(),
    st.sampled_from(HUGE_INTS + EDGES),
)
odd_types = st.sampled_from([None, "7", b"7", Decimal("7.5"), Fraction(15, 2), 7.5 + 0j, [7.5], np.int64(5)])


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def expected_ok(text_cfg: object, image_cfg: object, steps: object, seed: object) -> bool:
    """The documented ranges, stated independently of the implementation (NaN fails every comparison)."""
    def real_in(value: object, bounds: tuple[float, float]) -> bool:
        return _number(value) and bounds[0] <= value <= bounds[1]  # type: ignore[operator]

    def whole_in(value: object, bounds: tuple[int, int]) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and bounds[0] <= value <= bounds[1]

    return (real_in(text_cfg, TEXT_CFG_RANGE) and real_in(image_cfg, IMAGE_CFG_RANGE)
            and whole_in(steps, STEPS_RANGE) and whole_in(seed, SEED_RANGE))


@fuzz(1500)
@given(
    st.one_of(floats_and_ints, st.floats(*TEXT_CFG_RANGE), odd_types),
    st.one_of(floats_and_ints, st.floats(*IMAGE_CFG_RANGE), odd_types),
    st.one_of(floats_and_ints, st.integers(*STEPS_RANGE), odd_types),
    st.one_of(floats_and_ints, st.integers(*SEED_RANGE), odd_types),
)
def test_check_options_accepts_exactly_the_ranges(text_cfg: object, image_cfg: object, steps: object,
                                                  seed: object) -> None:
    try:
        check_options(text_cfg, image_cfg, steps, seed)  # type: ignore[arg-type]
    except BadRequestError as err:
        assert not expected_ok(text_cfg, image_cfg, steps, seed)
        assert 0 < len(str(err)) < 200
        return
    assert expected_ok(text_cfg, image_cfg, steps, seed)


# ------------------------------------------------------------------------------------------------ presets


@st.composite
def small_images(draw: st.DrawFn) -> Image.Image:
    width, height = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    seed = draw(seeds)
    pattern = draw(st.sampled_from(["noise", "flat", "stripes"]))
    rgba = pixels(width, height, seed)
    if pattern == "flat":
        rgba[...] = rgba[0, 0]
    elif pattern == "stripes":
        rgba[:, ::2] = 0
    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "La", "P", "1", "CMYK", "I;16", "I", "F"]))
    if mode == "I;16":
        return sixteen_bit(width, height, seed)
    if mode in ("I", "F"):
        values = draw(st.sampled_from([-(2**31), -1, 0, 65535, 2**31 - 1]))
        grid = np.random.default_rng(seed).integers(-(2**31), 2**31 - 1, (height, width)).astype(np.int32)
        grid.flat[0] = values
        return Image.fromarray(grid if mode == "I" else grid.astype(np.float32))
    return Image.fromarray(rgba, "RGBA").convert(mode)


@fuzz(400)
@given(small_images(), st.text(flavoured, max_size=300))
def test_every_preset_stays_in_range(image: Image.Image, instruction: str) -> None:
    for preset in PRESET_CHOICES:
        guidance = choose_guidance(preset, image, instruction)
        assert TEXT_CFG_RANGE[0] <= guidance.text_cfg <= TEXT_CFG_RANGE[1]
        assert IMAGE_CFG_RANGE[0] <= guidance.image_cfg <= IMAGE_CFG_RANGE[1]
        check_options(guidance.text_cfg, guidance.image_cfg, STEPS_RANGE[0], SEED_RANGE[0])
        if preset == "auto":
            assert guidance.image_cfg >= MIN_GUIDED_IMAGE_CFG
        assert guidance.reason.endswith(".")

