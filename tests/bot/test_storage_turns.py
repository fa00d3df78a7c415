"""The store on aiosqlite: writes take turns in the order asked and finish even if their caller is
cancelled; reads (on their own connection) see every write asked for before them."""

from __future__ import annotations

import asyncio

import pytest

from bot.storage import JobRecord, Store


def make_job(**overrides) -> JobRecord:
    values = dict(id="", user_id=1, channel_id=10, guild_id=100, instruction="make it snowy", seed=42,
                  text_cfg=7.5, image_cfg=1.5, steps=20)
    values.update(overrides)
    return JobRecord(**values)


async def test_a_write_whose_caller_is_cancelled_still_commits(tmp_path):
    async with await Store.open(tmp_path) as store:
        job = await store.create_job(make_job())
        caller = asyncio.create_task(store.update_job(job.id, state="done", expressive="a snowy street"))
        await asyncio.sleep(0)  # the write has its turn
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        stored = await store.get_job(job.id)  # a later turn: after the write, which went on
        assert (stored.state, stored.expressive) == ("done", "a snowy street")


async def test_a_read_asked_after_a_write_sees_it(tmp_path):
    async with await Store.open(tmp_path) as store:
        job = await store.create_job(make_job())
        write = asyncio.create_task(store.update_job(job.id, result_message_id=1234))
        await asyncio.sleep(0)
        read = asyncio.create_task(store.job_by_message(1234))
        assert (await read).id == job.id
        await write


async def test_many_concurrent_transactions_never_interleave(tmp_path):
    async with await Store.open(tmp_path) as store:
        jobs = [await store.create_job(make_job(user_id=u)) for u in range(5)]

        async def churn(job: JobRecord, n: int) -> None:
            for i in range(n):
                await store.update_job(job.id, steps=i + 1)
                assert len(await store.chain(job.id)) == 1
                await store.update_guild_settings(100 + job.user_id, max_steps=i + 1)

        await asyncio.gather(*(churn(j, 20) for j in jobs))
        assert [(await store.get_job(j.id)).steps for j in jobs] == [20] * 5
        assert await store.counts_by_state() == {"queued": 5, "running": 0, "done": 0, "failed": 0, "cancelled": 0}
