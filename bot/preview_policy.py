"""Live previews and the server's policy for flagged results.

A preview shows the picture before the optional safety check has seen the result, so it could show what
the check would then flag. Wherever a flagged result would not be shown plainly, no preview is shown
plainly either; the check has not run yet, so every preview is treated as possibly flagged:

- the server turned previews off: none (:attr:`PreviewMode.OFF`);
- no safety check runs, or the channel is age-restricted: plain previews (a flagged result would be
  shown plainly there too);
- the server withholds flagged results: none (:attr:`PreviewMode.WITHHELD`), and a preview already shown
  is taken down should the policy change while the edit runs;
- the server sends flagged results behind a spoiler: every preview behind a spoiler
  (``SPOILER_preview.jpg``).
"""

from __future__ import annotations

import enum

from .storage import GuildSettings


class PreviewMode(enum.Enum):
    """How a job's live previews are shown."""

    OFF = "off"  # the server's previews setting
    WITHHELD = "withheld"  # the server withholds flagged results here
    SPOILER = "spoiler"
    PLAIN = "plain"

    @property
    def shown(self) -> bool:
        """Whether previews go out at all (and the worker makes them)."""
        return self in (PreviewMode.SPOILER, PreviewMode.PLAIN)


def preview_mode(settings: GuildSettings, *, safety_check: bool, age_restricted: bool) -> PreviewMode:
    """How previews are shown for a job in a channel with ``settings``; see the module docstring."""
    if not settings.previews:
        return PreviewMode.OFF
    if not safety_check or age_restricted:
        return PreviewMode.PLAIN
    if settings.flagged_outputs == "withhold":
        return PreviewMode.WITHHELD
    return PreviewMode.SPOILER
