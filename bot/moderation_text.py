"""The server word filter: the folded form text is compared in, and whether a blocked word appears in it.

Folding (:func:`fold_text`) undoes the usual disguises, the same way for the moderators' list and for
instructions, so both sides meet in one form:

* fullwidth and "styled" letters (ｂａｄ, 𝐛𝐚𝐝, ⓑⓐⓓ) by NFKC; case (ß, Σ) by casefold;
* decorative combining marks (accents, Zalgo, strike-through) and invisible characters (zero-width
  spaces and joiners, soft hyphens, bidi controls) are dropped; blank-rendering letters (Hangul fillers,
  the Braille blank) become spaces;
* look-alike letters from other scripts (Cyrillic а, Greek Β, Cherokee Ꭺ, ɓ, ...) become the Latin letter
  they imitate, by the Unicode TR39 confusables table as the ``disarm`` library maintains it. Only
  non-ASCII characters are mapped: TR39 also maps plain ASCII ("m" to "rn", "d" to "cl", "I" to "l"),
  which would make "bum" match a blocked "burn" and "down" a blocked "clown", so ordinary text is only
  case-folded, exactly as before.

Matching (:func:`contains_blocked_word`) keeps the filter's whole-word semantics for ordinary text: a
blocked word matches only where it is not part of a longer word, so "class" never matches "ass" and
"badass" never matches "bad". The one exception is text spelled out a character at a time ("b a d",
"b.a.d", "b-a-d"): a run of two or more single-character words is joined and searched inside, because
the writer has removed the word boundaries on purpose. Inside such a run a blocked word matches
anywhere, so "draw a b a d sign" is caught despite the article glued to its front (and "c l a s s"
matches "ass": spelling a word out letter by letter is not ordinary text). Words split unevenly
("ba d") are not caught; a reader sees two words there too.
"""

from __future__ import annotations

import functools
import re
import unicodedata

import disarm

# Combining marks that only decorate Latin-like letters (accents, Zalgo, under/strike-through, enclosing
# circles) and variation selectors: dropped so "b\u0336a\u0336d\u0336" matches "bad". Marks that are part of a
# script's spelling (e.g. Indic vowel signs) are kept, or unrelated words would collide.
_DECORATIVE_MARKS = re.compile("[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe00-\ufe0f\ufe20-\ufe2f]")
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf"})  # zero-width spaces/joiners, soft hyphens, bidi controls
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_MAX_FOLD_PASSES = 4  # case folding can expose another confusable (Ω -> ω -> w); two passes settle almost all
_SEPARATOR_CATEGORIES = ("P", "S", "Z")  # punctuation, symbols, spaces: what spells a word out


def _clean(text: str) -> str:
    decomposed = _DECORATIVE_MARKS.sub("", unicodedata.normalize("NFKD", text))
    visible = "".join(ch for ch in decomposed if ch.isspace() or unicodedata.category(ch) not in _INVISIBLE_CATEGORIES)
    return unicodedata.normalize("NFKC", visible)


def _fold_confusables(text: str) -> str:
    """Map non-ASCII look-alikes to the Latin letters they imitate (TR39); ASCII passes untouched."""
    return _NON_ASCII.sub(lambda run: disarm.normalize_confusables(run.group()), text)


def fold_text(text: str) -> str:
    """The form block-list words are stored in and instructions are matched in (see the module docstring)."""
    folded = _clean(disarm.collapse_whitespace(text))
    for _ in range(_MAX_FOLD_PASSES):
        again = _clean(_fold_confusables(folded).casefold())
        if again == folded:
            break
        folded = again
    return disarm.collapse_whitespace(folded)


def _is_separator(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch).startswith(_SEPARATOR_CATEGORIES)


def _without_separators(text: str) -> str:
    return "".join(ch for ch in text if not _is_separator(ch))


def spelled_out_runs(folded: str) -> list[str]:
    """Runs of two or more single-character words in folded text, joined: "make it b.a.d" -> ["bad"]."""
    words = "".join(" " if _is_separator(ch) else ch for ch in folded).split()
    runs: list[str] = []
    current: list[str] = []
    for word in [*words, ""]:
        if len(word) == 1 and word.isalnum():
            current.append(word)
            continue
        if len(current) >= 2:
            runs.append("".join(current))
        current = []
    return runs


@functools.lru_cache(maxsize=256)
def _blocked_patterns(words: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[str]] | None:
    r"""Whole-word and spelled-out patterns for one list (cached).

    (?<!\w)...(?!\w) rather than \b, so entries may start or end in punctuation.
    """
    folded = {fold_text(w) for w in words} - {""}
    if not folded:
        return None
    longest_first = sorted(folded, key=len, reverse=True)
    whole = re.compile(rf"(?<!\w)(?:{'|'.join(map(re.escape, longest_first))})(?!\w)")
    joined = sorted({_without_separators(w) for w in folded} - {""}, key=len, reverse=True)
    inside = re.compile("|".join(map(re.escape, joined))) if joined else re.compile(r"(?!)")
    return whole, inside


def contains_blocked_word(instruction: str, words: list[str]) -> bool:
    """Whether a blocked word or phrase appears in ``instruction`` (whole words, compared after fold_text)."""
    patterns = _blocked_patterns(tuple(words))
    if patterns is None:
        return False
    whole, inside = patterns
    folded = fold_text(instruction)
    return whole.search(folded) is not None or any(inside.search(run) for run in spelled_out_runs(folded))
