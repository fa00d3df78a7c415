"""Checks on what users type, and clean-up of what the model writes back."""

from __future__ import annotations

import re
import unicodedata

from .errors import BadRequestError

MAX_INSTRUCTION_CHARS = 300
_IGNORED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn"}


def normalize_instruction(text: str, max_chars: int = MAX_INSTRUCTION_CHARS) -> str:
    """Return the instruction as the model should see it, or raise BadRequestError.

    Control and format characters go (they only confuse the tokenizer and can hide text), runs of
    whitespace collapse to one space, and the length is checked after that clean-up.
    """
    if not isinstance(text, str):
        raise BadRequestError("The instruction must be text.", key="engine.instruction_not_text")
    kept = "".join(" " if ch.isspace() else ch for ch in text if unicodedata.category(ch) not in _IGNORED_CATEGORIES or ch.isspace())
    cleaned = re.sub(r"\s+", " ", kept).strip()
    if not cleaned:
        raise BadRequestError("Please describe the edit, e.g. 'make the sky a sunset'.", key="engine.instruction_empty")
    if len(cleaned) > max_chars:
        raise BadRequestError(f"The instruction is too long ({len(cleaned)} characters); keep it under {max_chars}.",
                              key="engine.instruction_too_long", length=len(cleaned), limit=max_chars)
    return cleaned


def clean_expressive(text: str) -> str:
    """Trim the model's answer to the part worth showing, as Apple's demo does (`remove_alter`).

    Cut at the end-of-sequence marker, at any offered "alternative" and at the first visual token,
    then keep the first two sentences. ``text`` is the decoded answer alone (after "ASSISTANT:").
    """
    s = text
    if "ASSISTANT:" in s:
        s = s[s.index("ASSISTANT:") + len("ASSISTANT:"):].strip()
    if "</s>" in s:
        s = s[: s.index("</s>")].strip()
    alt = re.search("alternative", s, flags=re.IGNORECASE)
    if alt:
        s = s[: alt.start()]
    if "[IMG0]" in s:
        s = s[: s.index("[IMG0]")]
    s = ".".join(part.strip() for part in s.split(".")[:2])
    if not s:
        return ""
    if not s.endswith("."):
        s += "."
    return s.strip()
