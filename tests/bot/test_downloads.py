"""bot.downloads against real HTTP servers on 127.0.0.1: crafted URLs and hostile responses can't hurt the bot.

Two servers run per test: ``good`` plays the configured API base (the allowed origin) and ``other`` is a
different origin on the same address. Every refusal must be a BadImageError with a short message fit for a
user, and a refused URL must not reach any server: a trace hook on the client session records every request
attempt (so even hosts no test server listens on are covered) and both servers log what they see.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from bot.downloads import DISCORD_CDN_HOSTS, allowed_hosts, check_attachment_meta, download
from mgie_engine.errors import BadImageError

CAP = 1024 * 1024
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@dataclass
class Origin:
    """One aiohttp server on 127.0.0.1 and what it saw."""

    port: int = 0
    seen: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    streamed: int = 0
    client_gone: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _app(origin: Origin, other: Origin) -> web.Application:
    async def log(request: web.Request, handler):
        origin.seen.append(request.path_qs)
        origin.headers.append(dict(request.headers))
        return await handler(request)

    async def image(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def exact(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * CAP, content_type="image/png")

    async def redirect_away(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{other.base}/image")

    async def redirect_home(request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/image")

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    async def broken(request: web.Request) -> web.Response:
        raise web.HTTPInternalServerError()

    async def declared_huge(request: web.Request) -> web.StreamResponse:
        # Claims more than the cap, sends headers, then stalls: a client that read the body would hang.
        resp = web.StreamResponse(headers={"Content-Type": "image/png", "Content-Length": str(CAP + 1)})
        await resp.prepare(request)
        await _stall(origin)
        return resp

    async def endless(request: web.Request) -> web.StreamResponse:
        # Chunked, no Content-Length, far past the cap; counts what it wrote until the client goes away.
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        block = b"\0" * 65536
        try:
            while origin.streamed < 1024 * CAP:
                await resp.write(block)
                origin.streamed += len(block)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            origin.client_gone.set()
        return resp

    async def chunked_exact(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(CAP // 4096):
            await resp.write(b"y" * 4096)
        await resp.write_eof()
        return resp

    async def bomb(request: web.Request) -> web.Response:
        # 64 MiB of zeros gzipped to ~64 KiB, sent although the client asked for identity.
        return web.Response(body=_bomb(), headers={"Content-Type": "image/png", "Content-Encoding": "gzip"})

    async def stall_headers(request: web.Request) -> web.Response:
        await _stall(origin)
        return web.Response(body=PNG)

    async def stall_body(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(PNG[:100])
        await _stall(origin)
        return resp

    app = web.Application(middlewares=[web.middleware(log)])
    for path, handler in {
        "/image": image, "/attachments/1/2/a.png": image, "/exact": exact, "/redirect-away": redirect_away,
        "/redirect-home": redirect_home, "/missing": missing, "/broken": broken, "/declared-huge": declared_huge,
        "/endless": endless, "/chunked-exact": chunked_exact, "/bomb": bomb, "/stall-headers": stall_headers,
        "/stall-body": stall_body,
    }.items():
        app.router.add_get(path, handler)
    return app


@functools.cache
def _bomb() -> bytes:
    return gzip.compress(b"\0" * (64 * CAP), compresslevel=9)


async def _stall(origin: Origin) -> None:
    """Hold the response open until the test ends (bounded, so a broken teardown can't hang the suite)."""
    try:
        await asyncio.wait_for(origin.release.wait(), 30)
    except TimeoutError:
        pass


@pytest.fixture
async def origins() -> AsyncIterator[tuple[Origin, Origin]]:
    good, other = Origin(), Origin()
    runners = []
    for origin, peer in ((good, other), (other, good)):
        runner = web.AppRunner(_app(origin, peer), access_log=None, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        origin.port = runner.addresses[0][1]
        runners.append(runner)
    yield good, other
    for origin in (good, other):
        origin.release.set()
    for runner in runners:
        await runner.cleanup()


class Reached(Exception):
    """Raised by the trace hook: the client was about to send a request."""


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


@pytest.fixture
async def tripwire() -> AsyncIterator[tuple[aiohttp.ClientSession, list[str]]]:
    """A session that records, then blocks, every request it is asked to start (no network is touched)."""
    attempts: list[str] = []

    async def on_start(_session, _ctx, params: aiohttp.TraceRequestStartParams) -> None:
        attempts.append(str(params.url))
        raise Reached(str(params.url))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    async with aiohttp.ClientSession(trace_configs=[trace]) as http:
        yield http, attempts


def hosts_for(origin: Origin) -> frozenset[str]:
    return allowed_hosts(f"{origin.base}/api/v10")


async def refused(call: Awaitable[bytes], *words: str) -> str:
    """Await ``call``, expect BadImageError, and check the message is fit to show a user."""
    with pytest.raises(BadImageError) as info:
        await call
    message = str(info.value)
    assert message and len(message) < 200 and message.endswith(".")
    assert "Traceback" not in message and "127.0.0.1" not in message and "://" not in message
    for word in words:
        assert word in message
    return message


# ------------------------------------------------------------------------------------------- allowed_hosts


def test_allowed_hosts_are_the_cdn_plus_the_api_base_origin() -> None:
    assert allowed_hosts(None) == DISCORD_CDN_HOSTS
    assert allowed_hosts("") == DISCORD_CDN_HOSTS
    assert allowed_hosts("http://127.0.0.1:5555/api/v10") == DISCORD_CDN_HOSTS | {"127.0.0.1:5555"}
    assert allowed_hosts("https://Proxy.Example/api") == DISCORD_CDN_HOSTS | {"proxy.example:443"}
    assert allowed_hosts("http://[::1]:8080/api") == DISCORD_CDN_HOSTS | {"[::1]:8080"}


@pytest.mark.parametrize("base", ["http://[::1/api", "ftp://example.com/", "not a url", "http://:80/",
                                  "http://example.com:99999/", "http://a\\@example.com/"])
def test_malformed_api_base_adds_nothing(base: str) -> None:
    assert allowed_hosts(base) == DISCORD_CDN_HOSTS


# ----------------------------------------------------------------------------------- check_attachment_meta


@pytest.mark.parametrize("content_type", [None, "", "image/png", "IMAGE/JPEG", "image/webp; charset=binary",
                                          "image/gif"])
def test_meta_accepts_images(content_type: str | None) -> None:
    check_attachment_meta("a.png", content_type, CAP, CAP)


@pytest.mark.parametrize(("size", "content_type", "word"), [
    (0, "image/png", "empty"), (-5, "image/png", "empty"), (CAP + 1, "image/png", "limit"),
    (10, "image/svg+xml", "not a PNG"), (10, "text/html", "not a PNG"), (10, "application/octet-stream", "not a PNG"),
])
def test_meta_refuses_bad_attachments(size: int, content_type: str, word: str) -> None:
    with pytest.raises(BadImageError, match=word):
        check_attachment_meta("a.png", content_type, size, CAP)


# ----------------------------------------------------------------------------------------- host checks


BAD_URLS = [
    "http://127.0.0.2:{port}/image",  # another loopback address
    "http://127.0.0.1:{other}/image",  # allowed address, other port: the allow-list pins the port
    "http://localhost:{port}/image",  # same server by another name
    "http://169.254.169.254/latest/meta-data",  # cloud metadata
    "http://[fd00:ec2::254]/latest/meta-data",
    "file:///etc/passwd",
    "ftp://cdn.discordapp.com/attachments/1/2/a.png",
    "gopher://127.0.0.1:{port}/_image",
    "data:image/png;base64,iVBORw0KGgo=",
    "javascript:alert(1)",
    "http://localhost.evil.com/",
    "https://cdn.discordapp.com.evil.com/attachments/1/2/a.png",
    "https://evilcdn.discordapp.com/attachments/1/2/a.png",
    "https://cdn.discordapp.com./attachments/1/2/a.png",
    "https://cdn.discordapp.com:22/attachments/1/2/a.png",  # right host, wrong port
    "https://cdn.discordapp.com:99999/attachments/1/2/a.png",
    "https://cdn.discordapp.com:-1/attachments/1/2/a.png",
    # userinfo: the host is what follows the last '@', whatever the text before it says
    "http://cdn.discordapp.com@127.0.0.1:{other}/image",
    "http://cdn.discordapp.com@127.0.0.1:{port}/image",  # even the allowed origin: Discord never sends userinfo
    "https://cdn.discordapp.com:443@127.0.0.1:{other}/image",
    "https://127.0.0.1:{other}@cdn.discordapp.com/attachments/1/2/a.png",
    "https://user:pass@cdn.discordapp.com/attachments/1/2/a.png",
    "http://cdn.discordapp.com%40127.0.0.1:{other}/image",
    # backslashes: urlsplit and browsers disagree about where the authority ends
    "http://cdn.discordapp.com\\@127.0.0.1:{other}/image",
    "http://127.0.0.1:{other}\\@cdn.discordapp.com/attachments/1/2/a.png",
    "https://127.0.0.1:{other}\\@cdn.discordapp.com/attachments/1/2/a.png",
    "https://cdn.discordapp.com\\.evil.com/",
    "http://127.0.0.1:{other}#@cdn.discordapp.com/",
    "http://127.0.0.1:{other}?@cdn.discordapp.com/",
    "http://127.0.0.1:{other};@cdn.discordapp.com/",
    # IPv6 literals and other spellings of loopback
    "http://[::1]:{port}/image",
    "http://[::ffff:127.0.0.1]:{port}/image",
    "http://[0:0:0:0:0:ffff:7f00:1]:{port}/image",
    "http://[::]:{port}/image",
    "http://[::1/image",
    "http://2130706433:{port}/image",
    "http://0x7f.0.0.1:{port}/image",
    "http://0177.0.0.1:{port}/image",
    "http://127.1:{port}/image",
    "http://0.0.0.0:{port}/image",
    # not URLs, or not absolute
    "",
    " ",
    "not a url",
    "//cdn.discordapp.com/attachments/1/2/a.png",
    "/attachments/1/2/a.png",
    "https:/cdn.discordapp.com/attachments/1/2/a.png",
    "https:cdn.discordapp.com/attachments/1/2/a.png",
    "https://xn--cdn-discordapp-com/",
    "https://cdn%2Ediscordapp.com/attachments/1/2/a.png",
    "https://cdn.discordapp.com%00.evil.com/",
    "https://cdn.discordapp.com\n.evil.com/",
]


@pytest.mark.parametrize("template", BAD_URLS)
async def test_urls_off_the_allow_list_reach_nobody(template: str, origins, tripwire) -> None:
    good, other = origins
    http, attempts = tripwire
    url = template.format(port=good.port, other=other.port)
    await refused(download(http, url, hosts_for(good), CAP))
    assert attempts == []
    assert good.seen == [] and other.seen == []


@pytest.mark.parametrize("url", ["http://cdn.discordapp.com/attachments/1/2/a.png",
                                 "http://media.discordapp.net/attachments/1/2/a.png",
                                 "HTTP://CDN.DISCORDAPP.COM/attachments/1/2/a.png",
                                 "http://cdn.discordapp.com:443/attachments/1/2/a.png"])
async def test_plain_http_to_the_discord_cdn_is_refused(url: str, origins, tripwire) -> None:
    good, _ = origins
    http, attempts = tripwire
    await refused(download(http, url, hosts_for(good), CAP), "secure")
    assert attempts == []


@pytest.mark.parametrize("url", ["https://cdn.discordapp.com/attachments/1/2/a.png?ex=1&is=2&hm=3",
                                 "https://media.discordapp.net/attachments/1/2/a.png",
                                 "https://CDN.DiscordApp.com:443/attachments/1/2/a.png",
                                 "https://cdn.discordapp.com/attachments/1/2/a%20b.png#frag"])
async def test_https_discord_cdn_urls_pass_the_host_check(url: str, tripwire) -> None:
    http, attempts = tripwire
    with pytest.raises(Reached):
        await download(http, url, allowed_hosts(None), CAP)
    assert len(attempts) == 1 and attempts[0].startswith("https://")


async def test_a_bare_host_entry_allows_only_the_default_port(origins, tripwire) -> None:
    good, _ = origins
    http, attempts = tripwire
    await refused(download(http, f"{good.base}/image", frozenset({"127.0.0.1"}), CAP))
    assert attempts == [] and good.seen == []


# ------------------------------------------------------------------------------------------- responses


async def test_allowed_origin_downloads_exact_bytes(origins, session) -> None:
    good, _ = origins
    data = await download(session, f"{good.base}/attachments/1/2/a.png?ex=1&is=2", hosts_for(good), CAP)
    assert data == PNG
    assert good.seen == ["/attachments/1/2/a.png?ex=1&is=2"]
    assert good.headers[0].get("Accept-Encoding") == "identity"


@pytest.mark.parametrize("path", ["/exact", "/chunked-exact"])
async def test_exactly_the_cap_is_accepted(path: str, origins, session) -> None:
    good, _ = origins
    assert len(await download(session, good.base + path, hosts_for(good), CAP)) == CAP


@pytest.mark.parametrize("path", ["/redirect-away", "/redirect-home"])
async def test_redirects_are_not_followed(path: str, origins, session) -> None:
    good, other = origins
    await refused(download(session, good.base + path, hosts_for(good), CAP), "won't follow")
    assert good.seen == [path]
    assert other.seen == []


async def test_missing_attachment_says_so(origins, session) -> None:
    good, _ = origins
    await refused(download(session, f"{good.base}/missing", hosts_for(good), CAP), "HTTP 404", "deleted")


async def test_server_error_says_so(origins, session) -> None:
    good, _ = origins
    await refused(download(session, f"{good.base}/broken", hosts_for(good), CAP), "HTTP 500")


async def test_declared_length_over_the_cap_is_refused_before_reading(origins, session) -> None:
    good, _ = origins
    start = time.monotonic()
    # The body never comes: reading it would run into the 5 s timeout instead of answering at once.
    await refused(download(session, f"{good.base}/declared-huge", hosts_for(good), CAP, timeout=5), "limit")
    assert time.monotonic() - start < 2


async def test_endless_chunked_body_is_cut_off_at_the_cap(origins, session) -> None:
    good, _ = origins
    tracemalloc.start()
    try:
        await refused(download(session, f"{good.base}/endless", hosts_for(good), CAP), "limit")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await asyncio.wait_for(good.client_gone.wait(), 10)  # the server saw the connection drop
    assert good.streamed < 32 * CAP  # the cap plus socket buffers, not the 1 GiB on offer
    assert peak < 8 * CAP


async def test_compressed_body_is_capped_by_its_expanded_size(origins, session) -> None:
    good, _ = origins
    _bomb()  # built before measuring: only the client's memory counts
    tracemalloc.start()
    try:
        await refused(download(session, f"{good.base}/bomb", hosts_for(good), CAP), "limit")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * CAP  # the 64 MiB expansion never sits in memory at once


@pytest.mark.parametrize("path", ["/stall-headers", "/stall-body"])
async def test_stalled_server_is_cut_off_by_the_timeout(path: str, origins, session) -> None:
    good, _ = origins
    start = time.monotonic()
    await refused(download(session, good.base + path, hosts_for(good), CAP, timeout=0.3), "too long")
    assert time.monotonic() - start < 3


async def test_connection_refused_is_a_bad_image_error(session) -> None:
    probe = web.AppRunner(web.Application())
    await probe.setup()
    site = web.TCPSite(probe, "127.0.0.1", 0)
    await site.start()
    port = probe.addresses[0][1]
    await probe.cleanup()  # nothing listens there any more
    base = f"http://127.0.0.1:{port}"
    await refused(download(session, f"{base}/image", allowed_hosts(base), CAP), "could not download")
