"""Live previews through the Redis pool: the bot and an `mgie-worker` process against a real redis-server.
A preview's bytes sit in their own key with a short TTL; the progress channel carries only a flag; what the
bot reads back is checked and size-capped before it goes to Discord."""

from __future__ import annotations

import asyncio
import io
import json

import PIL.Image
import pytest
from botharness import basic_world, png_bytes
from redis_pool_harness import pool_env, start_bot, start_worker, wait_workers

from mgie_engine.protocol import JobProgress, JobStage
from mgie_engine.redis_pool import payloads
from mgie_engine.redis_pool.connection import RedisSettings, client
from mgie_engine.redis_pool.streams import StreamProtocol

pytest_plugins = ["fakediscord.fixtures", "redis_server"]


@pytest.fixture()
async def proto(redis_server):
    settings = RedisSettings.from_env({"MGIE_REDIS_URL": redis_server.url, "MGIE_REDIS_PREFIX": "test"})
    conn = client(settings)
    yield StreamProtocol(conn, settings)
    await conn.aclose()


def _jpeg(width: int = 32, height: int = 24) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


async def test_a_preview_goes_to_its_own_key_and_the_channel_carries_a_flag(proto):
    pubsub = proto.redis.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(proto.keys.progress)
    try:
        await proto.publish_progress(JobProgress("job1", JobStage.DENOISE, 30, 100, preview=_jpeg()))
        message = None
        while message is None:
            message = await pubsub.get_message(timeout=1.0)
    finally:
        await pubsub.aclose()
    assert len(message["data"]) <= payloads.MAX_PROGRESS_JSON and json.loads(message["data"])["p"] == 1
    progress, has_preview = payloads.decode_progress_message(message["data"])
    assert has_preview and progress.preview is None and progress.step == 30
    assert 0 < await proto.redis.ttl(proto.keys.preview("job1")) <= payloads.PREVIEW_TTL
    assert await proto.read_preview("job1") == _jpeg()
    assert await proto.read_preview("gone") is None
    plain = payloads.encode_progress(JobProgress("job1", JobStage.DENOISE, 31, 100))
    assert payloads.decode_progress_message(plain)[1] is False


@pytest.mark.parametrize("raw", [b"", b"not an image", b"\xff\xd8" + b"x" * 100,
                                 b"x" * (payloads.MAX_PREVIEW_BYTES + 1)])
async def test_what_the_bot_reads_back_is_checked(proto, raw):
    await proto.redis.set(proto.keys.preview("bad"), raw, ex=5)
    with pytest.raises(payloads.BadPayloadError):
        await proto.read_preview("bad")


def test_a_preview_larger_than_the_cap_in_pixels_is_refused():
    buf = io.BytesIO()
    PIL.Image.new("L", (payloads.MAX_PREVIEW_SIDE + 1, 8)).save(buf, format="PNG")
    with pytest.raises(payloads.BadPayloadError, match="too large"):
        payloads.check_preview(buf.getvalue())
    assert payloads.check_preview(_jpeg()) == _jpeg()


async def test_the_pool_carries_previews_to_the_progress_message(fake_discord, redis_server, tiny_paths, tmp_path,
                                                                 proto):
    fake, guild, channel, alice = basic_world(fake_discord)
    env = pool_env(redis_server, tiny_paths, MGIE_MAX_BATCH="1", MGIE_PREVIEW_SECONDS="0.3")
    procs = [await start_bot(env, fake, guild, tmp_path / "data"), await start_worker(env, name="worker0")]
    try:
        await wait_workers(proto, 1)
        att = fake.upload_user_attachment(channel, "in.png", png_bytes(96, 64))
        inter = await fake.slash(alice, channel, "edit", {"image": att, "instruction": "make it red", "steps": 100})
        msg = await fake.wait_for_original(inter, lambda m: m.embeds and m.attachments, timeout=120)
        await asyncio.sleep(1.0)
        shown = [*msg.history, msg.payload(with_reference=False)]
        previews = [a for v in shown[:-1] for a in v.get("attachments", []) if a["filename"] == "preview.jpg"]
        assert previews, "no progress edit carried a preview"
        image = PIL.Image.open(io.BytesIO(fake.state.attachments[int(previews[0]["id"])].data))
        assert image.format == "JPEG" and image.size == (256, 171)  # 96x64 fitted, 256 px on its long side
        assert [a.filename for a in msg.attachments if a.filename == "preview.jpg"] == []
        assert msg.embeds and "Done" in msg.content
    finally:
        for proc in reversed(procs):
            await proc.stop(timeout=20)
    output = "".join(p.text for p in procs)
    assert redis_server.password not in output and "Traceback" not in output, output[-4000:]
