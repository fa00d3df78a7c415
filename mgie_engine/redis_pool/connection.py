"""Connecting to Redis: settings from the environment, server checks, one-line errors, redacted URLs."""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping

MIN_VERSION = (7, 0)
SOCKET_TIMEOUT = 10.0  # seconds; every BLOCK in this package stays well below it (redis-py issue 2807)
BLOCK_MS = 1000


class RedisSetupError(Exception):
    """Redis cannot be used as configured; the message is one line, names no password, says what to fix."""


def redact(url: str) -> str:
    """The URL with any password (and user name) replaced, fit for logs and error messages."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable Redis URL>"
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


_PREFIX = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    url: str = dataclasses.field(repr=False)  # holds the password: never printed
    prefix: str = "mgie"
    reclaim_idle: float = 30.0  # a job whose claim was not renewed for this long goes to a live worker
    renew_interval: float = 2.0  # how often a worker renews the claims of the jobs it is running
    heartbeat_ttl: float = 10.0  # a worker whose heartbeat key expired counts for no capacity
    blob_ttl: int = 86_400  # input images wait this long at most for a worker
    result_ttl: int = 3_600  # results wait this long for the bot (it keeps them in SQLite after that)
    max_deliveries: int = 3  # a job delivered this many times without finishing is dead-lettered
    # rediss:// only: the CA that signed the server's certificate (else the system's), and a client
    # certificate and key for servers that ask for one (redis.conf ``tls-auth-clients yes``, its default).
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def safe_url(self) -> str:
        return redact(self.url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RedisSettings | None:
        """None when MGIE_REDIS_URL is unset (one host, in-process workers)."""
        env = os.environ if env is None else env
        url = (env.get("MGIE_REDIS_URL") or "").strip()
        if not url:
            return None
        scheme = urllib.parse.urlsplit(url).scheme if "://" in url else ""
        if scheme not in ("redis", "rediss"):
            raise RedisSetupError(f"MGIE_REDIS_URL must look like redis://:PASSWORD@HOST:6379/0 (or rediss:// for "
                                  f"TLS), not {redact(url)!r}.")
        prefix = (env.get("MGIE_REDIS_PREFIX") or "mgie").strip()
        if not _PREFIX.match(prefix):
            raise RedisSetupError("MGIE_REDIS_PREFIX may hold only letters, digits and _ . : - (at most 64).")
        reclaim = _seconds(env, "MGIE_REDIS_RECLAIM_IDLE", 30.0, 1.0, 110.0)
        renew = _seconds(env, "MGIE_REDIS_RENEW_INTERVAL", min(2.0, reclaim / 5), 0.1, reclaim / 3)
        return cls(url=url, prefix=prefix, reclaim_idle=reclaim, renew_interval=renew,
                   heartbeat_ttl=max(3 * renew, 3.0), **_tls_files(env, scheme))


_TLS_FILES = {"ca_file": "MGIE_REDIS_CA_FILE", "cert_file": "MGIE_REDIS_CERT_FILE", "key_file": "MGIE_REDIS_KEY_FILE"}


def _tls_files(env: Mapping[str, str], scheme: str) -> dict[str, str | None]:
    """The TLS files named in the environment, each checked to be readable; only with rediss://."""
    files = {field: (env.get(name) or "").strip() or None for field, name in _TLS_FILES.items()}
    named = [_TLS_FILES[field] for field, path in files.items() if path]
    if named and scheme != "rediss":
        raise RedisSetupError(f"{', '.join(named)} need a TLS connection: MGIE_REDIS_URL must start with rediss://.")
    if bool(files["cert_file"]) != bool(files["key_file"]):
        raise RedisSetupError("MGIE_REDIS_CERT_FILE and MGIE_REDIS_KEY_FILE go together (a client certificate "
                              "and its key).")
    for field, path in files.items():
        if path and not os.access(path, os.R_OK):
            raise RedisSetupError(f"{_TLS_FILES[field]}={path!r} is not a readable file.")
    return files


def _seconds(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise RedisSetupError(f"{name} must be a number of seconds, not {raw!r}.") from None
    if not low <= value <= high:
        raise RedisSetupError(f"{name} must be between {low:g} and {high:g} seconds.")
    return value


def client(settings: RedisSettings):
    """An asyncio client, RESP2 pinned (reply shapes differ in RESP3), timeouts set."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError, TimeoutError

    tls = {}
    if settings.url.startswith("rediss:"):  # the server's certificate and host name are always checked
        tls = {"ssl_cert_reqs": "required", "ssl_ca_certs": settings.ca_file, "ssl_certfile": settings.cert_file,
               "ssl_keyfile": settings.key_file}
    # A dropped connection (Redis restarted) is retried on a fresh one; every script here is safe to repeat.
    return aioredis.Redis.from_url(settings.url, protocol=2, socket_timeout=SOCKET_TIMEOUT,
                                   socket_connect_timeout=5.0, health_check_interval=30, decode_responses=False,
                                   retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
                                   retry_on_error=[ConnectionError, TimeoutError], **tls)


async def check_server(redis_client, settings: RedisSettings) -> str:
    """Ping, authenticate and check the version; returns it. Raises RedisSetupError with a one-line reason."""
    import redis.exceptions as rex

    where = settings.safe_url
    try:
        await redis_client.ping()
        info = await redis_client.info("server")
    except (rex.AuthenticationError, rex.ResponseError) as err:
        if "NOAUTH" in str(err) or urllib.parse.urlsplit(settings.url).password is None:
            raise RedisSetupError(f"Redis at {where} needs a password: put it in MGIE_REDIS_URL "
                                  "(redis://:PASSWORD@host:port/0).") from None
        if isinstance(err, rex.AuthenticationError) or "WRONGPASS" in str(err):
            raise RedisSetupError(f"Redis at {where} refused the password (check the password in "
                                  "MGIE_REDIS_URL).") from None
        raise RedisSetupError(f"Redis at {where} answered with an error: {_clean(str(err), settings)}") from None
    except (rex.ConnectionError, rex.TimeoutError, OSError) as err:
        raise RedisSetupError(f"cannot reach Redis at {where}: {_clean(str(err), settings)}") from None
    version = str(info.get("redis_version", "0")) if isinstance(info, dict) else "0"
    numbers = tuple(int(x) for x in re.findall(r"\d+", version)[:2]) or (0,)
    if numbers < MIN_VERSION:
        raise RedisSetupError(f"Redis at {where} is version {version}; the worker pool needs Redis 7.0 or newer "
                              "(XAUTOCLAIM, consumer groups).")
    return version


def _clean(message: str, settings: RedisSettings) -> str:
    """Whatever a library put in an error, without the password, on one line."""
    password = urllib.parse.urlsplit(settings.url).password
    if password:
        message = message.replace(password, "***")
    return " ".join(message.split())[:300]
