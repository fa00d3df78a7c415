"""Edit options and their sane ranges, checked the same way by the bot (before queueing) and the engine.

Kept free of torch so the bot can validate without loading anything heavy.
"""

from __future__ import annotations

from .errors import BadRequestError

TEXT_CFG_RANGE = (1.0, 20.0)
IMAGE_CFG_RANGE = (0.0, 10.0)
STEPS_RANGE = (1, 200)
SEED_RANGE = (0, 2**63 - 1)
DEFAULT_SEED = 13331
DEFAULT_TEXT_CFG = 7.5
DEFAULT_IMAGE_CFG = 1.5
DEFAULT_STEPS = 100


def _shown(value: object) -> str:
    """The rejected value, short: echoing a 5000-digit int would fail (str() refuses) or flood the message."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value) if abs(value) < 10**15 else "a number far out of range"
    return type(value).__name__


def check_options(text_cfg: float, image_cfg: float, steps: int, seed: int) -> None:
    """Raise BadRequestError with a message fit for a user when any option is out of range."""

    def within(name: str, value: float, bounds: tuple[float, float]) -> None:
        # No math.isfinite(): it converts ints to float, which overflows past 1e308. Python compares int with
        # float exactly, and NaN fails every comparison, so the bounds check alone refuses nan and inf.
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not bounds[0] <= value <= bounds[1]:
            raise BadRequestError(f"{name} must be between {bounds[0]:g} and {bounds[1]:g} (got {_shown(value)}).",
                                  key="engine.option_out_of_range", name=name, low=f"{bounds[0]:g}",
                                  high=f"{bounds[1]:g}", value=_shown(value))

    within("text_cfg", text_cfg, TEXT_CFG_RANGE)
    within("image_cfg", image_cfg, IMAGE_CFG_RANGE)
    if not isinstance(steps, int) or isinstance(steps, bool) or not STEPS_RANGE[0] <= steps <= STEPS_RANGE[1]:
        raise BadRequestError(f"steps must be a whole number from {STEPS_RANGE[0]} to {STEPS_RANGE[1]}.",
                              key="engine.steps_out_of_range", low=STEPS_RANGE[0], high=STEPS_RANGE[1])
    if not isinstance(seed, int) or isinstance(seed, bool) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise BadRequestError(f"seed must be a whole number from 0 to {SEED_RANGE[1]}.", key="engine.seed_out_of_range",
                              high=SEED_RANGE[1])
