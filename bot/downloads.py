"""Fetching user attachments: only from Discord's CDN, size-capped before and during the download.

The URL comes from a gateway payload, but a crafted or proxied payload must still never make the bot
fetch an arbitrary host (server-side request forgery), and a lying size header must not fill memory.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import aiohttp

from mgie_engine.errors import BadImageError

DISCORD_CDN_HOSTS = frozenset({"cdn.discordapp.com", "media.discordapp.net"})
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")
DOWNLOAD_TIMEOUT = 30.0


def allowed_hosts(api_base: str | None) -> frozenset[str]:
    """Discord's CDN hosts, plus the configured API base's host (a proxy or the tests' fake Discord)."""
    extra = {urlsplit(api_base).hostname} if api_base else set()
    return DISCORD_CDN_HOSTS | {h for h in extra if h}


def check_attachment_meta(filename: str, content_type: str | None, size: int, max_bytes: int) -> None:
    """Cheap checks before any download, so bad input gets an answer at once."""
    if size <= 0:
        raise BadImageError(f"{filename} is empty.")
    if size > max_bytes:
        raise BadImageError(f"{filename} is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB.")
    if content_type and content_type.split(";")[0].strip().lower() not in IMAGE_TYPES:
        raise BadImageError(f"{filename} is not a PNG, JPEG, WEBP or GIF image ({content_type}).")


async def download(session: aiohttp.ClientSession, url: str, hosts: frozenset[str], max_bytes: int,
                   timeout: float = DOWNLOAD_TIMEOUT) -> bytes:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or parts.hostname not in hosts:
        raise BadImageError("That attachment is not hosted on Discord, so I won't fetch it.")
    if parts.scheme == "http" and parts.hostname in DISCORD_CDN_HOSTS:
        raise BadImageError("That attachment link is not a secure Discord link.")
    try:
        async with asyncio.timeout(timeout):
            async with session.get(url, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise BadImageError(f"Discord would not give me that attachment (HTTP {resp.status}); "
                                        "it may have been deleted.")
                declared = resp.content_length
                if declared is not None and declared > max_bytes:
                    raise BadImageError(f"That image is over the {max_bytes / 2**20:.0f} MB limit.")
                chunks, total = [], 0
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    total += len(chunk)
                    if total > max_bytes:
                        raise BadImageError(f"That image is over the {max_bytes / 2**20:.0f} MB limit.")
                    chunks.append(chunk)
    except TimeoutError:
        raise BadImageError("Downloading the image took too long; please try again.") from None
    except aiohttp.ClientError as err:
        raise BadImageError(f"I could not download the image ({type(err).__name__}).") from None
    return b"".join(chunks)
