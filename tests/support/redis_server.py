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


def make_tls_files(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, made with the openssl CLI."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=mgie test CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (folder / f"{name}.ext").write_text(ext)
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=mgie test {name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {name: folder / name for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process; ``kill()`` + ``start()`` restarts it on the same port and folder."""

    def __init__(self, folder: Path, password: str | None = None, port: int | None = None,
                 binary: str = "redis-server", tls: dict[str, Path] | None = None,
                 tls_auth_clients: str = "no") -> None:
        """``tls`` (from :func:`make_tls_files`): TLS only, on ``port``; ``tls_auth_clients``: no, optional, yes."""
        self.folder, self.port, self.binary = folder, port or free_port(), binary
        self.tls, self.tls_auth_clients = tls, tls_auth_clients
        self.password = password or secrets.token_hex(12)
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which(self.binary)
        if binary is None:
            raise RuntimeError(f"{self.binary} not found (.ci/run installs Debian's package)")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", self.password,
                "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "", "--daemonize", "no", "--logfile", str(self.folder / "redis.log"),
                "--protected-mode", "yes"]
        if self.tls:
            args[1:3] = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls["server.crt"]),
                         "--tls-key-file", str(self.tls["server.key"]), "--tls-ca-cert-file", str(self.tls["ca.crt"]),
                         "--tls-auth-clients", self.tls_auth_clients]
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
            with self._connect() as sock:
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

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
        if not self.tls:
            return sock
        import ssl

        context = ssl.create_default_context(cafile=str(self.tls["ca.crt"]))
        context.load_cert_chain(str(self.tls["client.crt"]), str(self.tls["client.key"]))
        return context.wrap_socket(sock, server_hostname="127.0.0.1")

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
