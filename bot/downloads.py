"""Fetching user attachments: only from Discord's CDN, size-capped before and during the download.

The URL comes from a gateway payload, but a crafted or proxied payload must still never make the bot
fetch an arbitrary host (server-side request forgery), and a lying size header must not fill memory.

The URL is parsed once, with the same parser (yarl) that aiohttp connects with, and that parsed URL is
what gets fetched: checking with one parser (``urlsplit``) and fetching with another lets quirks such as
backslashes or ``@`` in the authority point the two at different hosts.
"""

from __future__ import annotations

import asyncio

import aiohttp
from yarl import URL

from mgie_engine.errors import BadImageError

from . import i18n

DISCORD_CDN_HOSTS = frozenset({"cdn.discordapp.com", "media.discordapp.net"})
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
DOWNLOAD_TIMEOUT = 30.0
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _bad(key: str, **params: object) -> BadImageError:
    """A download refusal: English text for logs, the message key for the user's language."""
    return BadImageError(i18n.text(f"errors.{key}", None, **params), key=f"errors.{key}", **params)


def _origin(host: str, port: int) -> str:
    """``host:port`` as an allow-list entry, IPv6 literals bracketed so the port stays unambiguous."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def allowed_hosts(api_base: str | None) -> frozenset[str]:
    """Discord's CDN hosts, plus the configured API base's ``host:port`` (a proxy or the tests' fake Discord).

    A bare name allows that host on its scheme's default port only; a ``host:port`` entry allows that one
    port. So a local proxy's neighbours (``localhost:6379``...) stay out of reach. A malformed API base adds
    nothing rather than failing every download.
    """
    if not api_base:
        return DISCORD_CDN_HOSTS
    try:
        base = URL(api_base)
        host, port = base.raw_host, base.port
    except (ValueError, TypeError):
        return DISCORD_CDN_HOSTS
    if not host or port is None or base.scheme not in _DEFAULT_PORTS:
        return DISCORD_CDN_HOSTS
    return DISCORD_CDN_HOSTS | {_origin(host.lower(), port)}


def check_attachment_meta(filename: str, content_type: str | None, size: int, max_bytes: int) -> None:
    """Cheap checks before any download, so bad input gets an answer at once."""
    if size <= 0:
        raise _bad("attachment_empty", filename=filename)
    if size > max_bytes:
        raise _bad("attachment_too_large", filename=filename, size=f"{size / 2**20:.1f}", limit=f"{max_bytes / 2**20:.0f}")
    if content_type and content_type.split(";")[0].strip().lower() not in IMAGE_TYPES:
        raise _bad("attachment_not_an_image", filename=filename, content_type=content_type)


def _checked_url(url: str, hosts: frozenset[str]) -> URL:
    """Parse ``url`` and return it only if it names an allowed host and port; else BadImageError."""
    try:
        parsed = URL(url)
        scheme, host, port = parsed.scheme, parsed.raw_host, parsed.port
    except (ValueError, TypeError):  # UnicodeError (bad IDNA) is a ValueError
        raise _bad("not_discord") from None
    if scheme not in _DEFAULT_PORTS or not host or port is None:
        raise _bad("not_discord")
    if parsed.raw_user is not None or parsed.raw_password is not None:
        raise _bad("not_discord")  # Discord links never carry credentials; userinfo is a disguise
    host = host.lower()
    if scheme == "http" and host in DISCORD_CDN_HOSTS:
        raise _bad("not_secure")
    default_port = port == _DEFAULT_PORTS[scheme]
    if not (host in hosts and default_port) and _origin(host, port) not in hosts:
        raise _bad("not_discord")
    return parsed


async def download(session: aiohttp.ClientSession, url: str, hosts: frozenset[str], max_bytes: int,
                   timeout: float = DOWNLOAD_TIMEOUT) -> bytes:
    """Fetch ``url`` into memory, or raise BadImageError with a message fit to show the user.

    Redirects are never followed (the target would skip the host check); the declared length is checked
    before reading and the running total while reading, so memory stays within ``max_bytes`` plus a chunk.
    """
    target = _checked_url(url, hosts)
    over = _bad("download_too_large", limit=f"{max_bytes / 2**20:.0f}")
    try:
        async with asyncio.timeout(timeout):
            # identity: the cap then counts the bytes on the wire, not what a compressed body expands to.
            async with session.get(target, allow_redirects=False,
                                   headers={"Accept-Encoding": "identity"}) as resp:
                if 300 <= resp.status < 400:
                    raise _bad("redirected")
                if resp.status != 200:
                    raise _bad("download_refused", status=resp.status)
                declared = resp.content_length
                if declared is not None and declared > max_bytes:
                    raise over
                chunks, total = [], 0
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    total += len(chunk)
                    if total > max_bytes:
                        raise over
                    chunks.append(chunk)
    except TimeoutError:
        raise _bad("download_timeout") from None
    except aiohttp.ClientError as err:
        raise _bad("download_failed", error=type(err).__name__) from None
    return b"".join(chunks)
