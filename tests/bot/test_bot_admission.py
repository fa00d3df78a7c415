"""Caps under concurrency, end to end: a request counts toward its user's limits from the moment it is
accepted, through every entry point (slash, buttons, modals, replies, context menu), and the global queue
cap is shared so that early users cannot take every place.
"""

from __future__ import annotations

import errno
import threading
from collections import Counter

import pytest
from botharness import bot_running, button, make_config, png_bytes, team_world
from fakediscord import permissions as perms
from faults import inject_faults

from bot.admission import Ticket, fair_share_allows
from bot.intake import JobRateLimiter
from bot.queue import JobQueue
from mgie_engine.protocol import EditJob

pytest_plugins = ["fakediscord.fixtures"]


@pytest.fixture()
def world(fake_endpoints):
    return team_world(fake_endpoints, "owner", perms.MANAGE_GUILD)


async def edit(fake, user, channel, instruction="make the sky a sunset"):
    att = fake.upload_user_attachment(channel, "cat.png", png_bytes())
    return await fake.slash(user, channel, "edit", {"image": att, "instruction": instruction, "steps": 3,
                                                    "preset": "balanced"})


def outcome(inter) -> str | None:
    """'refused' (only the user saw why), 'accepted' (a public status line), or None while unanswered."""
    if inter.failed:
        return "failed"
    private = [m for m in inter.messages if m.ephemeral and not m.deleted]
    if private:
        return "refused"
    original = inter.original
    if original is not None and not original.deleted and not original.loading:
        return "accepted"
    return None


def private_text(inter) -> str:
    return next(m.content for m in inter.messages if m.ephemeral and not m.deleted)


def hold_steps(gate: threading.Event):
    """A worker fault hook that keeps the running job at its first step until ``gate`` is set."""
    def hook(stage, job_ids):
        if stage == "step":
            gate.wait(60)
    return hook


async def unfinished_of(bot, user) -> int:
    return sum(j.state in ("queued", "running") for j in await bot.store.recent_jobs(user.id, 50))


async def test_pending_cap_holds_for_concurrent_requests_through_every_entry_point(world, tmp_path, tiny_models):
    fake, guild, channel, alice, bob, _ = world
    gate = threading.Event()
    async with bot_running(fake, make_config(fake, tmp_path / "data", [guild.id]), tiny_models) as bot:
        first = await fake.wait_for_original(await edit(fake, alice, channel), lambda m: m.attachments, timeout=60)
        att = fake.upload_user_attachment(channel, "dog.png", png_bytes(48, 48, 3))
        post = await fake.send_message(alice, channel, "look at this", attachments=[att])
        await bot.store.update_guild_settings(guild.id, user_pending_cap=1)
        inject_faults(bot.engine.workers[0], hold_steps(gate))
        try:
            # Five quick /edits from one user: one is taken, four are refused privately.
            burst = [await edit(fake, bob, channel, f"bob edit {i}") for i in range(5)]
            await fake.wait_for(lambda: all(outcome(i) for i in burst), timeout=30)
            assert Counter(outcome(i) for i in burst) == {"accepted": 1, "refused": 4}
            assert all("limit here is 1" in private_text(i) for i in burst if outcome(i) == "refused")
            assert await unfinished_of(bot, bob) == bot.queue.pending_for(bob.id) == 1

            # Every other way to start a job, all at once: re-roll, stronger, closer, the refine modal, the
            # context menu's modal and a reply. Only one of them gets the single place.
            refine = await fake.click(alice, first, button(first, "refine"))
            menu = await fake.context_menu(alice, post, "Edit image with MGIE")
            await fake.wait_for(lambda: refine.modal and menu.modal)
            entries = [await fake.click(alice, first, button(first, action))
                       for action in ("reroll", "stronger", "closer")]
            entries.append(await fake.submit_modal(alice, refine, {"instruction": "now make it night"}))
            entries.append(await fake.submit_modal(alice, menu, {"instruction": "give him a hat"}))
            asked = await fake.send_message(alice, channel, "now make it snowy", reply_to=first)

            def reply_answer():
                return next((m for m in channel.messages if m.referenced and m.referenced.id == asked.id), None)

            await fake.wait_for(lambda: all(outcome(i) for i in entries) and reply_answer(), timeout=30)
            reply_refused = "limit here is 1" in reply_answer().content
            outcomes = Counter(outcome(i) for i in entries) + Counter({"refused" if reply_refused else "accepted": 1})
            assert outcomes == {"accepted": 1, "refused": 5}
            assert await unfinished_of(bot, alice) == bot.queue.pending_for(alice.id) == 1
        finally:
            gate.set()


async def test_a_request_that_fails_after_its_check_gives_its_place_and_rate_limit_back(world, tmp_path,
                                                                                         tiny_models):
    fake, guild, channel, alice, *_ = world
    config = make_config(fake, tmp_path / "data", [guild.id], user_jobs_per_minute=2)
    async with bot_running(fake, config, tiny_models) as bot:
        await bot.store.update_guild_settings(guild.id, user_pending_cap=1)
        real_save = bot.store.save_image
        full = {"on": True}

        async def save_image(job_id, kind, data, ext="png"):
            if full["on"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return await real_save(job_id, kind, data, ext)

        bot.store.save_image = save_image
        for n in range(2):  # accepted, then lost to the full disk: neither may count against alice
            failed = await edit(fake, alice, channel, f"attempt {n}")
            await fake.wait_for(lambda failed=failed: outcome(failed), timeout=30)
        assert bot.queue.pending_for(alice.id) == 0
        full["on"] = False
        third = await edit(fake, alice, channel, "this one works")
        done = await fake.wait_for_original(third, lambda m: m.attachments, timeout=60)
        assert done.attachments and not third.ephemeral


async def test_fifty_users_sending_ten_requests_at_once_share_the_queue(fake_endpoints, tmp_path, tiny_models):
    fake = fake_endpoints
    guild = fake.add_guild("Crowd")
    channel = fake.add_channel(guild, "edits")
    users = [fake.add_user(f"user{i}") for i in range(50)]
    for user in users:
        fake.add_member(guild, user)
    hold = threading.Event()  # the model "warms up" all along: every accepted job stays in the queue
    config = make_config(fake, tmp_path / "data", [guild.id], max_queue=100)
    try:
        async with bot_running(fake, config, tiny_models, delay_ready=hold) as bot:
            cap = (await bot.store.guild_settings(guild.id)).user_pending_cap
            requests: dict[int, list] = {user.id: [] for user in users}
            for user in users:  # each user fires ten at once, one user right after the other
                for n in range(10):
                    requests[user.id].append(await edit(fake, user, channel, f"edit {n}"))
            everything = [i for mine in requests.values() for i in mine]
            await fake.wait_for(lambda: all(outcome(i) for i in everything), timeout=120)

            assert not any(i.failed for i in everything)
            assert max(i.ack_delay for i in everything) < 3.0
            accepted = {uid: sum(outcome(i) == "accepted" for i in mine) for uid, mine in requests.items()}
            assert all(1 <= n <= cap for n in accepted.values()), accepted  # nobody above the cap, nobody left out
            assert sum(accepted.values()) == bot.queue.depth <= config.max_queue
            for user in users:
                assert bot.queue.pending_for(user.id) == accepted[user.id]
            counts = await bot.store.counts_by_state()
            assert counts["queued"] == bot.queue.depth and counts["failed"] == 0
    finally:
        hold.set()


# --- units: the fair-share rule and tickets ---------------------------------------------------------


@pytest.mark.parametrize("taken, nth, allowed", [
    (99, 1, True), (100, 1, False),  # a first job takes any free place
    (49, 2, True), (50, 2, False),  # a second one only in the first half
    (33, 3, True), (34, 3, False),
    (9, 10, True), (10, 11, False),  # one user alone (taken = n - 1): at most 10 of 100
])
def test_fair_share_rule(taken, nth, allowed):
    assert fair_share_allows(taken, 100, nth) is allowed


def test_a_ticket_holds_a_place_and_a_start_until_consumed_or_released():
    queue = JobQueue([], on_event=lambda event: None, max_total=10)
    limiter = JobRateLimiter(2, clock=lambda: 5.0)
    kept, given_back = Ticket(queue, limiter, 7), Ticket(queue, limiter, 7)
    assert queue.pending_for(7) == 2 and queue.taken == 2 and limiter.retry_after(7) > 0
    given_back.release()
    given_back.release()  # only the first call counts
    assert queue.pending_for(7) == 1 and limiter.retry_after(7) == 0  # the failed request cost nothing
    job = EditJob(job_id="a" * 32, image=b"", instruction="x", seed=1, text_cfg=7.5, image_cfg=1.5, steps=3)
    queue.submit(job, 7, reserved=True)
    kept.consume()
    kept.release()  # after consume: nothing to give back
    assert queue.pending_for(7) == 1 and queue.taken == 1  # the queue entry holds the place now
    Ticket(queue, limiter, 7)
    assert limiter.retry_after(7) > 0  # the queued job's start still counts
