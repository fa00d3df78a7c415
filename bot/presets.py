"""Guidance presets for an edit: named text/image CFG pairs and an 'auto' choice from the picture and the words.

It runs in the bot before a job is queued, so it uses PIL and numpy only (no torch, no discord).

The 'auto' rules follow the project's MGIE text/image CFG study (Taser, section 6 and figures 3-7): simple
scenes with short instructions edit best at text 7 / image 2, which kept colours natural and the scene intact
where 8.5 / 0.7 recoloured the whole picture; complex scenes that need larger edits call for stronger text
guidance. The study gives directions, not numbers, so the thresholds below are our calibration of them.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
from PIL import Image

from . import i18n

__all__ = [
    "PRESETS",
    "PRESET_CHOICES",
    "CfgChoice",
    "choose_guidance",
    "edge_density",
    "instruction_complexity",
]

PRESETS: dict[str, tuple[float, float]] = {"preserve": (7.0, 2.0), "balanced": (7.5, 1.5), "dramatic": (8.5, 0.7)}
PRESET_CHOICES = ("auto", "preserve", "balanced", "dramatic")

# --- Scene complexity (edge density) -----------------------------------------------------------------------
EDGE_ANALYSIS_SIDE = 256
"""Long side the picture is reduced to before measuring, so the same scene scores alike at any upload size."""

EDGE_THRESHOLD = 0.1
"""Sobel magnitude, as a fraction of a full black-to-white step, that counts as an edge: about a 25-level
step, well above JPEG noise and sensor grain, so only structure the model must keep intact is counted."""

SIMPLE_EDGE_DENSITY = 0.05
"""At or below this the scene is 'simple' (a sky, a studio shot): the study's case for keeping image strength up."""

BUSY_EDGE_DENSITY = 0.25
"""At or above this the scene is 'busy' (foliage, crowds, texture): the study's complex scene. For scale, a
soft-focus photo of a circuit board measures about 0.23 and a sharp one about 0.5."""

# --- Instruction complexity --------------------------------------------------------------------------------
SHORT_INSTRUCTION_WORDS = 6
"""Up to this many words is 'short': the study's 'Make the tree leaves green' (5 words) did best at 7 / 2."""

LONG_INSTRUCTION_WORDS = 30
"""From this many words on, an instruction is 'long': several sentences' worth of change for the model."""

MANY_EDITS = 4
"""This many distinct edits (clauses split by commas, 'and', 'then', sentence ends) scores as fully multi-part."""

CJK_CHARS_PER_WORD = 2.0
"""Chinese and Japanese have no spaces; about two characters carry an English word's meaning."""

WORDS_WEIGHT = 0.5
"""Share of instruction complexity from length; the rest comes from the number of edits, so a long instruction
for one change and a terse list of four changes both land mid-way, and only long multi-part ones reach 1."""

# --- Combining both into 'auto' ----------------------------------------------------------------------------
SCENE_WEIGHT = 0.4
"""Share of the complexity score from the scene; the instruction gets the rest (0.6) because the study ties
the need for stronger text guidance to how much editing is asked for, a busy picture alone to keeping edges."""

STRONG_TEXT_POINT: tuple[float, float] = (8.5, 1.2)
"""'auto' at full complexity: the study's strong text scale, with image guidance kept above 1 (see below)."""

MIN_GUIDED_IMAGE_CFG = 1.0
"""diffusers (and our pipeline) switch classifier-free guidance off entirely when image_cfg < 1, so 'auto'
never goes below it: in diffusers the study's 8.5 / 0.7 run, which recoloured the whole picture, ran unguided."""

# Ideographs, kana and their half-width forms; Hangul is left out because Korean separates words by spaces.
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f]")
_WORD = re.compile(r"\w+(?:['\u2019]\w+)*")
_EDIT_SEPARATOR = re.compile(r"[,;.!?\uff0c\u3001\uff1b\u3002\uff01\uff1f]|\b(?:and|then)\b|\u7136\u540e",
                             re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class CfgChoice:
    """The guidance scales for one edit, with a sentence telling the user why they were picked."""

    text_cfg: float
    image_cfg: float
    preset: str
    """The preset name, or 'custom' when the user gave both values."""
    reason: str
    """In English; ``reason_message`` is the same sentence for any language (bot.i18n)."""
    reason_message: i18n.Message | None = None


@dataclasses.dataclass(frozen=True)
class _Words:
    words: float
    edits: int
    has_cjk: bool


def _ramp(value: float, low: float, high: float) -> float:
    """0 at or below `low`, 1 at or above `high`, linear between: monotone, so more never scores less."""
    return min(1.0, max(0.0, (value - low) / (high - low)))


def _grey(image: Image.Image) -> np.ndarray:
    """8-bit grey levels, reduced so the long side is at most EDGE_ANALYSIS_SIDE (never enlarged)."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # Transparent pixels often hide junk colours; flatten on white as the bot does before editing.
        rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")  # PIL lacks La -> RGBA
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit samples, as the engine reads them; PIL's convert('L') would clip them at 255 (mostly white).
        values = np.clip(np.asarray(image, dtype=np.float32), 0, 65535) / 257.0
        image = Image.fromarray(values.round().astype(np.uint8))
    grey = image.convert("L")
    width, height = grey.size
    scale = EDGE_ANALYSIS_SIDE / max(width, height)
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        grey = grey.resize(size, Image.Resampling.BOX, reducing_gap=2.0)
    return np.asarray(grey, dtype=np.float32)


def edge_density(image: Image.Image) -> float:
    """Fraction of edge pixels in [0, 1], the study's 'image complexity'.

    Grey levels, reduced to a long side of EDGE_ANALYSIS_SIDE (area averaging, so upload size barely matters;
    smaller images are measured as they are), Sobel gradient magnitude over a full-step scale, and the share
    of pixels above EDGE_THRESHOLD. Borders are padded by repetition so the frame itself is not an edge.
    A flat image gives 0; noise or a fine checkerboard gives most of the picture.
    """
    grey = _grey(image)
    p = np.pad(grey, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    magnitude = np.hypot(gx, gy) / (4 * 255.0)
    return float(np.mean(magnitude > EDGE_THRESHOLD))


def _measure(instruction: str) -> _Words:
    cjk = len(_CJK.findall(instruction))
    latin = len(_WORD.findall(_CJK.sub(" ", instruction)))
    # A trailing separator leaves an empty clause, which is not counted: adding text never lowers the count.
    edits = sum(1 for clause in _EDIT_SEPARATOR.split(instruction) if any(ch.isalnum() for ch in clause))
    return _Words(words=latin + cjk / CJK_CHARS_PER_WORD, edits=max(1, edits), has_cjk=cjk > 0)


def instruction_complexity(instruction: str) -> float:
    """In [0, 1]: the study's 'text length' plus how many separate changes are asked for.

    WORDS_WEIGHT * ramp(words, SHORT_INSTRUCTION_WORDS, LONG_INSTRUCTION_WORDS)
    + (1 - WORDS_WEIGHT) * ramp(edits, 1, MANY_EDITS); CJK characters count as half a word each.
    0 for 'make it red', near 1 for a long multi-part instruction; appending text never lowers it.
    """
    return _complexity(_measure(instruction))


def _complexity(m: _Words) -> float:
    words = _ramp(m.words, SHORT_INSTRUCTION_WORDS, LONG_INSTRUCTION_WORDS)
    edits = _ramp(m.edits, 1, MANY_EDITS)
    return WORDS_WEIGHT * words + (1.0 - WORDS_WEIGHT) * edits


def _num(value: float) -> str:
    return f"{value:.1f}" if round(value, 1) == value else f"{value:g}"


def _auto(image: Image.Image, instruction: str) -> tuple[float, float, i18n.Message]:
    """Interpolate from 'preserve' to STRONG_TEXT_POINT by c = SCENE_WEIGHT*scene + (1-SCENE_WEIGHT)*instruction."""
    density, m = edge_density(image), _measure(instruction)
    scene = _ramp(density, SIMPLE_EDGE_DENSITY, BUSY_EDGE_DENSITY)
    c = SCENE_WEIGHT * scene + (1.0 - SCENE_WEIGHT) * _complexity(m)
    (t0, i0), (t1, i1) = PRESETS["preserve"], STRONG_TEXT_POINT
    text_cfg = round(t0 + (t1 - t0) * c, 1)
    image_cfg = max(MIN_GUIDED_IMAGE_CFG, round(i0 + (i1 - i0) * c, 1))

    if density <= SIMPLE_EDGE_DENSITY:
        scene_words = i18n.message("presets.scene_simple")
    elif density >= BUSY_EDGE_DENSITY:
        scene_words = i18n.message("presets.scene_busy")
    else:
        scene_words = i18n.message("presets.scene_moderate")
    if m.words <= SHORT_INSTRUCTION_WORDS:
        length = i18n.message("presets.length_short")
    elif m.words >= LONG_INSTRUCTION_WORDS:
        length = i18n.message("presets.length_long")
    else:
        length = i18n.message("presets.length_medium")
    words = round(m.words)
    count = i18n.message("presets.words_one" if words == 1 else "presets.words_many",
                         approx="~" if m.has_cjk else "", words=words)
    if m.edits > 1:
        length = i18n.message("presets.length_multi", length=length)
        count = i18n.message("presets.words_edits", count=count, edits=m.edits)
    if c < 1 / 3:
        lean = i18n.message("presets.lean_close")
    elif c < 2 / 3:
        lean = i18n.message("presets.lean_balance")
    else:
        lean = i18n.message("presets.lean_instruction")
    why = i18n.message("presets.auto", scene=scene_words, density=f"{density:.0%}", length=length, count=count,
                       lean=lean)
    return text_cfg, image_cfg, why


def choose_guidance(preset: str, image: Image.Image, instruction: str,
                    text_cfg: float | None = None, image_cfg: float | None = None) -> CfgChoice:
    """Pick the scales for one edit and say why, so the user sees what 'auto' did and can override it.

    'auto' applies the study (see _auto and the module constants) and keeps image_cfg >= 1 so guidance stays
    on; named presets return PRESETS as they are. An explicit text_cfg or image_cfg replaces that one value
    (the preset becomes 'custom' when both are given); range checks are left to the engine's check_request.
    Raises ValueError for an unknown preset or a non-finite value.
    """
    name = preset.strip().lower()
    if name not in PRESET_CHOICES:
        raise ValueError(f"Unknown preset {preset!r}; choose one of: {', '.join(PRESET_CHOICES)}.")
    for label, value in (("text_cfg", text_cfg), ("image_cfg", image_cfg)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{label} must be a finite number, got {value!r}.")

    if text_cfg is not None and image_cfg is not None:
        name, text, img, why = "custom", float(text_cfg), float(image_cfg), i18n.message("presets.custom")
    elif name == "auto":
        text, img, why = _auto(image, instruction)
    else:
        text, img = PRESETS[name]
        why = i18n.message("presets.named", name=name, blurb=i18n.message(f"presets.blurb_{name}"))

    text_words = i18n.message("presets.text_value", value=_num(text))
    image_words = i18n.message("presets.image_value", value=_num(img))
    if name != "custom":
        if text_cfg is not None:
            text, text_words = float(text_cfg), i18n.message("presets.text_by_hand", value=_num(text_cfg))
        if image_cfg is not None:
            img, image_words = float(image_cfg), i18n.message("presets.image_by_hand", value=_num(image_cfg))
    note: object = ""
    if img < MIN_GUIDED_IMAGE_CFG:
        note = i18n.message("presets.image_guidance_off", minimum=_num(MIN_GUIDED_IMAGE_CFG))
    elif text <= 1.0:
        note = i18n.message("presets.text_guidance_off")
    reason = i18n.message("presets.reason", why=why, text=text_words, image=image_words, note=note)
    return CfgChoice(text_cfg=text, image_cfg=img, preset=name, reason=i18n.render(reason), reason_message=reason)
