"""Pytest fixtures: a fresh fake per test on a free port, with discord.py pointed at it.

List ``"fakediscord.fixtures"`` in a module's or the root conftest's ``pytest_plugins``. To run
a bot for the length of a test, use :func:`fakediscord.runner.running_bot`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from .runner import TEST_HEARTBEAT_INTERVAL
from .server import FakeDiscord


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    """A started FakeDiscord (port 0, 0.5 s heartbeats) that is stopped after the test."""
    async with FakeDiscord(heartbeat_interval=TEST_HEARTBEAT_INTERVAL) as fake:
        yield fake


@pytest.fixture
def fake_endpoints(fake_discord: FakeDiscord) -> Iterator[FakeDiscord]:
    """Point discord.py at ``fake_discord`` for this test, restoring the real endpoints after."""
    from bot.discord_endpoints import apply_endpoints

    apply_endpoints(fake_discord.api_base, fake_discord.gateway_url)
    try:
        yield fake_discord
    finally:
        apply_endpoints(None, None)
