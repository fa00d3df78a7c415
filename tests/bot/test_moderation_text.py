"""The server word filter against look-alike letters, spelled-out words and other disguises.

Each disguised case must still match, and ordinary text must keep the whole-word semantics the filter
always had ("class" never matches "ass", plain ASCII is never rewritten), so nobody is refused for an
innocent instruction.
"""

from __future__ import annotations

import pytest

from bot.intake import contains_blocked_word
from bot.moderation_text import fold_text

WORDS = ["bad", "evil plan", "ass", "burn", "clown", "ice"]


@pytest.mark.parametrize("instruction", [
    "make it b\u0430d",  # Cyrillic а
    "a \u0412\u0410D sign",  # Cyrillic В and А, capitals
    "\u13f4\u13aa\u13a0",  # Cherokee look-alikes of B A D
    "\u0253\u0105\u0257",  # hooked b, a with ogonek, hooked d
    "make it b a d",  # spelled out with spaces
    "make it b.a.d",  # ... with punctuation
    "make it b-a-d now",
    "make it b_a_d",
    "b . a . d",
    "b\u3164a\u3164d",  # Hangul filler, which renders blank
    "b\u2800a\u2800d",  # Braille blank
    "\uff42 \uff41 \uff44",  # fullwidth and spaced
    "b\u00ada\u00add",  # soft hyphens
    "b\u2060a\u2060d",  # word joiners
    "b\u0336a\u0336d\u0336",  # strike-through marks
    "draw a b a d thing",  # spelled out right after the article "a"
    "an e v i l p l a n",  # a blocked phrase spelled out
    "an \u0435vil \u0440lan",  # a phrase with Cyrillic е and р
])
def test_disguised_blocked_words_match(instruction):
    assert contains_blocked_word(instruction, WORDS)


@pytest.mark.parametrize("instruction", [
    "first class seats",  # "ass" inside a word: whole words only, as before
    "a classic bass guitar",
    "make it badass",
    "make him a bum",  # TR39 folds "m" to "rn" (burn); ASCII is never rewritten here
    "sit down",  # ... and "d" to "cl" (clown)
    "add an a and a b",  # single letters that spell nothing blocked
    "draw the letters x y z",
    "make the sky a sunset",
    "\u041c\u043e\u0441\u043a\u0432\u0430 at night",  # Moscow in Cyrillic
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0915\u093f\u0924\u093e\u092c",  # Hindi keeps its vowel signs
    "\u65e5\u672c\u8a9e\u3067\u7a7a\u3092\u8d64\u304f",
])
def test_ordinary_text_is_not_blocked(instruction):
    assert not contains_blocked_word(instruction, WORDS)


def test_ascii_is_only_case_folded():
    assert fold_text("Ice, burn & down | rn m l I 1 0 O") == "ice, burn & down | rn m l i 1 0 o"
    assert contains_blocked_word("Ice cream", WORDS)  # no I -> l folding of ordinary capitals


def test_blocked_words_in_other_scripts_still_match_and_catch_latin_look_alikes():
    words = [fold_text("\u0441\u0443\u043a\u0430")]  # Cyrillic, stored folded like any entry
    assert contains_blocked_word("\u043d\u0443 \u0441\u0443\u043a\u0430", words)
    assert contains_blocked_word("cyka", words)  # the same word typed with Latin look-alikes
    assert not contains_blocked_word("\u0441\u0443\u043a\u0430\u043c\u0438", words)  # whole words only


def test_folding_is_idempotent():
    for text in ["b\u0430d", "\uff42 \uff41 \uff44", "Stra\u00dfe", "\u13f4\u13aa\u13a0", "e v i l"]:
        assert fold_text(fold_text(text)) == fold_text(text)
