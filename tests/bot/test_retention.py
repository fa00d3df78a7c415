"""Retention on a real store: whole chains by age and by size, never a pending one, orphans, tokens."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from bot.config import BotConfig, ConfigError
from bot.retention import Retention, file_owner
from bot.storage import JobRecord, Store

DAY = 86400.0
NOW = time.time()


@pytest.fixture
async def store(tmp_path):
    s = await Store.open(tmp_path / "data")
    yield s
    await s.close()


async def job(store: Store, age_days: float, *, size: int = 1000, parent: JobRecord | None = None,
              reuse_input_of: JobRecord | None = None, state: str = "done", **fields) -> JobRecord:
    """A job ``age_days`` old with an input (its own, its parent's output or a re-rolled source's) and,
    when done, an output of ``size`` bytes."""
    job_id = uuid.uuid4().hex
    when = NOW - age_days * DAY
    if parent is not None:
        source = parent.output_image
    elif reuse_input_of is not None:
        source = reuse_input_of.input_image
    else:
        source = await store.save_image(job_id, "in", b"i" * size)
    output = await store.save_image(job_id, "out", b"o" * size) if state == "done" else None
    record = JobRecord(id=job_id, user_id=fields.pop("user_id", 1), channel_id=10, guild_id=100,
                       instruction="make it snowy", seed=1, text_cfg=7.5, image_cfg=1.5, steps=20, state=state,
                       parent_id=(parent or reuse_input_of).id if (parent or reuse_input_of) else None,
                       input_image=source, output_image=output, created_at=when,
                       finished_at=when if state not in ("queued", "running") else None, **fields)
    return await store.create_job(record)


def files(store: Store) -> set[str]:
    return {p.name for p in store.images_dir.iterdir()}


async def test_old_chains_go_whole_and_recent_or_pending_ones_stay(store):
    retention = Retention(store, days=30, max_gb=0)
    old = await job(store, 60)
    old_refine = await job(store, 50, parent=old)
    old_reroll = await job(store, 45, reuse_input_of=old)
    kept = await job(store, 60)
    kept_refine = await job(store, 1, parent=kept)  # refined yesterday: the whole chain is still in use
    waiting = await job(store, 90)
    waiting_refine = await job(store, 80, parent=waiting, state="queued")  # never delete under a pending job
    failed = await job(store, 40, state="failed")

    report = await retention.sweep(now=NOW)

    for gone in (old, old_refine, old_reroll, failed):
        assert await store.get_job(gone.id) is None
        assert not any(name.startswith(gone.id) for name in files(store))
    for stays in (kept, kept_refine, waiting, waiting_refine):
        assert await store.get_job(stays.id) is not None
    assert (store.data_dir / waiting_refine.input_image).is_file()
    assert report.jobs == 4 and report.files == 5  # old in+out, refine out, reroll out, failed in


async def test_over_the_size_cap_the_oldest_chains_go_first(store):
    oldest = await job(store, 3, size=50_000)
    middle = await job(store, 2, size=50_000)
    newest = await job(store, 1, size=50_000)
    pending = await job(store, 9, size=50_000, state="running")
    used = (await Retention(store).disk_use()).total
    retention = Retention(store, days=0, max_gb=(used - 150_000) / 2**30)  # two 100 kB chains must go
    await retention.sweep(now=NOW)
    assert await store.get_job(oldest.id) is None and await store.get_job(middle.id) is None
    assert await store.get_job(newest.id) is not None and await store.get_job(pending.id) is not None
    assert (await retention.disk_use()).total <= retention.max_bytes


async def test_orphan_files_go_once_old_enough(store):
    retention = Retention(store, days=30, max_gb=0)
    stale = store.images_dir / f"{uuid.uuid4().hex}-in.png"
    fresh = store.images_dir / f"{uuid.uuid4().hex}-in.png"
    for path in (stale, fresh):
        path.write_bytes(b"x")
    os.utime(stale, (NOW - 7200, NOW - 7200))  # a refused request of old code left it behind
    await retention.sweep(now=NOW)
    assert not stale.exists() and fresh.exists()  # a fresh one may be a job being stored right now


async def test_expired_interaction_tokens_are_removed(store):
    retention = Retention(store)
    stale = await job(store, 0, interaction_token="old-token", application_id=5, token_created_at=NOW - 16 * 60)
    live = await job(store, 0, interaction_token="new-token", application_id=5, token_created_at=NOW - 60)
    assert await retention.clear_expired_tokens(now=NOW) == 1
    stale, live = await store.get_job(stale.id), await store.get_job(live.id)
    assert stale.interaction_token is None and stale.application_id == 5  # still known as an interaction job
    assert live.interaction_token == "new-token"


async def test_forgetting_a_user_waits_for_pending_jobs_and_keeps_others_results(store):
    retention = Retention(store)
    mine = await job(store, 1, user_id=7)
    theirs = await job(store, 1, parent=mine, user_id=8)
    waiting = await job(store, 0, user_id=7, state="queued")
    assert await retention.pending_for_forget(7) == [waiting.id]
    assert await retention.forget_user(7) == [waiting.id]  # nothing deleted while one is pending
    await store.update_job(waiting.id, state="cancelled")
    report = await retention.forget_user(7)
    assert (report.jobs, report.files, report.detached) == (2, 3, 1)
    after = await store.get_job(theirs.id)
    assert after.parent_id is None and after.input_image == "" and (store.data_dir / after.output_image).is_file()
    assert files(store) == {after.output_image.split("/")[1]}


def test_file_owner():
    assert file_owner("images/abc-in.png") == "abc"
    assert file_owner("elsewhere/abc-in.png") is None and file_owner("") is None


def test_retention_settings():
    base = {"DISCORD_TOKEN": "t"}
    config = BotConfig.from_env(base)
    assert (config.retention_days, config.max_storage_gb) == (30.0, 10.0)
    config = BotConfig.from_env({**base, "MGIE_RETENTION_DAYS": "0", "MGIE_MAX_STORAGE_GB": "0.5"})
    assert (config.retention_days, config.max_storage_gb) == (0.0, 0.5)
    with pytest.raises(ConfigError, match="MGIE_MAX_STORAGE_GB"):
        BotConfig.from_env({**base, "MGIE_MAX_STORAGE_GB": "lots"})
    with pytest.raises(ConfigError, match="MGIE_RETENTION_DAYS"):
        BotConfig.from_env({**base, "MGIE_RETENTION_DAYS": "-1"})
