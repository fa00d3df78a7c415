"""Resources end to end over the fake Discord: memory per request, what is kept on disk, the event loop.

Huge inputs must cost a bounded amount of memory however many arrive; a refused request leaves no file
or row; users can delete their data; the bot's own tasks are tracked and the loop never waits on analysis.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time

import PIL.Image
import pytest
from bigimages import png_16bit_rgba
from botharness import bot_running, button, make_config, png_bytes, team_world
from fakediscord import permissions as perms

from bot import presets

pytest_plugins = ["fakediscord.fixtures"]

MB = 2**20


@pytest.fixture()
def world(fake_endpoints):
    return team_world(fake_endpoints, "carol", perms.MANAGE_MESSAGES)


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    return png_16bit_rgba()  # 40 MP, 16-bit RGBA, ~330 KB on disk


async def edit(fake, user, channel, data: bytes, name: str = "cat.png", **options):
    att = fake.upload_user_attachment(channel, name, data)
    return await fake.slash(user, channel, "edit", {"image": att, "instruction": "make it red", "steps": 2,
                                                    **options})


async def finished(fake, inter, timeout=120):
    return await fake.wait_for_original(inter, lambda m: m.attachments, timeout=timeout)


async def queued(fake, inter):
    await fake.wait_for(lambda: inter.original and "queued" in (inter.original.content or "").lower(), timeout=60)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def stored_files(config) -> list[str]:
    return sorted(p.name for p in (config.data_dir / "images").iterdir())


# --- item 3: memory per request -------------------------------------------------------------------


async def test_a_flood_of_huge_pngs_keeps_peak_memory_bounded(world, tmp_path, tiny_models, huge_png):
    """Four 40 MP 16-bit PNGs at once used to take ~1 GB each to decode, all at the same time; now each
    decode holds about its decoder buffer (160 MB) and only ``decodes`` run at once."""
    fake, guild, channel, alice, bob, _ = world
    config = make_config(fake, tmp_path / "data", [guild.id])
    async with bot_running(fake, config, tiny_models) as bot:
        await finished(fake, await edit(fake, alice, channel, png_bytes()))  # everything warmed up
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset this process's peak RSS (VmHWM) to what it uses now
        before = _status_mb("VmRSS")
        flood = [await edit(fake, user, channel, huge_png, f"huge{i}.png") for user in (alice, bob) for i in range(2)]
        results = [await finished(fake, inter) for inter in flood]
        peak = _status_mb("VmHWM") - before
        bound = 120 + 250 * bot.intake_slots.decodes
        assert peak < bound, f"peak memory rose {peak:.0f} MB for 4 huge PNGs; the bound is {bound} MB"
        # Decoded once and stored fitted to the engine's size: the worker reads that small PNG.
        job = await bot.store.job_by_message(results[0].id)
        with PIL.Image.open(bot.store.image_path(job.input_image)) as stored:
            assert stored.format == "PNG" and stored.size == (64, 48)
        assert results[0].attachments[0].width == 64
        # 16-bit samples were scaled, not clipped: the red ramp is not all white.
        with PIL.Image.open(bot.store.image_path(job.input_image)) as stored:
            reds = [stored.getpixel((x, 40))[0] for x in range(0, 64, 8)]
        assert min(reds) < 200


async def test_a_queued_job_holds_a_file_path_not_the_image(world, tmp_path, tiny_models, huge_png):
    fake, guild, channel, alice, *_ = world
    config = make_config(fake, tmp_path / "data", [guild.id])
    hold = threading.Event()
    async with bot_running(fake, config, tiny_models, delay_ready=hold) as bot:
        inter = await edit(fake, alice, channel, huge_png)
        await queued(fake, inter)
        # The queue's entries (JobQueue keeps them in its FairQueue) carry the stored input's path.
        [entry] = bot.queue._queue.order()  # noqa: SLF001 - looking, not touching
        assert isinstance(entry.job.image, str)
        with PIL.Image.open(entry.job.image) as stored:
            assert stored.size == (64, 48)
        hold.set()
        await finished(fake, inter)


# --- item 4: retention and forgetting -------------------------------------------------------------


def _told_privately(inter, text: str) -> bool:
    return any(m.ephemeral and text in (m.content or "") for m in inter.messages)


async def test_a_request_refused_for_a_full_queue_stores_nothing(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, carol = world
    config = make_config(fake, tmp_path / "data", [guild.id], max_queue=1)
    async with bot_running(fake, config, tiny_models) as bot:
        first = await finished(fake, await edit(fake, alice, channel, png_bytes()))
    kept = stored_files(config)
    hold = threading.Event()
    async with bot_running(fake, config, tiny_models, delay_ready=hold) as bot:
        waiting = await edit(fake, alice, channel, png_bytes(seed=1))  # fills the queue
        await queued(fake, waiting)
        refused = [await edit(fake, user, channel, png_bytes(seed=i)) for i, user in enumerate((bob, carol))]
        for inter in refused:  # refused at the check, before anything is deferred or stored: privately
            await fake.wait_for(lambda inter=inter: _told_privately(inter, "queue is full"), timeout=30)
        reroll = await fake.click(bob, first, button(first, "reroll"))
        await fake.wait_for(lambda: _told_privately(reroll, "queue is full"))
        reply = await fake.send_message(carol, channel, "now make it night", reply_to=first)
        await fake.wait_for(lambda: any(m.referenced and m.referenced.id == reply.id
                                        and "queue is full" in m.content for m in channel.messages))
        assert sum((await bot.store.counts_by_state()).values()) == 2  # the first edit and the waiting one
        job = (await bot.store.recent_jobs(alice.id))[0]
        assert stored_files(config) == sorted([*kept, f"{job.id}-in.png"])
        hold.set()
        await finished(fake, waiting)


async def test_status_shows_disk_use_and_the_start_sweeps_old_chains(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    config = make_config(fake, tmp_path / "data", [guild.id], retention_days=7, max_storage_gb=2)
    async with bot_running(fake, config, tiny_models) as bot:
        old = await bot.store.job_by_message((await finished(fake, await edit(fake, alice, channel,
                                                                              png_bytes()))).id)
        month_ago = time.time() - 30 * 86400
        await bot.store.update_job(old.id, created_at=month_ago, finished_at=month_ago)
        status = await fake.slash(alice, channel, "mgie status")
        await fake.wait_for(lambda: status.callbacks)
        fields = {f["name"]: f["value"] for f in status.callbacks[0].data["embeds"][0]["fields"]}
        assert "2 images + database" in fields["Storage"] and "limit 2 GB" in fields["Storage"]
        assert "kept 7 days" in fields["Storage"]
    async with bot_running(fake, config, tiny_models) as bot:  # a start sweeps at once
        await fake.wait_for(lambda: not stored_files(config), timeout=20)
        assert await bot.store.get_job(old.id) is None


async def test_forget_me_deletes_a_users_data_and_detaches_others(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, _ = world
    config = make_config(fake, tmp_path / "data", [guild.id])
    async with bot_running(fake, config, tiny_models) as bot:
        first = await finished(fake, await edit(fake, alice, channel, png_bytes()))
        a1 = await bot.store.job_by_message(first.id)
        b1_msg = await finished(fake, await fake.click(bob, first, button(first, "reroll")))
        b1 = await bot.store.job_by_message(b1_msg.id)
        opened = await fake.click(bob, first, button(first, "refine"))
        await fake.wait_for(lambda: opened.modal)
        b2_msg = await finished(fake, await fake.submit_modal(bob, opened, {"instruction": "now at night"}))
        b2 = await bot.store.job_by_message(b2_msg.id)
        opened = await fake.click(alice, b1_msg, button(b1_msg, "refine"))  # alice builds on bob's result
        await fake.wait_for(lambda: opened.modal)
        a2 = await bot.store.job_by_message((await finished(fake, await fake.submit_modal(
            alice, opened, {"instruction": "add snow"}))).id)
        assert (b1.input_image, b2.input_image, a2.input_image) == (a1.input_image, a1.output_image,
                                                                    b1.output_image)
        asked = await fake.slash(alice, channel, "mgie forget-me")
        await fake.wait_for(lambda: asked.original)
        await fake.click(alice, asked.original, f"mgie-forget:no:{alice.id}")
        await fake.wait_for(lambda: "Nothing was deleted" in asked.original.content)
        assert len(await bot.store.recent_jobs(alice.id)) == 2

    hold = threading.Event()  # the model "warms up": what is submitted now stays queued
    async with bot_running(fake, config, tiny_models, delay_ready=hold) as bot:
        a3 = await edit(fake, alice, channel, png_bytes(seed=3))
        await queued(fake, a3)
        b3 = await fake.click(bob, first, button(first, "closer"))  # bob's pending job on alice's upload
        await queued(fake, b3)

        asked = await fake.slash(alice, channel, "mgie forget-me")
        await fake.wait_for(lambda: asked.callbacks)
        confirm = asked.original
        assert asked.ephemeral and "3 edit(s)" in confirm.content and "can't be undone" in confirm.content
        done = await fake.click(alice, confirm, f"mgie-forget:yes:{alice.id}")
        await fake.wait_for(lambda: "Done" in (confirm.content or ""), timeout=60)
        assert not done.failed and "deleted 3 edit(s)" in confirm.content
        assert "Cancelled" in a3.original.content and "Cancelled" in b3.original.content

        assert await bot.store.recent_jobs(alice.id) == []
        for job in (a1, a2):
            assert not any(name.startswith(job.id) for name in stored_files(config))
        b1_now, b2_now = await bot.store.get_job(b1.id), await bot.store.get_job(b2.id)
        assert b1_now.input_image == "" and b2_now.input_image == "" and b2_now.parent_id is None
        assert [r.id for r in await bot.store.chain(b2.id)] == [b2.id]  # alice's instruction left its history
        for name in (b1.output_image, b2.output_image):  # bob's own results stay, the one alice read too
            assert (config.data_dir / name).is_file()
        b3_job = await bot.store.job_by_message(b3.original.id)
        assert b3_job.state == "cancelled" and b3_job.input_image == ""
        # A re-roll of bob's detached result says plainly why it can't run.
        again = await fake.click(bob, b1_msg, button(b1_msg, "reroll"))
        await fake.wait_for(lambda: again.callbacks)
        assert again.ephemeral and "no longer stored" in again.callbacks[0].data["content"]

        nothing = await fake.slash(alice, channel, "mgie forget-me")
        await fake.wait_for(lambda: nothing.callbacks)
        assert "don't store anything" in nothing.callbacks[0].data["content"]
        hold.set()


async def test_an_expired_token_is_removed_and_the_result_still_reaches_its_user(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    hold = threading.Event()
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models,
                           delay_ready=hold) as bot:
        inter = await edit(fake, alice, channel, png_bytes())
        await queued(fake, inter)
        fake.clock.advance(16 * 60)  # Discord no longer takes the token, and the bot's sweep drops it
        assert await bot.retention.clear_expired_tokens(now=time.time() + 16 * 60) == 1
        job = (await bot.store.recent_jobs(alice.id))[0]
        assert job.interaction_token is None and job.application_id
        hold.set()
        late = await fake.wait_for(lambda: next((m for m in channel.messages if m.attachments and not m.deleted
                                                 and m is not inter.original), None), timeout=60)
        assert f"<@{alice.id}>" in late.content
        assert int(late.message_reference["message_id"]) == inter.original.id and not inter.original.deleted
        # Still treated as an interaction's job (as before its token went): never edited as a channel message,
        # which fails where the bot can't see the channel (user-installed, DMs).
        assert not fake.requests_to("PATCH /channels/{channel_id}/messages/{message_id}")


# --- item 9: the event loop stays free ------------------------------------------------------------


async def test_auto_analysis_of_a_huge_image_never_stalls_the_event_loop(world, tmp_path, tiny_models,
                                                                         monkeypatch):
    fake, guild, channel, alice, *_ = world
    buf = io.BytesIO()
    PIL.Image.new("RGB", (7290, 5480), (40, 160, 90)).save(buf, "JPEG", quality=80)  # 40 MP
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    runs: list[tuple[int, float, float]] = []  # (thread, start, end) of each analysis
    measure = presets.edge_density

    def watched(image):
        start = time.monotonic()
        try:
            return measure(image)
        finally:
            runs.append((threading.get_ident(), start, time.monotonic()))

    monkeypatch.setattr(presets, "edge_density", watched)
    stalls: list[tuple[float, float]] = []  # (when the probe should have woken, how late it was)

    async def probe():
        while True:
            due = time.monotonic() + 0.005
            await asyncio.sleep(0.005)
            stalls.append((due, time.monotonic() - due))

    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models):
        prober = loop.create_task(probe())
        try:
            msg = await finished(fake, await edit(fake, alice, channel, buf.getvalue(), "huge.jpg", preset="auto"))
        finally:
            prober.cancel()
        assert "auto:" in {f["name"]: f["value"] for f in msg.embeds[0]["fields"]}["Why these values"]
    [(thread, start, end)] = runs
    assert thread != loop_thread
    during = [late for due, late in stalls if due <= end and due + late >= start]
    assert max(during, default=0.0) < 0.05


async def test_the_bots_background_tasks_are_tracked_and_cancelled_on_close(world, tmp_path, tiny_models):
    fake, guild, channel, alice, *_ = world
    seen: dict[str, asyncio.Task] = {}
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        seen.update((t.get_name(), t) for t in bot.background_tasks)  # those started with the bot
        spawn = bot.spawn

        def spawn_and_note(*args, **kwargs):  # a job event's task can start and end between two looks
            task = spawn(*args, **kwargs)
            seen[task.get_name()] = task
            return task

        bot.spawn = spawn_and_note
        inter = await edit(fake, alice, channel, png_bytes())
        await fake.wait_for(lambda: inter.original and inter.original.attachments, timeout=60)
        assert "mgie-retention" in seen and any(name.startswith("mgie-event-done") for name in seen)
        await fake.wait_for(lambda: not any(n.startswith("mgie-event") for n in map(asyncio.Task.get_name,
                                                                                   bot.background_tasks)))
        # Job events are handled by tracked tasks: none of the bot's tasks runs untracked.
        untracked = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.startswith("JobManager.")
                     and t not in bot.background_tasks]
        assert not untracked
    assert not bot.background_tasks and all(t.done() for t in seen.values())
    assert seen["mgie-retention"].cancelled()
