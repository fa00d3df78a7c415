"""Bot settings from the environment and `.env` (python-dotenv); engine settings come along."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from mgie_engine.settings import EngineSettings

DEFAULT_USER_JOBS_PER_MINUTE = 6  # a busy human re-rolls about this often; a script quickly hits it


class ConfigError(Exception):
    """A setting is missing or malformed; the message says which and how to fix it."""


def _ids(raw: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in raw.replace(" ", "").split(",") if part)
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated numeric ids, not {raw!r}.") from None


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}.") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}.")
    return value


def _float(env: Mapping[str, str], name: str, default: float, high: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, not {raw!r}.") from None
    if not 0 <= value <= high:
        raise ConfigError(f"{name} must be between 0 and {high:g}.")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    return default if not raw else raw in ("1", "true", "yes", "on")


@dataclasses.dataclass(frozen=True)
class BotConfig:
    token: str = dataclasses.field(repr=False)  # never printed, never logged
    api_base: str | None
    gateway_url: str | None
    guild_ids: tuple[int, ...]
    data_dir: Path
    message_content: bool
    max_queue: int
    progress_interval: float
    engine: EngineSettings
    stall_timeout: float = 300.0  # a worker with jobs and no progress for this long is replaced
    # New jobs one user may start per minute, on top of the pending cap; 0 = no limit.
    user_jobs_per_minute: int = DEFAULT_USER_JOBS_PER_MINUTE
    retention_days: float = 30.0  # finished chains idle this long are deleted; 0 = keep forever
    max_storage_gb: float = 10.0  # above this the oldest finished chains go first; 0 = no cap

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BotConfig:
        env = os.environ if env is None else env
        token = env.get("DISCORD_TOKEN", "").strip()
        if not token:
            raise ConfigError("DISCORD_TOKEN is not set. Put your bot token in .env (see .env.example); get one at "
                              "https://discord.com/developers/applications -> your app -> Bot -> Reset Token.")
        return cls(
            token=token,
            api_base=env.get("DISCORD_API_BASE") or None,
            gateway_url=env.get("DISCORD_GATEWAY_URL") or None,
            guild_ids=_ids(env.get("DISCORD_GUILD_IDS", ""), "DISCORD_GUILD_IDS"),
            data_dir=Path(env.get("MGIE_DATA_DIR") or "./data"),
            message_content=_flag(env, "DISCORD_MESSAGE_CONTENT", False),
            max_queue=_int(env, "MGIE_MAX_QUEUE", 100, 1, 10_000),
            progress_interval=float(env.get("MGIE_PROGRESS_INTERVAL") or 2.0),
            stall_timeout=float(_int(env, "MGIE_STALL_TIMEOUT", 300, 5, 86_400)),
            engine=EngineSettings.from_env(env),
            user_jobs_per_minute=_int(env, "MGIE_USER_JOBS_PER_MINUTE", DEFAULT_USER_JOBS_PER_MINUTE, 0, 1000),
            retention_days=_float(env, "MGIE_RETENTION_DAYS", 30.0, 36_500),
            max_storage_gb=_float(env, "MGIE_MAX_STORAGE_GB", 10.0, 1_000_000),
        )
