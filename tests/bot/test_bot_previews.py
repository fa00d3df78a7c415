"""Live previews through the fake Discord: the progress message shows the picture forming (an image
attachment), paced by the bot's progress throttle, gone once the result (or a cancel) replaces it, and
never sent for a server that turned them off."""

from __future__ import annotations

import asyncio
import io
import time

import PIL.Image
import pytest
from botharness import bot_running, button, command, edit, make_config, team_world
from fakediscord import permissions as perms
from faults import inject_faults

from bot.queue import EventKind, JobEvent
from mgie_engine.protocol import JobProgress, JobStage
from mgie_engine.settings import EngineSettings

pytest_plugins = ["fakediscord.fixtures"]

PROGRESS_INTERVAL = 0.2


@pytest.fixture()
def world(fake_endpoints):
    return team_world(fake_endpoints, "owner", perms.MANAGE_GUILD)


def previews_config(fake, tmp_path, guild, preview_seconds: float = 0.05):
    return make_config(fake, tmp_path / "data", [guild.id], progress_interval=PROGRESS_INTERVAL,
                       engine=EngineSettings(device="cpu", max_side=64, preview_seconds=preview_seconds))


def versions(message) -> list[dict]:
    """Every version the message had, oldest first, the current one last."""
    return [*message.history, message.payload(with_reference=False)]


def preview_files(version: dict) -> list[dict]:
    return [a for a in version.get("attachments", []) if a["filename"] == "preview.jpg"]


def edits_of(fake, inter) -> list:
    """The bot's edits of the interaction's message, in order."""
    return [r for r in fake.requests if r.method == "PATCH" and inter.token in r.path]


async def result_of(fake, inter, timeout: float = 90.0):
    return await fake.wait_for_original(inter, lambda m: m.embeds and m.attachments, timeout=timeout)


async def test_progress_shows_previews_paced_then_the_result_replaces_them(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    # A preview every second of denoising (steps of 30 ms or more: 3 s or more), progress edits every 0.2 s:
    # a few edits bring a new preview, the ones between keep the last one.
    async with bot_running(fake, previews_config(fake, tmp_path, guild, preview_seconds=1.0), tiny_models) as bot:
        inject_faults(bot.engine.workers[0], lambda stage, _jobs: time.sleep(0.03) if stage == "step" else None)
        inter = await edit(fake, alice, channel, steps=100)
        msg = await result_of(fake, inter)
        await asyncio.sleep(1.0)  # anything still in flight would land now
        shown = versions(msg)
        with_preview = [i for i, v in enumerate(shown) if preview_files(v)]
        assert with_preview, "no progress edit carried a preview"
        for i in with_preview:
            assert "Painting" in shown[i]["content"] or "Finishing" in shown[i]["content"]
            data = fake.state.attachments[int(preview_files(shown[i])[0]["id"])].data
            image = PIL.Image.open(io.BytesIO(data))
            assert image.format == "JPEG" and image.size == (256, 192)  # the 64x48 input's shape, 256 px long
        # The result is the last version, with the result alone attached; nothing came after it.
        assert shown[-1] == msg.payload(with_reference=False) and with_preview[-1] < len(shown) - 1
        assert [a.filename for a in msg.attachments] == [f"mgie-{(await bot.store.job_by_message(msg.id)).id[:8]}.png"]
        assert msg.embeds and "Done" in msg.content
        patches = edits_of(fake, inter)
        assert patches[-1].files and not any("preview" in f for f in patches[-1].files)
        # Previews ride on progress edits and never make more of them: each upload came at least one
        # progress interval after the edit before it.
        uploads = [k for k, r in enumerate(patches) if "preview.jpg" in r.files]
        assert uploads and sum("preview.jpg" in r.files for r in patches) == bot.jobs.previews_sent
        assert f"mgie_previews_sent_total {float(bot.jobs.previews_sent)}" in bot.jobs.metrics.render().decode()
        for k in uploads:
            assert patches[k].at - patches[k - 1].at >= PROGRESS_INTERVAL * 0.9
        # Between uploads the preview stays: progress edits after the first keep it rather than drop it.
        first = with_preview[0]
        assert all(preview_files(v) for v in shown[first:-1])
        assert len(uploads) < len(shown) - 1 - first  # some of those edits kept it without uploading again


async def test_a_tick_that_arrives_after_the_result_changes_nothing(world, tmp_path, tiny_models):
    """A preview encoded on a CPU thread (or carried by Redis) can reach the bot after the result: the
    result message must stay as it is."""
    fake, guild, channel, alice, *_ = world
    async with bot_running(fake, previews_config(fake, tmp_path, guild), tiny_models) as bot:
        inter = await edit(fake, alice, channel, steps=10)
        msg = await result_of(fake, inter)
        job = await bot.store.job_by_message(msg.id)
        before, edits = msg.payload(with_reference=False), len(edits_of(fake, inter))
        sent = bot.jobs.previews_sent  # the edit's own previews, if its steps were slow enough to get one
        buf = io.BytesIO()
        PIL.Image.new("RGB", (256, 192), (255, 0, 0)).save(buf, format="JPEG")
        late = JobProgress(job.id, JobStage.DENOISE, 9, 10, preview=buf.getvalue())
        await bot.jobs.on_event(JobEvent(job.id, EventKind.PROGRESS, progress=late))
        await asyncio.sleep(0.5)
        assert msg.payload(with_reference=False) == before and len(edits_of(fake, inter)) == edits
        assert bot.jobs.previews_sent == sent


async def test_a_cancelled_edit_keeps_no_preview(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    async with bot_running(fake, previews_config(fake, tmp_path, guild), tiny_models):
        inter = await edit(fake, alice, channel, steps=100, instruction="stop halfway")
        msg = await fake.wait_for_original(inter, lambda m: any(a.filename == "preview.jpg" for a in m.attachments),
                                           timeout=60)
        await fake.click(alice, msg, button(msg, "cancel"))
        await fake.wait_for(lambda: "Cancelled" in (msg.content or ""), timeout=30)
        await asyncio.sleep(1.0)
        assert "Cancelled" in msg.content and not msg.attachments


async def test_a_server_that_turned_previews_off_gets_none(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, owner = world
    async with bot_running(fake, previews_config(fake, tmp_path, guild), tiny_models) as bot:
        assert "Live previews: on" in await command(fake, owner, channel, "mgie-admin settings")
        with pytest.raises(PermissionError):  # a member without Manage Server can't
            await fake.slash(alice, channel, "mgie-admin settings", {"previews": False})
        assert "Live previews: off" in await command(fake, owner, channel, "mgie-admin settings", {"previews": False})
        assert not (await bot.store.guild_settings(guild.id)).previews
        assert (await bot.store.guild_settings(None)).previews  # DMs: on

        inter = await edit(fake, alice, channel, steps=100)
        msg = await result_of(fake, inter)
        await asyncio.sleep(0.5)
        assert not any(preview_files(v) for v in versions(msg))
        assert not any("preview.jpg" in r.files for r in edits_of(fake, inter))
        assert any("Painting" in (v.get("content") or "") for v in versions(msg))  # progress was shown
        assert bot.jobs.previews_sent == 0


# --- previews and the policy for flagged results (bot/preview_policy.py) ---------------------------------


def attached(version: dict, filename: str) -> bool:
    return any(a["filename"] == filename for a in version.get("attachments", []))


async def safety_check_on(bot) -> None:
    """A safety check that flags nothing: results come out plainly, previews follow the policy."""
    worker = bot.engine.workers[0]
    await worker.wait_ready()  # loading sets the check: replace it after
    worker.safety_check = lambda image: False


def slow_steps(bot, seconds: float = 0.03) -> None:
    inject_faults(bot.engine.workers[0], lambda stage, _jobs: time.sleep(seconds) if stage == "step" else None)


async def test_with_a_safety_check_previews_follow_the_policy_for_flagged_results(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, owner = world
    adults = fake.add_channel(guild, "adults", nsfw=True)
    async with bot_running(fake, previews_config(fake, tmp_path, guild), tiny_models) as bot:
        await safety_check_on(bot)
        slow_steps(bot)

        # Flagged results behind a spoiler (the default): every preview is a spoiler too.
        shown = versions(await result_of(fake, await edit(fake, alice, channel, steps=100)))
        assert any(attached(v, "SPOILER_preview.jpg") for v in shown)
        assert not any(attached(v, "preview.jpg") for v in shown)
        sent = bot.jobs.previews_sent

        # Withheld: no preview at all outside age-restricted channels, and none is even made.
        assert "withhold" in await command(fake, owner, channel, "mgie-admin settings",
                                           {"flagged_outputs": "withhold"})
        inter = await edit(fake, alice, channel, steps=100)
        shown = versions(await result_of(fake, inter))
        assert any("Painting" in (v.get("content") or "") for v in shown)  # progress was shown
        assert not any("preview" in a["filename"] for v in shown for a in v.get("attachments", []))
        assert not any("preview" in f for r in edits_of(fake, inter) for f in r.files)
        assert bot.jobs.previews_sent == sent

        # An age-restricted channel shows flagged results plainly, and so its previews.
        shown = versions(await result_of(fake, await edit(fake, alice, adults, steps=100)))
        assert any(attached(v, "preview.jpg") for v in shown)
        assert not any(attached(v, "SPOILER_preview.jpg") for v in shown)


async def test_a_preview_shown_goes_once_the_server_withholds_flagged_results(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, owner = world
    async with bot_running(fake, previews_config(fake, tmp_path, guild), tiny_models) as bot:
        await safety_check_on(bot)
        slow_steps(bot, 0.05)
        inter = await edit(fake, alice, channel, steps=100)
        msg = await fake.wait_for_original(
            inter, lambda m: any(a.filename == "SPOILER_preview.jpg" for a in m.attachments), timeout=60)
        await command(fake, owner, channel, "mgie-admin settings", {"flagged_outputs": "withhold"})
        switched = len(versions(msg))
        await fake.wait_for(lambda: "Painting" in (msg.content or "") and not msg.attachments, timeout=30)
        await result_of(fake, inter)
        assert not any("preview" in a["filename"] for v in versions(msg)[switched:] for a in v.get("attachments", []))
