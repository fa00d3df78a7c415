"""Registering the slash commands with Discord when they change or when asked, not on every start.

discord.py's advice: a sync on every start spends Discord's daily limit on command writes and makes
clients refetch the commands, for nothing when they did not change. So the payload a sync would send
(for each scope: the global commands, or every server in ``DISCORD_GUILD_IDS``; with the tree's translator,
the localized names and descriptions too, so a changed translation resyncs) is hashed together with
the application id and the scopes, and the hash of the last successful sync is kept in the data dir. A
start syncs only when the hash differs: first start, new code with changed commands, another
application or other servers. ``mgie-bot sync`` syncs at once (say, after commands were removed in the
developer portal by hand).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import discord
from discord import app_commands
from discord.ext import commands

from .config import BotConfig
from .i18n.commands import CatalogueTranslator
from .storage.images import atomic_write

log = logging.getLogger(__name__)

DIGEST_FILENAME = "synced-commands.sha256"


def sync_targets(tree: app_commands.CommandTree, guild_ids: Sequence[int]) -> list[discord.Object | None]:
    """Where commands go: each server of ``guild_ids`` (the global commands copied there; changes show at
    once, handy while developing) or, without any, globally (``None``)."""
    if not guild_ids:
        return [None]
    targets: list[discord.Object | None] = []
    for gid in guild_ids:
        guild = discord.Object(gid)
        tree.copy_global_to(guild=guild)
        targets.append(guild)
    return targets


async def command_payloads(tree: app_commands.CommandTree, target: discord.Object | None) -> list[dict]:
    """What ``tree.sync(guild=target)`` sends: each command's payload, localized when a translator is set."""
    translator = tree.translator
    commands_ = tree.get_commands(guild=target)
    if translator is None:
        return [command.to_dict(tree) for command in commands_]
    return [await command.get_translated_payload(tree, translator) for command in commands_]


async def commands_digest(tree: app_commands.CommandTree, application_id: int | None,
                          targets: Sequence[discord.Object | None]) -> str:
    """SHA-256 of what syncing ``targets`` would send (localizations included), with the application and the
    scopes it goes to."""
    payload = {
        "application_id": application_id,
        "scopes": [{"guild_id": None if target is None else target.id,
                    "commands": await command_payloads(tree, target)}
                   for target in targets],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _last_synced(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None  # unreadable: sync again, which is always safe


def _remember(path: Path, digest: str) -> None:
    """Write the digest atomically: a crash leaves the old one (one sync too many, never one too few)."""
    atomic_write(path, (digest + "\n").encode("ascii"))


async def sync_commands(bot: commands.Bot, data_dir: Path, guild_ids: Sequence[int], *,
                        force: bool = False) -> bool:
    """Sync the bot's commands unless they are what the last sync from ``data_dir`` sent; True if synced.

    Call after login (the application id is known then) with every cog loaded. A failed sync raises
    and records nothing, so the next start tries again.
    """
    targets = sync_targets(bot.tree, guild_ids)
    digest = await commands_digest(bot.tree, bot.application_id, targets)
    path = Path(data_dir) / DIGEST_FILENAME
    if not force and _last_synced(path) == digest:
        log.info("application commands unchanged since the last sync; not syncing (`mgie-bot sync` forces it)")
        return False
    for target in targets:
        await bot.tree.sync(guild=target)
    _remember(path, digest)
    log.info("synced application commands %s", "globally" if targets == [None] else
             f"to {len(targets)} server(s)")
    return True


async def sync_now(config: BotConfig) -> None:
    """``mgie-bot sync``: log in over HTTP only (no gateway, no models), sync every command, remember it."""
    from .bot import COGS  # the cogs define the commands; importing them is all they need here

    bot = commands.Bot(command_prefix=commands.when_mentioned, intents=discord.Intents.default(), help_command=None)
    async with bot:
        await bot.tree.set_translator(CatalogueTranslator())
        for name in COGS:
            await bot.load_extension(name)
        await bot.login(config.token)
        await sync_commands(bot, config.data_dir.expanduser().resolve(), config.guild_ids, force=True)
