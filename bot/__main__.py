"""`mgie-bot`: start the bot from `.env` / the environment; `mgie-bot sync` registers its commands now."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import discord
from dotenv import load_dotenv

from .config import BotConfig, ConfigError
from .discord_endpoints import apply_endpoints

SHUTDOWN_GRACE = float(os.environ.get("MGIE_SHUTDOWN_GRACE") or 30)
PERMISSIONS = 1024 | 2048 | 16384 | 32768 | 65536  # view, send, embed links, attach files, read history


def invite_url(application_id: str) -> str:
    return (f"https://discord.com/oauth2/authorize?client_id={int(application_id)}"
            f"&scope=bot+applications.commands&permissions={PERMISSIONS}")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "invite":
        print(invite_url(sys.argv[2]))
        return 0
    load_dotenv()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = BotConfig.from_env()
    except ConfigError as err:
        print(f"mgie-bot: {err}", file=sys.stderr)
        return 2
    apply_endpoints(config.api_base, config.gateway_url)
    if sys.argv[1:] == ["sync"]:  # register the commands with Discord now, then exit
        from .command_sync import sync_now

        runner = sync_now(config)
    else:
        from .bot import MgieBot

        runner = _run(MgieBot(config), config.token)
    try:
        asyncio.run(runner)
    except discord.LoginFailure:
        print("mgie-bot: Discord rejected DISCORD_TOKEN. Reset the token in the developer portal (Bot tab) "
              "and put the new one in .env.", file=sys.stderr)
        return 2
    except discord.PrivilegedIntentsRequired:
        print("mgie-bot: DISCORD_MESSAGE_CONTENT=true needs the Message Content intent switched on in the "
              "developer portal (Bot tab), or set it to false (replies that mention the bot still work).",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


async def _run(bot, token: str) -> None:
    """Run until Discord ends the session or SIGTERM/SIGINT asks for a graceful stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with bot:
        runner = asyncio.create_task(bot.start(token))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if runner in done:
            stopper.cancel()
            runner.result()  # re-raises LoginFailure and friends
            return
        logging.getLogger("bot").info("stopping: finishing running edits (up to %.0f s)", SHUTDOWN_GRACE)
        await bot.graceful_shutdown(SHUTDOWN_GRACE)
        await runner


if __name__ == "__main__":
    sys.exit(main())
