"""Discord-style snowflake ids, derived from the fake clock so ids sort by creation time."""

from __future__ import annotations

import itertools
from collections.abc import Callable

DISCORD_EPOCH_MS = 1_420_070_400_000


class SnowflakeGenerator:
    """Makes unique, time-ordered 64-bit ids the way Discord does (ms << 22 | worker | counter).

    Bots rely on ``snowflake_time(id)``; tying the timestamp to the fake clock keeps that
    consistent when a test advances time.
    """

    def __init__(self, now: Callable[[], float], worker: int = 1, process: int = 0) -> None:
        self._now = now
        self._worker = worker & 0x1F
        self._process = process & 0x1F
        self._counter = itertools.count()
        self._last = 0

    def next(self) -> int:
        """Return a new snowflake, strictly greater than every earlier one."""
        ms = int(self._now() * 1000) - DISCORD_EPOCH_MS
        value = (ms << 22) | (self._worker << 17) | (self._process << 12) | (next(self._counter) & 0xFFF)
        if value <= self._last:  # clock went backwards or >4096 ids in one ms: stay monotonic
            value = self._last + 1
        self._last = value
        return value


def snowflake_time(snowflake: int) -> float:
    """Unix time (seconds) encoded in ``snowflake``."""
    return ((int(snowflake) >> 22) + DISCORD_EPOCH_MS) / 1000
