"""Reading the bot's Prometheus endpoint in tests: a free port, a scrape over HTTP, one sample's value."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, keyed (sample name, sorted labels)."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels: str) -> float | None:
    """The sample ``name{labels}``; None when the endpoint has no such series (yet)."""
    return samples.get((name, tuple(sorted(labels.items()))))


async def scrape_until(port: int, name: str, expected: float, timeout: float = 30.0, **labels: str):
    """Scrape until ``name{labels}`` reads ``expected`` (event handlers finish a moment after users see them)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(port)
        if value(samples, name, **labels) == expected or time.monotonic() > deadline:
            assert value(samples, name, **labels) == expected, (name, labels)
            return samples
        await asyncio.sleep(0.05)
