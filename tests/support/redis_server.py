"""A real `redis-server` for tests: free loopback port, its own folder, a password, AOF `everysec`.

Tests that need Redis use the ``redis_server`` fixture; it can SIGKILL the server and start it again on the
same folder (so the AOF is replayed), and always stops it at the end. ``proto`` is the pool's stream protocol
on it (prefix ``test``, as ``redis_pool_harness.pool_env`` sets), for tests that look into Redis.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import pytest
except ImportError:  # bench/redis_hop.py starts a server with this class on GPU hosts that have no test tools
    pytest = None


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process; ``kill()`` + ``start()`` restarts it on the same port and folder."""

    def __init__(self, folder: Path, password: str | None = None, port: int | None = None,
                 binary: str = "redis-server") -> None:
        self.folder, self.port, self.binary = folder, port or free_port(), binary
        self.password = password or secrets.token_hex(12)
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which(self.binary)
        if binary is None:
            raise RuntimeError(f"{self.binary} not found (.ci/run installs Debian's package)")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", self.password,
                "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "", "--daemonize", "no", "--logfile", str(self.folder / "redis.log"),
                "--protected-mode", "yes"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.folder / 'redis.log').read_text()[-2000:]}")
            if self._answers():
                return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start in time")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                auth = f"*2\r\n$4\r\nAUTH\r\n${len(self.password)}\r\n{self.password}\r\n*1\r\n$4\r\nPING\r\n"
                sock.sendall(auth.encode())
                reply = b""
                while reply.count(b"\r\n") < 2:
                    chunk = sock.recv(1024)
                    if not chunk:
                        return False
                    reply += chunk
                return b"+PONG" in reply  # -LOADING while the AOF is replayed
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown save; what survives is what the AOF had."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


if pytest is not None:
    @pytest.fixture()
    def redis_server(tmp_path) -> Iterator[RedisServer]:
        server = RedisServer(tmp_path / "redis")
        server.start()
        try:
            yield server
        finally:
            server.kill()

    @pytest.fixture()
    async def proto(redis_server: RedisServer):
        from mgie_engine.redis_pool.connection import RedisSettings, client
        from mgie_engine.redis_pool.streams import StreamProtocol

        settings = RedisSettings.from_env({"MGIE_REDIS_URL": redis_server.url, "MGIE_REDIS_PREFIX": "test"})
        conn = client(settings)
        yield StreamProtocol(conn, settings)
        await conn.aclose()
