"""`mgie-bot`: start the bot from `.env` / the environment, print its invite URL, or sync its commands.

Everything that can be checked without the network is checked first, in this order: the arguments, every
setting (``BotConfig.from_env``), the database; each problem ends in one line on stderr and exit code 2
(1 when Discord cannot be reached), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from mgie_engine.arguments import OneLineParser

PERMISSIONS = 1024 | 2048 | 16384 | 32768 | 65536  # view, send, embed links, attach files, read history
SNOWFLAKE_MAX = 2**64 - 1


def invite_url(application_id: str) -> str:
    return (f"https://discord.com/oauth2/authorize?client_id={int(application_id)}"
            f"&scope=bot+applications.commands&permissions={PERMISSIONS}")


def _application_id(raw: str) -> str:
    if not raw.isdigit() or not 0 < int(raw) <= SNOWFLAKE_MAX:
        raise argparse.ArgumentTypeError(
            f"must be your application's numeric id (developer portal -> General Information -> "
            f"Application ID), not {raw[:40]!r}")
    return raw


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(
        prog="mgie-bot",
        description="Run the MGIE Discord bot. Settings come from the environment and a .env file in the current "
                    "directory (or a folder above it); every one is listed in .env.example. DISCORD_TOKEN is required.",
        epilog="Exit codes: 0 stopped normally, 1 Discord could not be reached, 2 a setting, argument, the token "
               "or the database needs fixing (the message says which).")
    sub = p.add_subparsers(dest="command", metavar="{run,invite,sync}")
    sub.add_parser("run", help="run the bot (the default)", description="Run the bot until SIGTERM or Ctrl-C.")
    sub.add_parser("sync", help="register the slash commands with Discord now, then exit",
                   description="Register the slash commands now (a start registers them only when they changed).")
    invite = sub.add_parser("invite", help="print the URL that adds the bot to a server",
                            description="Print the invite URL with the permissions the bot needs.")
    invite.add_argument("application_id", metavar="APPLICATION_ID", type=_application_id,
                        help="your application's id (developer portal -> General Information)")
    return p.parse_args(argv)


def _fail(message: object, code: int = 2) -> int:
    print(f"mgie-bot: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "invite":
        print(invite_url(args.application_id))
        return 0

    from mgie_engine.settings import load_env_file
    from mgie_engine.unused_packages import skip_unused_packages

    from .config import BotConfig, ConfigError
    from .redis_engine import RedisSetupError

    load_env_file()
    skip_unused_packages()  # local workers: after .env (MGIE_KEEP_OPTIONAL_IMPORTS), before torch's first import
    try:
        config = BotConfig.from_env()
        _check_redis()
    except (ConfigError, RedisSetupError) as err:
        return _fail(err)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import aiohttp
    import discord

    from mgie_engine.errors import MgieError

    from .discord_endpoints import apply_endpoints
    from .storage import DatabaseUnavailableError, MigrationError, Store

    # This bot never joins voice: discord.py's warnings about PyNaCl and davey would only mislead.
    discord.VoiceClient.warn_nacl = False
    discord.VoiceClient.warn_dave = False
    apply_endpoints(config.api_base, config.gateway_url)
    try:
        asyncio.run(_check_store(Store, config))
        if args.command == "sync":
            from .command_sync import sync_now

            asyncio.run(sync_now(config))
            return 0
        from .bot import MgieBot

        bot = MgieBot(config)
        asyncio.run(_run(bot, config.token, config.shutdown_grace))
    except (DatabaseUnavailableError, MigrationError, MgieError) as err:
        return _fail(err)
    except discord.LoginFailure:
        return _fail("Discord rejected DISCORD_TOKEN. Reset the token in the developer portal (Bot tab) "
                     "and put the new one in .env.")
    except discord.PrivilegedIntentsRequired:
        return _fail("DISCORD_MESSAGE_CONTENT=true needs the Message Content intent switched on in the "
                     "developer portal (Bot tab), or set it to false (replies that mention the bot still work).")
    except (aiohttp.ClientError, TimeoutError, discord.GatewayNotFound, discord.DiscordServerError) as err:
        where = config.api_base or "https://discord.com/api/v10"
        reason = " ".join(str(err).split()) or type(err).__name__
        return _fail(f"could not reach Discord at {where} ({reason}). Check this machine's network connection"
                     f"{' and DISCORD_API_BASE' if config.api_base else ''}, then start the bot again.", 1)
    except KeyboardInterrupt:
        pass
    return 0


async def _check_store(store_class, config) -> None:
    """Open (and migrate) the database before going online, so a damaged or locked one is reported first."""
    store = await store_class.open(config.data_dir)
    await store.close()


def _check_redis() -> None:
    """With MGIE_REDIS_URL: a wrong password, an unreachable Redis or one older than 7 stops the start here."""
    from .redis_engine import check_redis, redis_settings_from_env

    settings = redis_settings_from_env()
    if settings is not None:
        asyncio.run(check_redis(settings))


async def _run(bot, token: str, grace: float) -> None:
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
        logging.getLogger("bot").info("stopping: finishing running edits (up to %.0f s)", grace)
        await bot.graceful_shutdown(grace)
        await runner


if __name__ == "__main__":
    sys.exit(main())
