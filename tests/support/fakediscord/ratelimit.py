"""Per-route rate-limit buckets with Discord's headers, plus injectable 429s for fault tests.

discord.py reads ``X-RateLimit-*`` to pre-emptively wait, and only treats a 429 as a rate
limit when it carries a ``Via`` header (otherwise it assumes a Cloudflare ban), so both are
sent the way Discord sends them. Windows run on real (monotonic) time because the bot sleeps
in real time.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BucketConfig:
    limit: int
    window: float


@dataclass
class Injection:
    route: str
    retry_after: float
    remaining: int
    is_global: bool
    scope: str


@dataclass
class RateLimitHit:
    """A 429 the fake sent (injected or earned)."""

    route: str
    retry_after: float
    injected: bool
    is_global: bool
    at: float = field(default_factory=time.monotonic)


@dataclass
class Decision:
    headers: dict[str, str]
    retry_after: float | None = None
    body: dict[str, Any] | None = None


class RateLimiter:
    """Counts requests per (route, major parameters) window and produces headers or a 429."""

    def __init__(self, default: BucketConfig | None = None) -> None:
        self.default = default or BucketConfig(limit=50, window=1.0)
        self.configs: dict[str, BucketConfig] = {}
        self._windows: dict[tuple[str, str], tuple[float, int]] = {}
        self._injections: list[Injection] = []
        self.hits: list[RateLimitHit] = []

    def set_limit(self, route: str, limit: int, window: float) -> None:
        """Give ``route`` (e.g. ``"POST /channels/{channel_id}/messages"``) its own bucket size."""
        self.configs[route] = BucketConfig(limit, window)

    def inject_429(self, route: str, *, retry_after: float = 0.5, times: int = 1, is_global: bool = False,
                   scope: str = "user") -> None:
        """Answer the next ``times`` requests matching ``route`` (fnmatch pattern) with a 429."""
        self._injections.append(Injection(route, retry_after, times, is_global, scope))

    def config_for(self, route: str) -> BucketConfig:
        return self.configs.get(route, self.default)

    @staticmethod
    def bucket_hash(route: str) -> str:
        return hashlib.sha1(route.encode()).hexdigest()[:32]

    def check(self, route: str, major: str) -> Decision:
        now = time.monotonic()
        cfg = self.config_for(route)
        bucket = self.bucket_hash(route)
        for inj in self._injections:
            if inj.remaining > 0 and fnmatch.fnmatchcase(route, inj.route):
                inj.remaining -= 1
                self.hits.append(RateLimitHit(route, inj.retry_after, True, inj.is_global))
                return self._limited(bucket, cfg, inj.retry_after, inj.is_global, inj.scope)
        key = (route, major)
        start, count = self._windows.get(key, (now, 0))
        if now - start >= cfg.window:
            start, count = now, 0
        reset_after = max(cfg.window - (now - start), 0.0)
        if count >= cfg.limit:
            self.hits.append(RateLimitHit(route, reset_after, False, False))
            return self._limited(bucket, cfg, reset_after, False, "user")
        count += 1
        self._windows[key] = (start, count)
        return Decision(headers=self._headers(bucket, cfg.limit, cfg.limit - count, reset_after))

    @staticmethod
    def _headers(bucket: str, limit: int, remaining: int, reset_after: float) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(remaining, 0)),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": bucket,
        }

    def _limited(self, bucket: str, cfg: BucketConfig, retry_after: float, is_global: bool, scope: str) -> Decision:
        headers = self._headers(bucket, cfg.limit, 0, retry_after)
        headers["Retry-After"] = str(math.ceil(retry_after))
        headers["X-RateLimit-Scope"] = scope
        if is_global:
            headers["X-RateLimit-Global"] = "true"
        body = {"message": "You are being rate limited.", "retry_after": round(retry_after, 3), "global": is_global}
        return Decision(headers=headers, retry_after=retry_after, body=body)
