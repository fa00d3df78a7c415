"""Point discord.py at another Discord (a fake in tests, a proxy in production).

discord.py 2.7.1 has no setting for its endpoints, but both are public class attributes
read at use time, so setting them redirects it without touching the library's files:

* ``discord.http.Route.BASE`` — every REST route, including the interaction callbacks and
  follow-up/``@original`` webhook routes (``discord.webhook.async_`` imports the same
  ``Route`` class).
* ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`` — the websocket URL. A plain
  ``Client``/``commands.Bot`` never calls ``GET /gateway/bot``: it connects straight to this
  default (only ``AutoShardedClient`` without ``shard_count`` asks the API), and after an
  INVALID_SESSION it falls back to it again. Resumes use READY's ``resume_gateway_url``.

Call :func:`apply_endpoints` once before the client logs in. It changes process-wide state,
so ``apply_endpoints(None, None)`` restores discord.py's defaults (useful in test teardown).
"""

from __future__ import annotations

import discord.gateway
import discord.http
import discord.webhook.async_
import yarl

_DEFAULT_API_BASE: str = discord.http.Route.BASE
_DEFAULT_GATEWAY: yarl.URL = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY


def apply_endpoints(api_base: str | None, gateway_url: str | None) -> None:
    """Use ``api_base`` (e.g. ``http://127.0.0.1:8080/api/v10``) and ``gateway_url`` (``ws://...``).

    ``None`` for either means discord.py's default (``https://discord.com/api/v10`` and
    ``wss://gateway.discord.gg/``), so unset settings keep the real Discord.
    """
    base = _DEFAULT_API_BASE if not api_base else api_base.rstrip("/")
    discord.http.Route.BASE = base
    webhook_route = discord.webhook.async_.Route
    if webhook_route is not discord.http.Route:  # a future release might split them
        webhook_route.BASE = base
    gateway = _DEFAULT_GATEWAY if not gateway_url else yarl.URL(gateway_url)
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = gateway
