"""Running a discord.py client against the fake for the length of a test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import discord

#: Short enough that heartbeat and resume tests take well under a second per beat.
TEST_HEARTBEAT_INTERVAL = 0.5


@contextlib.asynccontextmanager
async def running_bot(client: discord.Client, token: str, *, ready_timeout: float = 10.0) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``client.start(token)`` in the background until the block exits, then close it.

    Waits for ``on_ready`` first (create the client with ``guild_ready_timeout=0.1`` or startup
    waits discord.py's default 2 s after the last GUILD_CREATE). A start-up failure such as
    ``LoginFailure`` is raised from the ``async with``.
    """
    async def until_ready() -> None:
        # Polling is_ready() avoids wait_until_ready()'s error when login has not set the client up yet.
        while not client.is_ready():
            await asyncio.sleep(0.01)

    task = asyncio.create_task(client.start(token), name="fakediscord-bot")
    ready = asyncio.create_task(until_ready())
    try:
        done, _ = await asyncio.wait({task, ready}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # re-raise the start-up error
            raise RuntimeError("the bot stopped before it became ready")
        if ready not in done:
            raise TimeoutError(f"the bot was not ready within {ready_timeout}s")
        yield task
    finally:
        ready.cancel()
        if not client.is_closed():
            await client.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 5)
