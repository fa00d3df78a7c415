"""The gateway websocket: HELLO/IDENTIFY/READY, heartbeats, RESUME with replay, fault hooks.

One :class:`GatewaySession` per IDENTIFY keeps the sequence counter and a replay buffer, so a
dropped connection can RESUME and receive exactly the events it missed. Each websocket is a
:class:`GatewayConnection` with its own writer task and transport compression
(``zlib-stream``, or ``zstd-stream`` when a zstd encoder is importable).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from . import intents as intent_bits

if TYPE_CHECKING:
    from .state import EventData, State

log = logging.getLogger("fakediscord.gateway")

OP_DISPATCH = 0
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_PRESENCE = 3
OP_VOICE_STATE = 4
OP_RESUME = 6
OP_RECONNECT = 7
OP_REQUEST_MEMBERS = 8
OP_INVALID_SESSION = 9
OP_HELLO = 10
OP_HEARTBEAT_ACK = 11

REPLAY_BUFFER = 5000


class _ZlibStream:
    name = "zlib-stream"

    def __init__(self) -> None:
        self._c = zlib.compressobj()

    def encode(self, text: str) -> bytes:
        return self._c.compress(text.encode()) + self._c.flush(zlib.Z_SYNC_FLUSH)


def _zstd_encoder() -> Callable[[], Any] | None:
    """A factory for a streaming zstd encoder, if this interpreter has one."""
    try:
        import zstandard  # type: ignore[import-not-found]

        class _Zstandard:
            name = "zstd-stream"

            def __init__(self) -> None:
                self._c = zstandard.ZstdCompressor().compressobj()

            def encode(self, text: str) -> bytes:
                return self._c.compress(text.encode()) + self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)

        return _Zstandard
    except ImportError:
        pass
    try:
        from compression import zstd  # type: ignore[import-not-found]

        class _StdlibZstd:
            name = "zstd-stream"

            def __init__(self) -> None:
                self._c = zstd.ZstdCompressor()

            def encode(self, text: str) -> bytes:
                return self._c.compress(text.encode(), mode=zstd.ZstdCompressor.FLUSH_BLOCK)

        return _StdlibZstd
    except ImportError:
        return None


@dataclass(eq=False)
class GatewaySession:
    """An identified session: what RESUME restores."""

    id: str
    intents: int
    identify: dict[str, Any]
    created_at: float = field(default_factory=time.monotonic)
    seq: int = 0
    buffer: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=REPLAY_BUFFER))
    connection: GatewayConnection | None = None
    resumable: bool = True
    resumes: int = 0

    def push(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        self.seq += 1
        frame = {"op": OP_DISPATCH, "t": event, "s": self.seq, "d": data}
        self.buffer.append(frame)
        if self.connection is not None:
            self.connection.enqueue(frame)
        return frame


@dataclass(eq=False)
class GatewayConnection:
    """One websocket. ``heartbeats`` holds monotonic arrival times of every op-1 heartbeat."""

    ws: web.WebSocketResponse
    request: web.Request
    compression: str | None
    via_resume_url: bool
    opened_at: float = field(default_factory=time.monotonic)
    session: GatewaySession | None = None
    heartbeats: list[float] = field(default_factory=list)
    heartbeat_seqs: list[int | None] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    closed_at: float | None = None
    close_code: int | None = None
    closed_by: str | None = None
    _queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    _encoder: Any = None
    _writer: asyncio.Task[None] | None = None

    @property
    def open(self) -> bool:
        return self.closed_at is None

    def enqueue(self, frame: dict[str, Any]) -> None:
        if self.closed_at is None:
            self._queue.put_nowait(frame)

    async def write_loop(self) -> None:
        while True:
            frame = await self._queue.get()
            if frame is None:
                return
            text = json.dumps(frame, separators=(",", ":"))
            try:
                if self._encoder is not None:
                    await self.ws.send_bytes(self._encoder.encode(text))
                else:
                    await self.ws.send_str(text)
            except (ConnectionError, RuntimeError) as exc:
                log.debug("gateway write failed: %r", exc)
                return

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far has been written to the socket."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and self.closed_at is None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    def abort(self) -> None:
        """Cut the TCP connection without a close frame (an abrupt network drop)."""
        self.closed_by = "server-abort"
        transport = self.request.transport
        if transport is not None:
            transport.abort()


class Gateway:
    """Serves ``/gateway`` (and the resume URL) and fans state events out to sessions."""

    def __init__(
        self,
        state: State,
        *,
        heartbeat_interval: float = 41.25,
        zombie_timeout: float | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.state = state
        self.heartbeat_interval = heartbeat_interval
        #: Close (4009, not resumable) when no heartbeat arrives for this long; None disables.
        self.zombie_timeout = heartbeat_interval * 2 + 1.0 if zombie_timeout is None else zombie_timeout
        self.enforce_heartbeats = True
        self.sessions: dict[str, GatewaySession] = {}
        self.connections: list[GatewayConnection] = []
        self.events: list[tuple[str, int, str, dict[str, Any]]] = []
        self.identify_count = 0
        self.resume_count = 0
        self.invalid_session_count = 0
        self.gateway_url = ""
        self.resume_url = ""
        self._on_change = on_change or (lambda: None)
        self._zstd = _zstd_encoder()

    # -- EventSink -----------------------------------------------------------------------

    def dispatch(self, event: str, data: EventData, *, intent: int | None = None) -> None:
        for session in list(self.sessions.values()):
            if not session.resumable and session.connection is None:
                continue
            if intent is not None and not session.intents & intent:
                continue
            payload = data(session.intents) if callable(data) else data
            if payload is None:
                continue
            frame = session.push(event, payload)
            self.events.append((session.id, frame["s"], event, payload))

    # -- views ----------------------------------------------------------------------------

    @property
    def live_connections(self) -> list[GatewayConnection]:
        return [c for c in self.connections if c.open and c.session is not None]

    @property
    def connected(self) -> bool:
        return bool(self.live_connections)

    def has_session(self) -> bool:
        return any(s.resumable or s.connection is not None for s in self.sessions.values())

    def heartbeat_times(self) -> list[float]:
        return sorted(t for c in self.connections for t in c.heartbeats)

    def max_heartbeat_gap(self) -> float:
        """Largest time between consecutive heartbeats on any one connection (0 if < 2)."""
        gaps = [b - a for c in self.connections for a, b in zip(c.heartbeats, c.heartbeats[1:], strict=False)]
        return max(gaps, default=0.0)

    def events_named(self, event: str) -> list[dict[str, Any]]:
        return [d for _, _, e, d in self.events if e == event]

    # -- test hooks ------------------------------------------------------------------------

    async def drop(self, code: int | None = 4000) -> int:
        """Disconnect every live connection: a close frame with ``code``, or abruptly if None."""
        conns = self.live_connections
        for conn in conns:
            if code is None:
                conn.abort()
            else:
                conn.closed_by = "server"
                await conn.ws.close(code=code, message=b"fake drop")
        return len(conns)

    async def invalidate(self, *, resumable: bool = False) -> None:
        """Send op 9 (INVALID_SESSION); with ``resumable=False`` the bot must IDENTIFY again."""
        for conn in self.live_connections:
            assert conn.session is not None
            if not resumable:
                conn.session.resumable = False
            self.invalid_session_count += 1
            conn.enqueue({"op": OP_INVALID_SESSION, "d": resumable})

    async def request_reconnect(self) -> None:
        """Send op 7 (RECONNECT): the bot should close and RESUME."""
        for conn in self.live_connections:
            conn.enqueue({"op": OP_RECONNECT, "d": None})

    async def request_heartbeat(self) -> None:
        """Send op 1: the bot must heartbeat immediately."""
        for conn in self.live_connections:
            conn.enqueue({"op": OP_HEARTBEAT, "d": None})

    async def close_all(self) -> None:
        for conn in list(self.connections):
            if conn.open:
                conn.closed_by = "server"
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.ws.close(code=1001, message=b"shutting down"), 2.0)
        for conn in self.connections:
            if conn._writer is not None:
                conn._writer.cancel()

    # -- the websocket handler --------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=0, compress=True)
        await ws.prepare(request)
        compress = request.query.get("compress")
        conn = GatewayConnection(ws=ws, request=request, compression=compress,
                                 via_resume_url=request.path.rstrip("/").endswith("/resume"))
        if compress == "zlib-stream":
            conn._encoder = _ZlibStream()
        elif compress == "zstd-stream" and self._zstd is not None:
            conn._encoder = self._zstd()
        self.connections.append(conn)
        conn._writer = asyncio.create_task(conn.write_loop(), name="fakediscord-gateway-writer")
        watchdog = asyncio.create_task(self._watchdog(conn), name="fakediscord-gateway-watchdog")
        self._on_change()
        try:
            version = request.query.get("v")
            if version not in ("9", "10"):
                await self._close(conn, 4012, "Invalid API version")
                return ws
            if request.query.get("encoding", "json") != "json":
                await self._close(conn, 4002, "Error while decoding payload.")
                return ws
            conn.enqueue({"op": OP_HELLO, "d": {"heartbeat_interval": int(self.heartbeat_interval * 1000),
                                                "_trace": ['["gateway-fake",{"micros":0}]']}})
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    raw: str | bytes = msg.data
                elif msg.type == WSMsgType.BINARY:
                    raw = msg.data
                else:
                    break
                try:
                    frame = json.loads(raw)
                    if not isinstance(frame, dict):
                        raise ValueError("not an object")
                except ValueError:
                    await self._close(conn, 4002, "Error while decoding payload.")
                    break
                conn.received.append(frame)
                if not await self._on_frame(conn, frame):
                    break
        finally:
            watchdog.cancel()
            conn.closed_at = time.monotonic()
            conn.close_code = ws.close_code
            conn._queue.put_nowait(None)
            session = conn.session
            if session is not None and session.connection is conn:
                session.connection = None
                if ws.close_code in (1000, 1001) and conn.closed_by is None:
                    session.resumable = False  # a clean client close ends the session on Discord
            self._on_change()
        return ws

    async def _close(self, conn: GatewayConnection, code: int, reason: str) -> None:
        conn.closed_by = "server"
        await conn.flush()
        await conn.ws.close(code=code, message=reason.encode())

    async def _watchdog(self, conn: GatewayConnection) -> None:
        step = max(self.heartbeat_interval / 4, 0.05)
        while True:
            await asyncio.sleep(step)
            if not self.enforce_heartbeats or self.zombie_timeout is None:
                continue
            last = conn.heartbeats[-1] if conn.heartbeats else conn.opened_at
            if time.monotonic() - last > self.zombie_timeout:
                log.info("no heartbeat for %.2fs: closing with 4009", time.monotonic() - last)
                if conn.session is not None:
                    conn.session.resumable = False
                await self._close(conn, 4009, "Session timed out.")
                return

    async def _on_frame(self, conn: GatewayConnection, frame: dict[str, Any]) -> bool:
        op = frame.get("op")
        data = frame.get("d")
        if op == OP_HEARTBEAT:
            conn.heartbeats.append(time.monotonic())
            conn.heartbeat_seqs.append(data if isinstance(data, int) else None)
            conn.enqueue({"op": OP_HEARTBEAT_ACK})
            self._on_change()
            return True
        if op == OP_IDENTIFY:
            return await self._identify(conn, data or {})
        if op == OP_RESUME:
            return await self._resume(conn, data or {})
        if conn.session is None:
            await self._close(conn, 4003, "Not authenticated.")
            return False
        if op == OP_PRESENCE or op == OP_VOICE_STATE:
            return True
        if op == OP_REQUEST_MEMBERS:
            self._members_chunk(conn.session, data or {})
            return True
        await self._close(conn, 4001, "Unknown opcode.")
        return False

    def _token_ok(self, token: Any) -> bool:
        if not isinstance(token, str):
            return False
        if token.startswith("Bot "):
            token = token[4:]
        return token == self.state.token

    async def _authenticate(self, conn: GatewayConnection, data: dict[str, Any]) -> bool:
        """IDENTIFY and RESUME both need a fresh connection and the right token; close it otherwise."""
        if conn.session is not None:
            await self._close(conn, 4005, "Already authenticated.")
            return False
        if not self._token_ok(data.get("token")):
            await self._close(conn, 4004, "Authentication failed.")
            return False
        return True

    async def _identify(self, conn: GatewayConnection, data: dict[str, Any]) -> bool:
        if not await self._authenticate(conn, data):
            return False
        requested = data.get("intents")
        if not isinstance(requested, int) or requested < 0 or requested >= 1 << 26:
            await self._close(conn, 4013, "Invalid intent(s).")
            return False
        if requested & intent_bits.PRIVILEGED & ~self.state.privileged_intents:
            await self._close(conn, 4014, "Disallowed intent(s).")
            return False
        self.identify_count += 1
        session = GatewaySession(id=secrets.token_hex(16), intents=requested, identify=data)
        self.sessions[session.id] = session
        session.connection = conn
        conn.session = session
        ready = self._ready_payload(session)
        if data.get("shard") is not None:
            ready["shard"] = data["shard"]
        frame = session.push("READY", ready)
        self.events.append((session.id, frame["s"], "READY", ready))
        if requested & intent_bits.GUILDS:
            for guild in [g for g in self.state.guilds.values() if self.state.bot_in(g)]:
                payload = self.state.guild_create_payload(guild, requested)
                frame = session.push("GUILD_CREATE", payload)
                self.events.append((session.id, frame["s"], "GUILD_CREATE", payload))
        self._on_change()
        return True

    def _ready_payload(self, session: GatewaySession) -> dict[str, Any]:
        st = self.state
        user = st.bot_user.payload()
        user.update({"verified": True, "mfa_enabled": False, "email": None, "flags": 0, "bot": True})
        return {
            "v": 10,
            "user": user,
            "user_settings": {},
            "guilds": [{"id": str(g.id), "unavailable": True} for g in st.guilds.values() if st.bot_in(g)],
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": ["fake-local"],
            "session_id": session.id,
            "session_type": "normal",
            "resume_gateway_url": self.resume_url,
            "application": {"id": str(st.application_id), "flags": intent_bits.application_flags(st.privileged_intents)},
            "auth": {},
            "_trace": ['["gateway-fake",{"micros":0}]'],
        }

    async def _resume(self, conn: GatewayConnection, data: dict[str, Any]) -> bool:
        if not await self._authenticate(conn, data):
            return False
        session = self.sessions.get(str(data.get("session_id")))
        seq = data.get("seq")
        if session is None or not session.resumable or session.connection is not None:
            self.invalid_session_count += 1
            conn.enqueue({"op": OP_INVALID_SESSION, "d": False})
            return True
        if not isinstance(seq, int):
            seq = 0
        oldest = session.buffer[0]["s"] if session.buffer else session.seq + 1
        if seq + 1 < oldest:  # the events it missed are no longer buffered
            session.resumable = False
            self.invalid_session_count += 1
            conn.enqueue({"op": OP_INVALID_SESSION, "d": False})
            return True
        self.resume_count += 1
        session.resumes += 1
        for frame in list(session.buffer):
            if frame["s"] > seq:
                conn.enqueue(frame)
        session.connection = conn
        conn.session = session
        resumed = {"_trace": ['["gateway-fake",{"micros":0}]']}
        frame = session.push("RESUMED", resumed)
        self.events.append((session.id, frame["s"], "RESUMED", resumed))
        self._on_change()
        return True

    def _members_chunk(self, session: GatewaySession, data: dict[str, Any]) -> None:
        guild = self.state.guilds.get(int(data.get("guild_id", 0) or 0))
        if guild is None or not self.state.bot_in(guild):
            return
        members = list(guild.members.values())
        user_ids = data.get("user_ids")
        not_found: list[str] = []
        if user_ids:
            wanted = {int(u) for u in (user_ids if isinstance(user_ids, list) else [user_ids])}
            not_found = [str(u) for u in wanted if u not in guild.members]
            members = [m for m in members if m.user.id in wanted]
        query = data.get("query") or ""
        if query:
            members = [m for m in members if m.user.username.lower().startswith(query.lower())]
        limit = data.get("limit") or 0
        if limit:
            members = members[:limit]
        payload: dict[str, Any] = {
            "guild_id": str(guild.id),
            "members": [m.payload() for m in members],
            "chunk_index": 0,
            "chunk_count": 1,
        }
        if not_found:
            payload["not_found"] = not_found
        if data.get("nonce") is not None:
            payload["nonce"] = data["nonce"]
        if data.get("presences"):
            payload["presences"] = []
        frame = session.push("GUILD_MEMBERS_CHUNK", payload)
        self.events.append((session.id, frame["s"], "GUILD_MEMBERS_CHUNK", payload))
