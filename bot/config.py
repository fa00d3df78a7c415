"""Bot settings from the environment and `.env` (python-dotenv); engine settings come along.

Every setting, bot and engine, is parsed and checked here in one go, before anything loads: a bad value
ends in one :class:`ConfigError` line naming it (the same error class, and so the same exit code, as a bad
engine setting in ``mgie-edit``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path

from mgie_engine.errors import SettingsError
from mgie_engine.settings import EngineSettings, read_flag, read_float, read_int

DEFAULT_USER_JOBS_PER_MINUTE = 6  # a busy human re-rolls about this often; a script quickly hits it

ConfigError = SettingsError  # a setting is missing or malformed; the message says which and how to fix it


def _ids(raw: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in raw.replace(" ", "").split(",") if part)
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated numeric ids, not {raw[:40]!r}.") from None


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    if not raw.startswith(tuple(f"{s}://" for s in schemes)) or len(raw.split("://", 1)[1]) == 0:
        raise ConfigError(f"{name} must be a URL starting with {' or '.join(f'{s}://' for s in schemes)}, "
                          f"not {raw[:60]!r}.")
    return raw


def _host(env: Mapping[str, str], name: str, default: str) -> str:
    raw = (env.get(name) or "").strip() or default
    try:
        ipaddress.ip_address(raw)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}", raw):
            raise ConfigError(f"{name} must be an IP address (127.0.0.1, 0.0.0.0, ::) or a host name, "
                              f"not {raw[:60]!r}.") from None
    return raw


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
    shutdown_grace: float = 30.0  # SIGTERM waits this long for running edits
    metrics_port: int = 0  # Prometheus endpoint (bot/metrics.py) on this port; 0 = none
    metrics_addr: str = "127.0.0.1"  # the address it listens on; 0.0.0.0 to let other hosts scrape

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BotConfig:
        """Read and check every setting; raises ConfigError naming the first bad one."""
        env = os.environ if env is None else env
        token = env.get("DISCORD_TOKEN", "").strip()
        if not token:
            raise ConfigError("DISCORD_TOKEN is not set. Put your bot token in .env (see .env.example); get one at "
                              "https://discord.com/developers/applications -> your app -> Bot -> Reset Token.")
        return cls(
            token=token,
            api_base=_url(env, "DISCORD_API_BASE", ("https", "http")),
            gateway_url=_url(env, "DISCORD_GATEWAY_URL", ("wss", "ws")),
            guild_ids=_ids(env.get("DISCORD_GUILD_IDS", ""), "DISCORD_GUILD_IDS"),
            data_dir=Path((env.get("MGIE_DATA_DIR") or "").strip() or "./data"),
            message_content=read_flag(env, "DISCORD_MESSAGE_CONTENT", False),
            max_queue=read_int(env, "MGIE_MAX_QUEUE", 100, 1, 10_000),
            progress_interval=read_float(env, "MGIE_PROGRESS_INTERVAL", 2.0, 0.1, 600.0),
            stall_timeout=float(read_int(env, "MGIE_STALL_TIMEOUT", 300, 5, 86_400)),
            engine=EngineSettings.from_env(env),
            user_jobs_per_minute=read_int(env, "MGIE_USER_JOBS_PER_MINUTE", DEFAULT_USER_JOBS_PER_MINUTE, 0, 1000),
            retention_days=read_float(env, "MGIE_RETENTION_DAYS", 30.0, 0.0, 36_500.0),
            max_storage_gb=read_float(env, "MGIE_MAX_STORAGE_GB", 10.0, 0.0, 1_000_000.0),
            shutdown_grace=read_float(env, "MGIE_SHUTDOWN_GRACE", 30.0, 0.0, 86_400.0),
            metrics_port=read_int(env, "MGIE_METRICS_PORT", 0, 0, 65_535),
            metrics_addr=_host(env, "MGIE_METRICS_ADDR", "127.0.0.1"),
        )
