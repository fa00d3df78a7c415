"""Running the real MgieBot against the fake Discord, on tiny checkpoints already loaded once."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from pathlib import Path

from fakediscord import running_bot

from bot.bot import MgieBot
from bot.config import BotConfig
from mgie_engine.settings import EngineSettings
from mgie_engine.worker import LocalWorker


def png_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    from conftest import make_image

    buf = io.BytesIO()
    make_image(width, height, seed).save(buf, format="PNG")
    return buf.getvalue()


def make_config(fake, data_dir: Path, guild_ids=(), **overrides) -> BotConfig:
    values = dict(token=fake.token, api_base=fake.api_base, gateway_url=fake.gateway_url, guild_ids=tuple(guild_ids),
                  data_dir=data_dir, message_content=True, max_queue=100, progress_interval=0.2,
                  engine=EngineSettings(device="cpu", max_side=64, preview_seconds=0))  # previews: tests opt in
    values.update(overrides)
    return BotConfig(**values)


class SharedModelWorker(LocalWorker):
    """A real LocalWorker whose loader hands back the session's tiny models (loading once saves minutes)."""

    def __init__(self, models, settings: EngineSettings, delay_ready=None) -> None:
        super().__init__(settings, loader=lambda _s: models)
        self.delay_ready = delay_ready
        self._shut = threading.Event()

    def _load(self) -> None:
        # Held back until released (at most 30 s), or until the bot shuts the worker down: closing waits for
        # this thread, and would otherwise wait out the hold.
        deadline = time.monotonic() + 30
        while self.delay_ready is not None and not self.delay_ready.wait(0.05):
            if self._shut.is_set() or time.monotonic() > deadline:
                break
        super()._load()

    def shutdown(self) -> None:
        self._shut.set()
        super().shutdown()


@contextlib.asynccontextmanager
async def bot_running(fake, config: BotConfig, models, delay_ready=None):
    worker = SharedModelWorker(models, config.engine, delay_ready=delay_ready)
    bot = MgieBot(config, workers=[worker])
    bot._connection.guild_ready_timeout = 0.1  # noqa: SLF001 - discord.py's own knob, set like its kwarg
    async with running_bot(bot, fake.token):
        yield bot


def basic_world(fake):
    """One server, one channel, one member: (fake, guild, channel, alice)."""
    guild = fake.add_guild("Lab")
    channel = fake.add_channel(guild, "edits")
    alice = fake.add_user("alice")
    fake.add_member(guild, alice)
    return fake, guild, channel, alice


def team_world(fake, third: str, third_permissions: int):
    """basic_world plus bob (a member) and a third user with the given permissions."""
    fake, guild, channel, alice = basic_world(fake)
    bob, other = fake.add_user("bob"), fake.add_user(third)
    fake.add_member(guild, bob)
    fake.add_member(guild, other, permissions=third_permissions)
    return fake, guild, channel, alice, bob, other


# -- what a user does, and what they see -------------------------------------------------------------
def button(message, action: str) -> str:
    """The custom id of a result message's ``action`` button (reroll, stronger, undo, ...)."""
    return next(c for c in message.custom_ids if c.startswith(f"mgie:{action}:"))


async def edit(fake, user, channel, instruction="make the sky a sunset", **options):
    """``/edit`` with a small PNG (or ``data=`` bytes) and 3 steps unless ``options`` say otherwise."""
    att = fake.upload_user_attachment(channel, "cat.png", options.pop("data") if "data" in options else png_bytes())
    return await fake.slash(user, channel, "edit", {"image": att, "instruction": instruction, "steps": 3, **options})


async def finished(fake, inter, timeout=60):
    """The interaction's original message once it carries the result image."""
    return await fake.wait_for_original(inter, lambda m: m.attachments, timeout=timeout)


async def private_answer(fake, inter) -> str:
    """The ephemeral text a refused interaction got (and that it got no public reply)."""
    await fake.wait_for(lambda: inter.callbacks)
    assert inter.ephemeral and not inter.failed and not inter.deferred
    return inter.callbacks[0].data["content"]


async def command(fake, user, channel, name, options=None) -> str:
    """A slash command answered privately: its answer's text."""
    return await private_answer(fake, await fake.slash(user, channel, name, options))


async def job_count(bot) -> int:
    """Jobs stored, in any state."""
    return sum((await bot.store.counts_by_state()).values())
