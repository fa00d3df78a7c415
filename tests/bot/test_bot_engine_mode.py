"""End to end: /mgie status says which mode serves the edits (eager while compiling, then compiled), in the
reader's language, and edits are served while the worker compiles."""

from __future__ import annotations

import threading

from botharness import basic_world, bot_running, edit, finished, make_config

from mgie_engine.pipeline import MgiePipeline
from mgie_engine.settings import EngineSettings

pytest_plugins = ["fakediscord.fixtures"]


async def _worker_line(fake, user, channel, locale=None) -> str:
    status = await fake.slash(user, channel, "mgie status", locale=locale)
    await fake.wait_for(lambda: status.callbacks)
    fields = status.callbacks[0].data["embeds"][0]["fields"]
    return next(f["value"] for f in fields if f["name"].startswith("Worker "))


async def test_status_shows_eager_while_compiling_then_compiled(fake_endpoints, tmp_path, tiny_models, monkeypatch):
    fake, _guild, channel, alice = basic_world(fake_endpoints)
    release = threading.Event()
    monkeypatch.setattr(MgiePipeline, "compiles", property(lambda self: self.compile_unet))  # as on CUDA
    monkeypatch.setattr(MgiePipeline, "warm_up", lambda self, max_jobs: release.wait(60))  # a long compile
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    engine = EngineSettings(device="cpu", max_side=64, compile=True, data_dir=str(tmp_path / "data"))
    try:
        async with bot_running(fake, make_config(fake, tmp_path / "data", engine=engine), tiny_models) as bot:
            await fake.wait_for(lambda: fake.command("edit"), timeout=10)
            await bot.engine.workers[0].wait_ready()
            assert "mode: eager (compiling)" in await _worker_line(fake, alice, channel)
            served = await finished(fake, await edit(fake, alice, channel))  # no wait for the compile
            assert served.attachments
            release.set()
            assert await bot.engine.workers[0].wait_compiled() == "compiled"
            assert (await _worker_line(fake, alice, channel)).endswith(" · mode: compiled")
            assert (await _worker_line(fake, alice, channel, locale="de")).endswith(" · Modus: kompiliert")
    finally:
        release.set()
