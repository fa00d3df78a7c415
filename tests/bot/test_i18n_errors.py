"""Errors users may see carry a message key: the engine's English is the catalogue's, and the bot shows
them in the reader's language, also when only the English text arrived (a worker over Redis)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from bot import i18n
from bot.downloads import check_attachment_meta
from bot.intake import Refusal
from mgie_engine.errors import BadImageError, MgieError
from mgie_engine.faults import user_error
from mgie_engine.images import fit_size, load_image
from mgie_engine.instructions import normalize_instruction
from mgie_engine.options import check_options


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


ENGINE_FAILURES = {
    "engine.image_empty": lambda: load_image(b""),
    "engine.image_not_an_image": lambda: load_image(b"plain text, no picture"),
    "engine.image_damaged": lambda: load_image(_png(32, 32)[:60]),
    "engine.image_too_large": lambda: load_image(b"x" * 2048, max_bytes=1024),
    "engine.image_too_many_pixels": lambda: load_image(_png(40, 30), max_pixels=100),
    "engine.image_no_pixels": lambda: fit_size(0, 5),
    "engine.image_too_thin": lambda: fit_size(1700, 10),
    "engine.instruction_not_text": lambda: normalize_instruction(42),
    "engine.instruction_empty": lambda: normalize_instruction("   "),
    "engine.instruction_too_long": lambda: normalize_instruction("word " * 100),
    "engine.option_out_of_range": lambda: check_options(25.0, 1.5, 10, 1),
    "engine.steps_out_of_range": lambda: check_options(7.5, 1.5, 0, 1),
    "engine.seed_out_of_range": lambda: check_options(7.5, 1.5, 10, -1),
    "engine.gpu_out_of_memory": lambda: (_ for _ in ()).throw(user_error(RuntimeError("CUDA out of memory"))),
    "engine.gpu_failed": lambda: (_ for _ in ()).throw(user_error(ValueError("bad shape"))),
}


@pytest.mark.parametrize("key", sorted(ENGINE_FAILURES))
def test_engine_errors_carry_their_key_and_the_catalogues_english(key: str) -> None:
    with pytest.raises(MgieError) as caught:
        ENGINE_FAILURES[key]()
    err = caught.value
    assert err.key == key
    assert str(err) == i18n.text(key, "en", **err.params)  # logs and the CLI keep the same English
    for language in i18n.LANGUAGES:
        assert i18n.error_text(err, language) == i18n.text(key, language, **err.params)
    assert i18n.error_text(err, "de") != str(err)


@pytest.mark.parametrize("key", sorted(ENGINE_FAILURES))
def test_an_engine_error_that_arrives_as_english_text_is_translated(key: str) -> None:
    """A worker over Redis sends str(err) only: the bot recognizes the catalogue's English."""
    with pytest.raises(MgieError) as caught:
        ENGINE_FAILURES[key]()
    text_only = MgieError(str(caught.value))
    assert i18n.error_text(text_only, "ja") == i18n.text(key, "ja", **caught.value.params)
    assert i18n.translate_english("Some message the catalogue does not know.", "ja") == \
        "Some message the catalogue does not know."


def test_refusals_and_download_errors_are_english_for_logs_and_translated_for_users() -> None:
    refusal = Refusal("errors.pending_cap", pending=2, cap=2)
    assert str(refusal).startswith("You already have 2 edit(s) waiting")
    assert i18n.error_text(refusal, "fr").startswith("Tu as déjà 2 modification(s) en attente")
    with pytest.raises(BadImageError) as caught:
        check_attachment_meta("cat.bmp", "image/bmp", 10, 1024)
    assert str(caught.value) == "cat.bmp is not a PNG, JPEG, WEBP or GIF image (image/bmp)."
    assert i18n.error_text(caught.value, "es") == "cat.bmp no es una imagen PNG, JPEG, WEBP o GIF (image/bmp)."


@pytest.mark.parametrize("english", ["This image is too large for the GPU workers.",
                                     "The input image of this edit was lost on the server; please send it again.",
                                     "The edit failed on a GPU worker."])
def test_the_redis_pools_own_failures_are_recognized_and_translated(english: str) -> None:
    """bot/redis_engine.py raises these as plain English MgieErrors; users still read them translated."""
    matched = i18n.match_english(english)
    assert matched is not None and i18n.text(matched[0], "en") == english
    assert i18n.error_text(MgieError(english), "pt-BR") == i18n.text(matched[0], "pt-BR") != english
