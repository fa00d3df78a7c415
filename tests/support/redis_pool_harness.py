"""Starting real `mgie-worker` (and `mgie-bot`) processes against a test redis-server and the tiny checkpoint."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pool_env(redis_server, tiny_paths, **extra: str) -> dict[str, str]:
    """Environment for pool processes: tiny checkpoint on the CPU, small images, fast reclaim for tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "MGIE_"))}
    env.update(tiny_paths.env(), MGIE_DEVICE="cpu", MGIE_MAX_SIDE="128", MGIE_MAX_BATCH="2",
               MGIE_REDIS_URL=redis_server.url, MGIE_REDIS_PREFIX="test", MGIE_REDIS_RECLAIM_IDLE="4",
               MGIE_REDIS_RENEW_INTERVAL="0.5", MGIE_PREVIEW_SECONDS="0",  # previews: tests opt in
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.update(extra)
    return env


class Proc:
    """A child process whose output is collected (for failure messages and the no-password check)."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc, self.name, self.output = proc, name, bytearray()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                return
            self.output += line

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def kill(self) -> None:
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    async def exited(self, timeout: float = 60.0) -> int:
        """Until the process exits by itself."""
        await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, 5)
        return self.proc.returncode

    async def stop(self, timeout: float = 30.0) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.kill()
        await self.proc.wait()
        await asyncio.wait_for(self._reader, 5)
        return self.proc.returncode


async def start_worker(env: dict[str, str], *args: str, name: str = "worker") -> Proc:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "mgie_engine.redis_pool.cli", *args, env=env,
                                                cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    return Proc(proc, name)


async def wait_workers(proto, count: int, timeout: float = 60.0) -> list[dict]:
    """Until `count` workers publish a ready heartbeat."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [w for w in await proto.live_workers() if w["state"] == "ready"]
        if len(live) >= count:
            return live
        await asyncio.sleep(0.2)
    raise AssertionError(f"{count} ready worker(s) expected")


async def owner_of(proto, job_id: str, timeout: float = 60.0) -> str:
    """The consumer that holds the job's stream entry now (host:pid:device)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ref = await proto.redis.get(proto.keys.ref(job_id))
        if ref:
            rows = await proto.redis.xpending_range(proto.keys.jobs, "workers", ref, ref, 1)
            if rows:
                return rows[0]["consumer"].decode()
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} was never taken by a worker")


def pid_of(consumer: str) -> int:
    return int(consumer.split(":")[1])


async def start_bot(env: dict[str, str], fake, guild, data_dir: Path) -> Proc:
    """`python -m bot` with MGIE_REDIS_URL: no checkpoint settings at all (it loads no model)."""
    bot_env = {k: v for k, v in env.items() if k not in ("MGIE_CKPT_DIR", "MGIE_IP2P", "MGIE_CLIP")}
    bot_env.update(DISCORD_TOKEN=fake.token, DISCORD_API_BASE=fake.api_base, DISCORD_GATEWAY_URL=fake.gateway_url,
                   DISCORD_GUILD_IDS=str(guild.id), MGIE_DATA_DIR=str(data_dir), MGIE_SHUTDOWN_GRACE="5",
                   MGIE_PROGRESS_INTERVAL="0.2", DISCORD_MESSAGE_CONTENT="true", MGIE_USER_JOBS_PER_MINUTE="0")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", env=bot_env, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    bot = Proc(proc, "bot")
    await fake.wait_for(lambda: any(c.name == "edit" for c in fake.commands) or proc.returncode is not None,
                        timeout=60)
    assert proc.returncode is None, bot.text
    await asyncio.sleep(1.0)  # commands are synced before on_ready: let start-up finish
    return bot
