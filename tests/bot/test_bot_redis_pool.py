"""The bot with MGIE_REDIS_URL and two `mgie-worker` processes, all real processes, through the fake Discord:
several users' edits in fair order, a worker or Redis SIGKILLed, a job that kills its workers, a bot restart,
buttons and reply-refines across workers."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3

import pytest
from botharness import basic_world, button, png_bytes
from redis_pool_harness import owner_of, pid_of, pool_env, start_bot, start_worker, wait_workers

pytest_plugins = ["fakediscord.fixtures", "redis_server"]


@pytest.fixture()
def world(fake_discord):
    return basic_world(fake_discord)


class Pool:
    """The processes of one test; all stopped at the end, their output checked for the password."""

    def __init__(self, env, fake, guild, data_dir, password) -> None:
        self.env, self.fake, self.guild, self.data_dir, self.password = env, fake, guild, data_dir, password
        self.procs, self.bot, self.workers = [], None, []

    async def start_bot(self):
        self.bot = await start_bot(self.env, self.fake, self.guild, self.data_dir)
        self.procs.append(self.bot)
        return self.bot

    async def start_worker(self):
        worker = await start_worker(self.env, name=f"worker{len(self.workers)}")
        self.workers.append(worker)
        self.procs.append(worker)
        return worker

    def states(self) -> dict[str, str]:
        with sqlite3.connect(self.data_dir / "mgie.sqlite3") as conn:
            return dict(conn.execute("SELECT instruction, state FROM jobs"))

    def output(self) -> str:
        return "".join(p.text for p in self.procs)


@pytest.fixture()
async def pool(world, redis_server, tiny_paths, tmp_path):
    fake, guild, *_ = world
    p = Pool(pool_env(redis_server, tiny_paths, MGIE_MAX_BATCH="1"), fake, guild, tmp_path / "data",
             redis_server.password)
    yield p
    await asyncio.gather(*(proc.stop(timeout=20) for proc in p.procs))  # side by side: each takes seconds
    for proc in p.procs:  # shown by pytest when the test failed
        print(f"----- {proc.name} -----\n{proc.text[-5000:]}")
    assert p.password not in p.output()
    assert "Traceback" not in p.output(), p.output()[-4000:]


async def edit(fake, user, channel, instruction: str, steps: int = 6, size: int = 96):
    att = fake.upload_user_attachment(channel, "in.png", png_bytes(size, size))
    return await fake.slash(user, channel, "edit", {"image": att, "instruction": instruction, "steps": steps})


async def queued_edit(fake, user, channel, instruction: str, steps: int = 6):
    """``/edit``, returned once its job is in the bot's queue (its status message quotes the instruction)."""
    inter = await edit(fake, user, channel, instruction, steps=steps)
    await fake.wait_for(lambda: inter.original and f"> {instruction}" in (inter.original.content or ""), timeout=60)
    return inter


async def delivered(fake, inter, timeout: float = 90.0):
    return await fake.wait_for_original(inter, lambda m: m.attachments, timeout=timeout)


def posts_with_files(fake, inter) -> int:
    return sum(1 for r in fake.requests if r.files and inter.token in r.path)


async def test_several_users_edits_in_fair_order_and_buttons_and_replies_across_workers(world, pool, proto):
    fake, guild, channel, alice = world
    bob, carol = fake.add_user("bob"), fake.add_user("carol")
    fake.add_member(guild, bob)
    fake.add_member(guild, carol)
    await pool.start_bot()
    # Every edit is queued before any worker exists, one after the other (so their order in SQLite is known).
    mine = [await queued_edit(fake, alice, channel, f"alice {i}", steps=30) for i in range(3)]  # the per-user cap
    others = [await queued_edit(fake, user, channel, f"{user.username} 0", steps=30) for user in (bob, carol)]
    assert await proto.redis.xlen(proto.keys.jobs) == 0  # no capacity, nothing released
    await pool.start_worker()
    await pool.start_worker()
    for inter in mine + others:
        await delivered(fake, inter)
        assert posts_with_files(fake, inter) == 1
    with sqlite3.connect(pool.data_dir / "mgie.sqlite3") as conn:
        order = [row[0] for row in conn.execute("SELECT instruction FROM jobs ORDER BY started_at, rowid")]
    # Released only up to the workers' free slots, so the fair queue's round robin decides who starts when.
    assert order == ["alice 0", "bob 0", "carol 0", "alice 1", "alice 2"], order
    first = (await delivered(fake, mine[0]))
    reroll = await fake.click(bob, first, button(first, "reroll"))
    await fake.send_message(alice, channel, "add some stars", reply_to=first)
    rerolled = await fake.wait_for_original(reroll, lambda m: m.attachments, timeout=90)
    reply = await fake.wait_for(lambda: next((m for m in channel.messages if m.attachments and m.embeds and
                                              "add some stars" in (m.embeds[0].get("title") or "")), None), timeout=90)
    undo = await fake.click(alice, reply, button(reply, "undo"))
    assert rerolled.attachments and reply.attachments and not undo.failed
    assert all(" done" in w.text for w in pool.workers)  # both workers ran some of it


async def test_a_worker_sigkilled_mid_job_its_job_finishes_on_the_other_posted_once(world, pool, proto):
    fake, guild, channel, alice = world
    await pool.start_bot()
    await pool.start_worker()
    await pool.start_worker()
    await wait_workers(proto, 2)
    inter = await edit(fake, alice, channel, "slow one", steps=100, size=128)
    await fake.wait_for(lambda: inter.original and "Painting" in (inter.original.content or ""), timeout=60)
    job_id = _job_ids(pool)[0]
    os.kill(pid_of(await owner_of(proto, job_id)), signal.SIGKILL)
    await delivered(fake, inter, timeout=120)
    await asyncio.sleep(1.0)
    assert posts_with_files(fake, inter) == 1
    assert pool.states() == {"slow one": "done"}
    assert "taken over (delivery 2)" in pool.output()


async def test_redis_sigkilled_and_restarted_every_job_is_delivered(world, pool, proto, redis_server):
    fake, guild, channel, alice = world
    bob = fake.add_user("bob")
    fake.add_member(guild, bob)
    await pool.start_bot()
    await pool.start_worker()
    await pool.start_worker()
    await wait_workers(proto, 2)
    inters = [await edit(fake, user, channel, f"{user.username} {i}", steps=40)
              for i in range(3) for user in (alice, bob)]
    await fake.wait_for(lambda: sum(1 for i in inters if i.original and "Painting" in (i.original.content or ""))
                        >= 1, timeout=60)
    redis_server.kill()
    await asyncio.sleep(2.0)
    redis_server.start()
    for inter in inters:
        await delivered(fake, inter, timeout=150)
        assert posts_with_files(fake, inter) == 1
    assert set(pool.states().values()) == {"done"}


async def test_a_job_that_kills_its_worker_three_times_is_dead_lettered_and_the_queue_goes_on(world, pool, proto):
    fake, guild, channel, alice = world
    bob = fake.add_user("bob")
    fake.add_member(guild, bob)
    await pool.start_bot()
    await pool.start_worker()
    await pool.start_worker()
    await wait_workers(proto, 2)
    deadly = await edit(fake, alice, channel, "deadly", steps=100, size=128)
    await fake.wait_for(lambda: pool.states().get("deadly") == "running", timeout=60)
    job_id = _job_ids(pool)[0]
    killed = set()
    for _ in range(3):
        owner = await owner_of_new(proto, job_id, killed)
        os.kill(pid_of(owner), signal.SIGKILL)
        killed.add(owner)
        await pool.start_worker()  # the host's supervisor would restart it
    text = await fake.wait_for(lambda: deadly.original and "set aside" in (deadly.original.content or "") and
                               deadly.original.content, timeout=90)
    assert "3 times" in text
    assert pool.states()["deadly"] == "failed"
    fine = await edit(fake, bob, channel, "fine")
    await delivered(fake, fine)
    [dead] = await proto.redis.xrange(proto.keys.dead)
    assert dead[1][b"id"].decode() == job_id


async def test_the_bot_restarted_while_workers_run_results_still_reach_their_users(world, pool, proto):
    fake, guild, channel, alice = world
    bot = await pool.start_bot()
    await pool.start_worker()
    await pool.start_worker()
    await wait_workers(proto, 2)
    running = await edit(fake, alice, channel, "while away", steps=100, size=128)
    waiting = await edit(fake, alice, channel, "queued too", steps=10)
    await fake.wait_for(lambda: running.original and "Painting" in (running.original.content or ""), timeout=60)
    bot.kill()
    await bot.stop()
    await pool.start_bot()
    await delivered(fake, running, timeout=120)
    await delivered(fake, waiting, timeout=120)
    assert posts_with_files(fake, running) == 1 and posts_with_files(fake, waiting) == 1
    assert set(pool.states().values()) == {"done"}


def _job_ids(pool) -> list[str]:
    with sqlite3.connect(pool.data_dir / "mgie.sqlite3") as conn:
        return [row[0] for row in conn.execute("SELECT id FROM jobs ORDER BY created_at")]


async def owner_of_new(proto, job_id: str, not_these: set[str], timeout: float = 90.0) -> str:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        owner = await owner_of(proto, job_id, timeout=timeout)
        if owner not in not_these:
            return owner
        await asyncio.sleep(0.05)
    raise AssertionError("the job was not taken over")
