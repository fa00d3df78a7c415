"""Soak: 50 users through the fake Discord, a flood first, then 300 edits with faults along the way.

The flood: every user sends 10 /edits at once, one user right after the other (500 requests, three of
them 40 MP 16-bit PNGs) against a pending cap of 3: every request is answered (a result, a failure line
or a private refusal), nobody holds more than the cap, and everybody gets a place. Then each user edits 6 times, one after another, with
out-of-memory errors at random UNet steps (3% of calls, seeded), a dropped gateway, and a restart of the
bot in the middle. Printed and checked: jobs submitted, completed, failed with a message, refused, lost
(must be 0), the longest heartbeat gap, the slowest first acknowledgement (under 3 s) and memory growth.
"""

from __future__ import annotations

import asyncio
import random
import resource
import threading

import pytest
from bigimages import png_16bit_rgba
from botharness import bot_running, make_config, png_bytes
from faults import inject_faults

from bot import i18n

pytest_plugins = ["fakediscord.fixtures"]

USERS, EDITS_PER_USER, FLOOD_PER_USER, PENDING_CAP, HUGE_UPLOADS = 50, 6, 10, 3, 3


def _ended(inter) -> bool:
    """What a user sees as the end of their request: the result, a failure line, or a private answer."""
    original = inter.original
    if original is not None and (original.attachments or "couldn't finish" in (original.content or "")):
        return True
    return inter.failed or any(m.ephemeral for m in inter.messages)


def _outcome(inter) -> str:
    if inter.failed:
        return "lost"  # Discord's "The application did not respond"
    if inter.original and inter.original.attachments:
        return "done"
    if inter.original and not inter.original.ephemeral and "couldn't finish" in (inter.original.content or ""):
        return "failed with message"
    return "refused"  # privately: a refusal at the check, or a failure told after a defer


RESTARTING = i18n.text("errors.restarting")


def _private_texts(inter) -> list[str]:
    return [m.content for m in inter.messages if m.ephemeral]  # the original response, then the follow-ups


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.slow
async def test_soak(fake_endpoints, tmp_path, tiny_models):
    fake = fake_endpoints
    guild = fake.add_guild("Soak")
    channel = fake.add_channel(guild, "edits")
    users = [fake.add_user(f"user{i}") for i in range(USERS)]
    for user in users:
        fake.add_member(guild, user)
    config = make_config(fake, tmp_path / "data", [guild.id], user_jobs_per_minute=0, max_queue=500)
    rng = random.Random(1234)
    lock = threading.Lock()

    injected = []

    def random_oom(stage, job_ids):
        if stage in ("step", "retry"):
            with lock:
                hit = rng.random() < 0.03
            if hit:
                injected.append(stage)
                raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")

    images = [png_bytes(32 + 8 * (i % 3), 32, i) for i in range(8)]
    huge = png_16bit_rgba()
    interactions, outcomes, restart_refusals = [], {}, []
    online = asyncio.Event()
    online.set()
    finished = 0

    async def settle(inter) -> str:
        try:
            await fake.wait_for(lambda: _ended(inter), timeout=300)
        except TimeoutError:
            return "lost"
        return _outcome(inter)

    async def flood_request(index: int, user, n: int):
        data = huge if index * FLOOD_PER_USER + n < HUGE_UPLOADS else images[(index + n) % len(images)]
        att = fake.upload_user_attachment(channel, "flood.png", data)
        return user, await fake.slash(user, channel, "edit", {"image": att, "instruction": f"flood {n} of "
                                                                                           f"{user.username}",
                                                             "steps": 2, "seed": n})

    async def user_loop(index: int, user) -> None:
        nonlocal finished
        n = 0
        while n < EDITS_PER_USER:
            await online.wait()
            att = fake.upload_user_attachment(channel, "in.png", images[(index + n) % len(images)])
            inter = await fake.slash(user, channel, "edit", {"image": att, "instruction": f"edit {n} of {user.username}",
                                                            "steps": 2, "seed": index * 100 + n})
            outcome = await settle(inter)
            if outcome == "refused" and _private_texts(inter) == [RESTARTING]:
                # Sent while the bot was shutting down: told to retry, as a user would (nothing was stored).
                restart_refusals.append(inter)
                await asyncio.sleep(0.5)
                continue
            interactions.append(inter)
            outcomes[inter.id] = outcome
            finished += 1
            n += 1

    rss_before = None
    async with bot_running(fake, config, tiny_models) as bot:
        inject_faults(bot.engine.workers[0], random_oom)
        await bot.store.update_guild_settings(guild.id, user_pending_cap=PENDING_CAP)
        rss_before = _rss_mib()
        peak_pending: dict[int, int] = {}

        def watch_caps() -> None:
            for user in users:
                peak_pending[user.id] = max(peak_pending.get(user.id, 0), bot.queue.pending_for(user.id))

        watcher = asyncio.create_task(_every(0.01, watch_caps))
        # Each user fires ten at once, one user right after the other (as in test_bot_admission.py).
        sent = [await flood_request(i, u, n) for i, u in enumerate(users) for n in range(FLOOD_PER_USER)]
        flood = await asyncio.gather(*(settle(inter) for _, inter in sent))
        watcher.cancel()
        accepted = {u.id: 0 for u in users}
        for (user, inter), outcome in zip(sent, flood, strict=True):
            interactions.append(inter)
            outcomes[inter.id] = outcome
            accepted[user.id] += outcome != "refused"
        tasks = [asyncio.create_task(user_loop(i, u)) for i, u in enumerate(users)]
        await fake.wait_for(lambda: finished >= 100, timeout=300)
        await fake.drop_gateway(code=None)
        await fake.wait_for(lambda: finished >= 200, timeout=300)
        online.clear()  # users pause while the bot restarts (a real outage: Discord shows it offline)
        await asyncio.sleep(0.5)
    async with bot_running(fake, config, tiny_models) as bot:
        inject_faults(bot.engine.workers[0], random_oom)
        online.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=600)
        counts = await bot.store.counts_by_state()
    rss_after = _rss_mib()

    submitted = len(interactions)
    done = sum(v == "done" for v in outcomes.values())
    failed = sum(v == "failed with message" for v in outcomes.values())
    refused = sum(v == "refused" for v in outcomes.values())
    lost = sum(v == "lost" for v in outcomes.values())
    max_ack = max(i.ack_delay for i in interactions if i.ack_delay is not None)
    report = (f"soak: submitted {submitted}, completed {done}, failed with a message {failed}, refused {refused}, "
              f"lost {lost}, flood places per user {min(accepted.values())}-{max(accepted.values())}, "
              f"max heartbeat gap {fake.max_heartbeat_gap():.2f} s, max first acknowledgement {max_ack:.2f} s, "
              f"memory {rss_before:.0f} -> {rss_after:.0f} MiB, {len(injected)} OOMs injected, store {counts}, "
              f"{len(restart_refusals)} sent during the restart and retried")
    print(report)
    assert submitted == USERS * (EDITS_PER_USER + FLOOD_PER_USER)
    assert injected and fake.gateway.resume_count >= 1  # the faults did happen
    assert lost == 0 and done + failed + refused == submitted
    # The flood: nobody above the cap, everybody in; after it, one edit at a time is never refused.
    assert max(peak_pending.values()) <= PENDING_CAP
    assert min(accepted.values()) >= 1 and max(accepted.values()) <= PENDING_CAP
    flood_ids = {inter.id for _, inter in sent}
    odd = [_private_texts(i) for i in interactions if i.id not in flood_ids and outcomes[i.id] == "refused"]
    assert refused == USERS * FLOOD_PER_USER - sum(accepted.values()), f"one-at-a-time edits refused: {odd}"
    assert max_ack < 3.0
    assert counts["queued"] == 0 and counts["running"] == 0
    assert rss_after - rss_before < 600


async def _every(seconds: float, check) -> None:
    while True:
        check()
        await asyncio.sleep(seconds)
