"""Sentences built of translated parts (a result's "why these values"), stored with a job and shown later in
the reader's language."""

from __future__ import annotations

from PIL import Image

from bot import i18n
from bot.presets import choose_guidance


def test_the_auto_presets_reason_is_the_same_sentence_in_every_language() -> None:
    choice = choose_guidance("auto", Image.new("RGB", (64, 48), "white"), "make it red")
    assert choice.reason.startswith("auto: simple scene") and choice.reason_message is not None
    kept = i18n.stored(choice.reason_message)
    assert i18n.stored_text(kept, "en") == choice.reason
    german = i18n.stored_text(kept, "de")
    assert german.startswith("auto: einfache Szene (Kantendichte 0%) und eine kurze Anweisung (3 Wörter)")
    assert f"Text {choice.text_cfg:g}" in german or f"Text {choice.text_cfg:.1f}" in german
    assert i18n.stored_text(kept, "ja").startswith("自動：シンプルな場面")


def test_by_hand_values_and_guidance_off_notes_are_translated() -> None:
    choice = choose_guidance("dramatic", Image.new("RGB", (8, 8)), "x", image_cfg=0.5)
    french = i18n.stored_text(i18n.stored(choice.reason_message), "fr")
    assert "préréglage « dramatic »" in french and "image 0.5 choisie à la main" in french
    assert "désactive le guidage sans classifieur" in french


def test_plain_and_damaged_stored_text() -> None:
    assert i18n.stored_text("small object edit", "de") == "small object edit"  # rows from before
    assert i18n.stored_text(i18n.STORED_PREFIX + "{not json", "de") == ""
    assert i18n.stored_text(i18n.stored(i18n.message("render.reason_refine", turns=2)), "es") == \
        "refinamiento de una edición anterior; 2 turno(s) anterior(es) en el prompt"
