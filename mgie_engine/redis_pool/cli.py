"""`mgie-worker`: a GPU worker process that takes edits from a Redis Streams pool (see README, "Several GPUs
or hosts"). One process per device; ``--devices all`` starts one per local GPU."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys

from ..arguments import OneLineParser
from ..errors import MgieError
from ..settings import EngineSettings, load_env_file
from .connection import RedisSettings, RedisSetupError, check_server, client

log = logging.getLogger("mgie_engine.redis_pool")

DESCRIPTION = """\
Run MGIE edits for a bot on another host (or this one), through Redis Streams.

Reads the same engine settings as the bot (from the environment or a .env file): MGIE_CKPT_DIR, MGIE_IP2P,
MGIE_CLIP, MGIE_DEVICE, MGIE_DTYPE, MGIE_MAX_SIDE, MGIE_SIZE_STEP, MGIE_MAX_BATCH, MGIE_COMPILE, ... and:
  MGIE_REDIS_URL     redis://:PASSWORD@HOST:6379/0 (rediss:// for TLS); the same as the bot's
  MGIE_REDIS_PREFIX  key namespace (default mgie); the same as the bot's
  MGIE_REDIS_CA_FILE the CA of the server's certificate (rediss://); MGIE_REDIS_CERT_FILE and
                     MGIE_REDIS_KEY_FILE: a client certificate, if the server asks for one
Start as many workers, on as many hosts, as you like: each takes up to MGIE_MAX_BATCH jobs at once.
A worker that dies loses no job: its jobs go to the other workers once its claims stop being renewed.

On a GPU a worker serves edits as soon as its weights are loaded (eagerly) and compiles in the background
(MGIE_COMPILE=auto); the kernels are kept in MGIE_COMPILE_CACHE_DIR, else MGIE_DATA_DIR/compile-cache.
With MGIE_COMPILE_CHILD=auto (1: always, 0: never) a card with room for a second copy of the models
compiles first in child processes (one per class of shape, as many as memory and cores allow, at most
MGIE_COMPILE_CHILDREN), so edits served meanwhile keep eager speed; MGIE_COMPILE_SWITCH_INTERVAL
(default 0.0005 s) is the GIL handover while a compile runs in the worker's own process, and before the
children start and before each class of shape it compiles there the worker lets its running edits finish first,
for up to MGIE_COMPILE_GIVE_WAY seconds (default 10). MGIE_COMPILE_AOT=1
(experimental, off by default: it crashed workers on torch 2.11) saves the denoising steps compiled ahead
of time in that cache and loads them at later starts.
--precompile fills that cache ahead of time (no Redis needed), e.g. when building an image or after an
upgrade, so that later starts reach full speed sooner; it uses the same compile children where they fit.
"""


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mgie-worker", description=DESCRIPTION,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default=None,
                        help="'all' (one process per local GPU, or the CPU when there is none), one device "
                             "(cuda:1, cpu), or a comma list (cuda:0,cuda:1) to start one process each. "
                             "Default: MGIE_DEVICE, else all.")
    parser.add_argument("--precompile", action="store_true",
                        help="load the models, compile them as a worker's warm-up does (on the first device "
                             "given), save the compile cache and exit (0 when done); needs no Redis")
    parser.add_argument("--env-file", default=None,
                        help="read settings from this file (default: the first .env from here upwards); "
                             "values already in the environment win")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..unused_packages import skip_unused_packages

    args = _parser().parse_args(argv)
    if args.env_file:
        from dotenv import load_dotenv

        load_dotenv(args.env_file, override=False)
    else:
        load_env_file()
    skip_unused_packages()  # after .env (MGIE_KEEP_OPTIONAL_IMPORTS), before the model libraries' first import
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.precompile:
        return _precompile(args.devices)
    try:
        redis_settings = RedisSettings.from_env()
        if redis_settings is None:
            raise RedisSetupError("MGIE_REDIS_URL is not set; it names the Redis that the bot and the workers "
                                  "share (redis://:PASSWORD@HOST:6379/0).")
        engine = EngineSettings.from_env()
        asyncio.run(_check(redis_settings))
        devices = _devices(engine, args.devices)
    except (RedisSetupError, MgieError) as err:
        print(f"mgie-worker: {err}", file=sys.stderr)
        return 2
    if len(devices) > 1:
        return _run_children(devices, args.env_file)
    engine = dataclasses.replace(engine, device=devices[0])
    return asyncio.run(_serve(engine, redis_settings))


def _precompile(devices: str | None) -> int:
    """``--precompile``: 0 once the cache artifacts are saved; 1 with a one-line error otherwise."""
    from ..lifecycle import precompile

    try:
        engine = EngineSettings.from_env()
        engine = dataclasses.replace(engine, device=_devices(engine, devices)[0])
        path = precompile(engine, children=True)
    except Exception as err:  # one line for the host; the details are in the log above
        log.error("precompile failed", exc_info=True)
        message = str(err) if isinstance(err, MgieError) else f"{type(err).__name__}: {err}"
        print(f"mgie-worker --precompile: {' '.join(message.split())[:300]}", file=sys.stderr)
        return 1
    print(f"mgie-worker --precompile: compile cache saved to {path}")
    return 0


async def _check(settings: RedisSettings) -> None:
    conn = client(settings)
    try:
        version = await check_server(conn, settings)
    finally:
        await conn.aclose()
    log.info("Redis %s at %s (prefix %r)", version, settings.safe_url, settings.prefix)


def _devices(engine: EngineSettings, flag: str | None) -> list[str]:
    name = (flag or engine.device or "auto").strip().lower()
    if name in ("all", "auto"):
        return dataclasses.replace(engine, device="auto").device_list()
    return dataclasses.replace(engine, device=name).device_list()


def _run_children(devices: list[str], env_file: str | None) -> int:
    """One process per device (no GIL shared between GPUs); signals are passed on; exits when all have."""
    children = []
    for device in devices:
        cmd = [sys.executable, "-m", "mgie_engine.redis_pool.cli", "--devices", device]
        if env_file:
            cmd += ["--env-file", env_file]
        children.append(subprocess.Popen(cmd, env={**os.environ, "MGIE_DEVICE": device}))
    log.info("started %d worker processes: %s", len(children), ", ".join(devices))

    def forward(signum, _frame) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


async def _serve(engine: EngineSettings, redis_settings: RedisSettings) -> int:
    from ..worker import LocalWorker
    from .service import WorkerService, consumer_name
    from .streams import StreamProtocol

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    conn = client(redis_settings)
    name = consumer_name(engine.device)
    service = WorkerService(LocalWorker(engine, name=engine.device), StreamProtocol(conn, redis_settings), name)
    try:
        return await service.run(stop, grace=float(os.environ.get("MGIE_SHUTDOWN_GRACE") or 30))
    finally:
        await conn.aclose()


if __name__ == "__main__":
    sys.exit(main())
