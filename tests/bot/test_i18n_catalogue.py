"""Every shipped language has every English message, with the same placeholders."""

from __future__ import annotations

import pytest

from bot import i18n


@pytest.mark.parametrize("language", [lang for lang in i18n.LANGUAGES if lang != i18n.REFERENCE])
def test_every_message_has_an_entry_in_each_shipped_language(language: str) -> None:
    missing = sorted(set(i18n.catalogue(i18n.REFERENCE)) - set(i18n.catalogue(language)))
    assert not missing, f"{language} lacks {missing}"


@pytest.mark.parametrize("language", [lang for lang in i18n.LANGUAGES if lang != i18n.REFERENCE])
def test_no_translation_drops_or_adds_a_placeholder(language: str) -> None:
    english, other = i18n.catalogue(i18n.REFERENCE), i18n.catalogue(language)
    wrong = {key: (sorted(i18n.placeholders(english[key])), sorted(i18n.placeholders(other[key])))
             for key in english.keys() & other.keys()
             if i18n.placeholders(english[key]) != i18n.placeholders(other[key])}
    assert not wrong, f"{language}: placeholders differ {wrong}"


@pytest.mark.parametrize("language", list(i18n.LANGUAGES))
def test_no_language_has_keys_english_lacks(language: str) -> None:
    assert not set(i18n.catalogue(language)) - set(i18n.catalogue(i18n.REFERENCE))


def test_the_catalogue_check_catches_a_dropped_placeholder(tmp_path, monkeypatch) -> None:
    for language, body in (("en", 'x = "wait {seconds} s"'), ("de", 'x = "warte Sekunden"')):
        (tmp_path / language).mkdir()
        (tmp_path / language / "area.toml").write_text(body, encoding="utf-8")
    monkeypatch.setattr(i18n, "LOCALES_DIR", tmp_path)
    i18n.catalogue.cache_clear()
    try:
        with pytest.raises(AssertionError, match="placeholders differ"):
            test_no_translation_drops_or_adds_a_placeholder("de")
    finally:
        i18n.catalogue.cache_clear()


@pytest.mark.parametrize(("locale", "language"), [("en-US", "en"), ("en-GB", "en"), ("de", "de"), ("es-ES", "es"),
                                                  ("es-419", "es"), ("fr", "fr"), ("ja", "ja"), ("pt-BR", "pt-BR"),
                                                  ("ko", "en"), (None, "en")])
def test_discord_locales_map_to_shipped_languages(locale, language) -> None:
    assert i18n.language_of(locale) == language


def test_text_fills_placeholders_and_falls_back_to_english() -> None:
    assert i18n.text("common.random_weights", "de").startswith("ZUFÄLLIGE")
    assert i18n.text("common.random_weights", "ko") == i18n.text("common.random_weights")
    with pytest.raises(KeyError):
        i18n.text("common.no_such_message", "de")


@pytest.mark.parametrize("language", list(i18n.LANGUAGES))
def test_texts_with_discord_length_limits_fit_in_every_language(language: str) -> None:
    """Modal titles and text-input labels take 45 characters at most, button labels 80."""
    messages = i18n.catalogue(language)
    limits = {key: 45 for key in ("edit.modal_title", "edit.modal_label", "results.refine_title",
                                  "results.refine_label")}
    limits.update({key: 80 for key in messages if key.startswith("results.button_") or key.startswith("admin.forget_y")
                   or key == "admin.forget_no"})
    too_long = {key: len(messages[key]) for key, limit in limits.items() if len(messages[key]) > limit}
    assert not too_long, f"{language}: {too_long}"
