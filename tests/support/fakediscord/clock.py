"""An injectable clock: real time plus a test-controlled offset."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime


class FakeClock:
    """Wall clock that tests can push forward without sleeping.

    Interaction deadlines (3 s to acknowledge, 15 min token lifetime), message timestamps and
    snowflakes all read this clock, so ``clock.advance(900)`` ages every token at once while
    the bot keeps running in real time.
    """

    def __init__(self, start: float | None = None) -> None:
        self._offset = 0.0 if start is None else start - time.time()
        self._listeners: list[Callable[[], None]] = []

    def now(self) -> float:
        """Current fake Unix time in seconds."""
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        """Jump forward by ``seconds``; deadline checks run immediately."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self._offset += seconds
        for listener in list(self._listeners):
            listener()

    def on_advance(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every :meth:`advance` (used for deadline sweeps)."""
        self._listeners.append(listener)

    def iso(self, at: float | None = None) -> str:
        """ISO-8601 timestamp (UTC) as Discord formats it."""
        return datetime.fromtimestamp(self.now() if at is None else at, UTC).isoformat()
