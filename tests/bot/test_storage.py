"""Tests for bot.storage: jobs, settings, images, migrations and crash safety, on real SQLite files."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bot import storage
from bot.storage import (
    DB_FILENAME,
    JOB_STATES,
    GuildSettings,
    JobRecord,
    MigrationError,
    SchemaTooNewError,
    Store,
    apply_migrations,
    load_migrations,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_job(**overrides) -> JobRecord:
    values = dict(id="", user_id=1, channel_id=10, guild_id=100, instruction="make it snowy", seed=42,
                  text_cfg=7.5, image_cfg=1.5, steps=20)
    values.update(overrides)
    return JobRecord(**values)


@pytest.fixture
async def store(tmp_path):
    s = await Store.open(tmp_path / "data")
    yield s
    await s.close()


# --- jobs -------------------------------------------------------------------------------------------


async def test_job_round_trip_all_fields(store):
    full = JobRecord(
        id="a" * 32, user_id=2**62, channel_id=11, guild_id=None, instruction="add fireworks ✨", seed=2**31 + 5,
        text_cfg=6.25, image_cfg=1.75, steps=37, preset="auto", preset_reason="small object edit",
        kind="refine", parent_id="b" * 32, input_image="images/x-in.png", output_image="images/x-out.png",
        expressive="A night sky with fireworks.", error="boom", state="failed", created_at=1000.5,
        started_at=1001.25, finished_at=1010.75, application_id=555, interaction_token="tok.en",
        token_created_at=1000.0, status_message_id=777, result_message_id=888, reply_to_message_id=999,
        history_depth=2, llm_cached=True, flagged=True, locale="ja",
    )
    # Every field differs from its default, so a dropped column would show up.
    for field in dataclasses.fields(JobRecord):
        if field.default is not dataclasses.MISSING:
            assert getattr(full, field.name) != field.default, field.name
    assert await store.create_job(full) == full
    loaded = await store.get_job(full.id)
    assert loaded == full
    assert isinstance(loaded.llm_cached, bool) and isinstance(loaded.flagged, bool)
    assert await store.get_job("missing") is None


async def test_create_job_fills_id_and_created_at_without_mutating(store):
    job = make_job()
    before = time.time()
    created = await store.create_job(job)
    assert job.id == "" and job.created_at == 0.0
    assert len(created.id) == 32 and int(created.id, 16) >= 0
    assert before <= created.created_at <= time.time()
    assert await store.get_job(created.id) == created
    assert created.state == "queued" and created.llm_cached is False


async def test_create_job_rejects_duplicates_and_bad_state(store):
    job = await store.create_job(make_job())
    with pytest.raises(ValueError, match="already exists"):
        await store.create_job(job)
    with pytest.raises(ValueError, match="state"):
        await store.create_job(make_job(state="paused"))


async def test_update_job(store):
    job = await store.create_job(make_job())
    updated = await store.update_job(job.id, state="running", started_at=5.0, llm_cached=True, status_message_id=3)
    assert updated == dataclasses.replace(job, state="running", started_at=5.0, llm_cached=True,
                                          status_message_id=3)
    assert await store.get_job(job.id) == updated
    for state in JOB_STATES:
        assert (await store.update_job(job.id, state=state)).state == state
    with pytest.raises(ValueError, match="state"):
        await store.update_job(job.id, state="exploded")
    with pytest.raises(ValueError, match="nonsense"):
        await store.update_job(job.id, nonsense=1)
    with pytest.raises(ValueError, match="id"):
        await store.update_job(job.id, id="other")
    with pytest.raises(KeyError):
        await store.update_job("missing", state="done")
    assert await store.update_job(job.id) == await store.get_job(job.id)  # no fields: just reads


async def test_failed_update_changes_nothing(store):
    job = await store.create_job(make_job())
    with pytest.raises(sqlite3.IntegrityError):
        await store.update_job(job.id, steps=99, instruction=None)  # NOT NULL violated
    assert await store.get_job(job.id) == job


async def test_job_by_message_matches_result_and_status(store):
    a = await store.create_job(make_job(status_message_id=501, result_message_id=502))
    b = await store.create_job(make_job(status_message_id=601))
    assert (await store.job_by_message(502)).id == a.id
    assert (await store.job_by_message(501)).id == a.id
    assert (await store.job_by_message(601)).id == b.id
    assert await store.job_by_message(999) is None
    # A message that is one job's result and another's status resolves to the result holder.
    c = await store.create_job(make_job(result_message_id=601))
    assert (await store.job_by_message(601)).id == c.id


async def test_unfinished_jobs_oldest_first(store):
    ids = {}
    for i, state in enumerate(["running", "done", "queued", "failed", "cancelled", "queued"]):
        ids[i] = (await store.create_job(make_job(state=state, created_at=100.0 - i))).id
    unfinished = await store.unfinished_jobs()
    assert [j.id for j in unfinished] == [ids[5], ids[2], ids[0]]
    assert {j.state for j in unfinished} == {"queued", "running"}


async def test_pending_count(store):
    for state in JOB_STATES:
        await store.create_job(make_job(user_id=7, state=state))
    await store.create_job(make_job(user_id=7))
    await store.create_job(make_job(user_id=8))
    assert await store.pending_count(7) == 3  # queued, running, queued
    assert await store.pending_count(8) == 1
    assert await store.pending_count(9) == 0


async def test_chain(store):
    ids: list[str] = []
    parent = None
    for i in range(4):
        job = await store.create_job(make_job(kind="edit" if i == 0 else "refine", parent_id=parent,
                                              created_at=10.0 + i))
        ids.append(job.id)
        parent = job.id
    assert [j.id for j in await store.chain(ids[3])] == ids
    assert [j.id for j in await store.chain(ids[3], limit=2)] == ids[2:]
    assert [j.id for j in await store.chain(ids[1])] == ids[:2]
    assert [j.id for j in await store.chain(ids[0])] == ids[:1]
    assert await store.chain(ids[3], limit=0) == []
    assert await store.chain("missing") == []
    orphan = await store.create_job(make_job(parent_id="gone"))
    child = await store.create_job(make_job(parent_id=orphan.id))
    assert [j.id for j in await store.chain(child.id)] == [orphan.id, child.id]


async def test_chain_stops_on_cycle(store):
    a = await store.create_job(make_job(id="a"))
    await store.create_job(make_job(id="b", parent_id="a"))
    await store.update_job(a.id, parent_id="b")
    assert [j.id for j in await store.chain("b")] == ["a", "b"]


async def test_recent_jobs_newest_first(store):
    made = [await store.create_job(make_job(user_id=5, created_at=1.0 + i)) for i in range(5)]
    await store.create_job(make_job(user_id=6, created_at=99.0))
    assert [j.id for j in await store.recent_jobs(5)] == [j.id for j in reversed(made)]
    assert [j.id for j in await store.recent_jobs(5, limit=2)] == [made[4].id, made[3].id]
    assert await store.recent_jobs(5, limit=0) == []
    assert await store.recent_jobs(404) == []


async def test_average_duration(store):
    assert await store.average_duration() is None
    for i, duration in enumerate([100.0, 2.0, 4.0, 6.0]):
        await store.create_job(make_job(state="done", started_at=1000.0 * i, finished_at=1000.0 * i + duration))
    await store.create_job(make_job(state="failed", started_at=0.0, finished_at=500.0))
    await store.create_job(make_job(state="running", started_at=0.0))
    assert await store.average_duration() == pytest.approx(28.0)
    assert await store.average_duration(last_n=3) == pytest.approx(4.0)  # the oldest (100 s) drops out
    assert await store.average_duration(last_n=1) == pytest.approx(6.0)
    assert await store.average_duration(last_n=0) is None


async def test_counts_by_state(store):
    assert await store.counts_by_state() == dict.fromkeys(JOB_STATES, 0)
    for state in ["queued", "queued", "done", "failed"]:
        await store.create_job(make_job(state=state))
    assert await store.counts_by_state() == {"queued": 2, "running": 0, "done": 1, "failed": 1, "cancelled": 0}


async def test_concurrent_updates_all_land(store):
    jobs = await asyncio.gather(*(store.create_job(make_job(user_id=i)) for i in range(50)))
    assert len({j.id for j in jobs}) == 50
    await asyncio.gather(*(store.update_job(j.id, state="done", seed=i) for i, j in enumerate(jobs)))
    for i, job in enumerate(jobs):
        stored = await store.get_job(job.id)
        assert (stored.state, stored.seed) == ("done", i)
    # Many tasks writing different fields of one job: none overwrites another.
    target = jobs[0].id
    fields = [("steps", 77), ("status_message_id", 1), ("result_message_id", 2), ("reply_to_message_id", 3),
              ("expressive", "x"), ("error", "e"), ("history_depth", 4), ("llm_cached", True),
              ("started_at", 1.5), ("finished_at", 2.5), ("output_image", "images/o.png")]
    await asyncio.gather(*(store.update_job(target, **{k: v}) for k, v in fields))
    stored = await store.get_job(target)
    assert {k: getattr(stored, k) for k, _ in fields} == dict(fields)


# --- guild settings and block list ------------------------------------------------------------------


async def test_guild_settings_defaults(store):
    assert await store.guild_settings(123) == GuildSettings(guild_id=123, allowed_channel_ids=[])
    dm = await store.guild_settings(None)
    assert dm == GuildSettings(guild_id=None, allowed_channel_ids=[], max_steps=100, user_pending_cap=3,
                               refine_depth=3)


async def test_update_guild_settings(store):
    s = await store.update_guild_settings(123, max_steps=50, allowed_channel_ids=[5, 6, 5])
    assert s == GuildSettings(guild_id=123, allowed_channel_ids=[5, 6], max_steps=50)
    s = await store.update_guild_settings(123, user_pending_cap=20, refine_depth=0)
    assert s == GuildSettings(guild_id=123, allowed_channel_ids=[5, 6], max_steps=50, user_pending_cap=20,
                              refine_depth=0)
    assert await store.guild_settings(123) == s
    assert await store.guild_settings(124) == GuildSettings(guild_id=124, allowed_channel_ids=[])
    assert (await store.update_guild_settings(123, allowed_channel_ids=[])).allowed_channel_ids == []
    assert await store.update_guild_settings(123) == await store.guild_settings(123)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"max_steps": 0}, "Max steps must be a whole number from 1 to 200 (got 0)."),
        ({"max_steps": 201}, "Max steps must be a whole number from 1 to 200 (got 201)."),
        ({"max_steps": 2.5}, "Max steps must be a whole number from 1 to 200 (got 2.5)."),
        ({"max_steps": True}, "Max steps must be a whole number from 1 to 200 (got True)."),
        ({"user_pending_cap": 0}, "Pending jobs per user must be a whole number from 1 to 20 (got 0)."),
        ({"user_pending_cap": 21}, "Pending jobs per user must be a whole number from 1 to 20 (got 21)."),
        ({"refine_depth": -1}, "Refine depth must be a whole number from 0 to 10 (got -1)."),
        ({"refine_depth": 11}, "Refine depth must be a whole number from 0 to 10 (got 11)."),
        ({"allowed_channel_ids": "123"}, "Allowed channels must be a list of channel IDs."),
        ({"allowed_channel_ids": [1, "x"]}, "Allowed channels must be channel IDs (got 'x')."),
        ({"colour": "red"}, "Unknown setting(s): colour."),
    ],
)
async def test_guild_settings_validation(store, changes, message):
    await store.update_guild_settings(1, max_steps=10)
    valid_too = {"user_pending_cap": 5} if "user_pending_cap" not in changes else {"refine_depth": 5}
    with pytest.raises(ValueError) as info:  # nothing is saved, not even the valid part
        await store.update_guild_settings(1, **valid_too, **changes)
    assert str(info.value) == message
    assert await store.guild_settings(1) == GuildSettings(guild_id=1, allowed_channel_ids=[], max_steps=10)


async def test_guild_settings_need_a_guild(store):
    with pytest.raises(ValueError, match="server"):
        await store.update_guild_settings(None, max_steps=5)


async def test_block_list(store):
    assert await store.blocked_users(1) == []
    assert await store.block_user(1, 50) is True
    assert await store.block_user(1, 50) is False
    assert await store.block_user(1, 40) is True
    assert await store.block_user(2, 60) is True
    assert await store.blocked_users(1) == [40, 50]
    assert await store.is_blocked(1, 50) and not await store.is_blocked(2, 50)
    assert await store.blocked_users(None) == [] and not await store.is_blocked(None, 50)
    assert await store.unblock_user(1, 50) is True
    assert await store.unblock_user(1, 50) is False
    assert await store.blocked_users(1) == [40]


async def test_block_reason_is_kept_from_the_first_ban(store):
    assert await store.block_reason(1, 50) is None and await store.block_reason(None, 50) is None
    assert await store.block_user(1, 50, reason="  spam  ", blocked_by=7) is True
    assert await store.block_user(1, 50, reason="again") is False
    assert await store.block_reason(1, 50) == "spam"
    await store.block_user(1, 51, reason="x" * 2000)
    assert await store.block_reason(1, 51) == "x" * storage.MAX_BAN_REASON_CHARS
    await store.block_user(1, 52)
    assert await store.block_reason(1, 52) == ""


async def test_blocked_words_saved_folded_and_deduplicated(store):
    s = await store.update_guild_settings(5, blocked_words=["Bad", " evil \n plan ", "ＢＡＤ", "", "straße"])
    assert s.blocked_words == ["bad", "evil plan", "strasse"]
    assert (await store.guild_settings(5)).blocked_words == ["bad", "evil plan", "strasse"]
    await store.update_guild_settings(5, max_steps=20)  # other settings leave the list alone
    assert (await store.guild_settings(5)).blocked_words == ["bad", "evil plan", "strasse"]
    assert (await store.update_guild_settings(5, blocked_words=[])).blocked_words == []
    assert (await store.guild_settings(None)).blocked_words == []


@pytest.mark.parametrize(("words", "message"), [
    ("bad", "must be a list"),
    ([1], "must be text"),
    (["x" * 61], "at most 60 characters"),
    ([f"w{i}" for i in range(101)], "At most 100"),
])
async def test_blocked_words_validation(store, words, message):
    await store.update_guild_settings(5, blocked_words=["keep"])
    with pytest.raises(ValueError, match=message):
        await store.update_guild_settings(5, blocked_words=words)
    assert (await store.guild_settings(5)).blocked_words == ["keep"]


async def test_upgrade_from_the_first_schema_keeps_settings_and_bans(tmp_path):
    first = load_migrations()[0]
    old = write_migrations(tmp_path / "m", {first.name: first.sql})
    data = tmp_path / "data"
    data.mkdir()
    conn = storage.connect(data / DB_FILENAME)
    try:
        assert apply_migrations(conn, old) == [1]
        conn.execute("INSERT INTO guild_settings VALUES (9, '[4]', 50, 2, 1)")
        conn.execute("INSERT INTO blocked_users VALUES (9, 3, 0)")
    finally:
        conn.close()
    async with await Store.open(data) as store:
        assert store.schema_version == load_migrations()[-1].version > 1
        assert await store.guild_settings(9) == GuildSettings(guild_id=9, allowed_channel_ids=[4], max_steps=50,
                                                             user_pending_cap=2, refine_depth=1, blocked_words=[])
        assert await store.is_blocked(9, 3) and await store.block_reason(9, 3) == ""


# --- images -----------------------------------------------------------------------------------------


async def test_image_save_and_read(store):
    assert (store.data_dir / "images").is_dir()
    relative = await store.save_image("abc123", "in", b"\x89PNG data")
    assert relative == "images/abc123-in.png"
    assert await store.read_image(relative) == b"\x89PNG data"
    assert store.image_path(relative) == store.data_dir / "images" / "abc123-in.png"
    assert await store.save_image("abc123", "out", b"jpeg", ext="jpg") == "images/abc123-out.jpg"
    assert await store.save_image("abc123", "in", b"v2") == relative  # overwrite
    assert await store.read_image(relative) == b"v2"
    assert await store.read_image("images/gone.png") is None
    assert await store.read_image(None) is None
    assert await store.read_image("") is None
    assert [p.name for p in (store.data_dir / "images").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("relative", ["../outside.png", "images/../../outside.png", "/etc/passwd", ".", "images/.."])
async def test_image_path_escape_refused(store, relative):
    with pytest.raises(ValueError):
        store.image_path(relative)
    with pytest.raises(ValueError):
        await store.read_image(relative)


async def test_image_symlink_out_refused(store, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    link = store.data_dir / "images" / "link.png"
    try:
        link.symlink_to(secret)
    except OSError:
        pytest.skip("cannot create symlinks here")
    with pytest.raises(ValueError):
        await store.read_image("images/link.png")


@pytest.mark.parametrize(("job_id", "kind", "ext"), [("../x", "in", "png"), ("a", "in/../..", "png"),
                                                     ("a", "in", "png/x"), ("", "in", "png"), ("a", "in", "")])
async def test_save_image_rejects_unsafe_names(store, job_id, kind, ext):
    with pytest.raises(ValueError):
        await store.save_image(job_id, kind, b"x", ext=ext)


@pytest.mark.parametrize("failing", ["fsync", "replace"])
async def test_save_image_disk_full_leaves_nothing(store, monkeypatch, failing):
    job = await store.create_job(make_job())
    relative = await store.save_image(job.id, "out", b"old image")
    images = store.data_dir / "images"
    before_files = sorted(p.name for p in images.iterdir())
    db_before = (store.data_dir / DB_FILENAME).stat().st_mtime_ns, await store.get_job(job.id)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.images.os, failing, full)
    with pytest.raises(OSError) as info:
        await store.save_image(job.id, "out", b"new image that does not fit")
    with pytest.raises(OSError):
        await store.save_image(job.id, "fresh", b"another")
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in images.iterdir()) == before_files  # no temp files, no new file
    assert await store.read_image(relative) == b"old image"
    assert ((store.data_dir / DB_FILENAME).stat().st_mtime_ns, await store.get_job(job.id)) == db_before


async def test_stale_temp_files_removed_on_open(tmp_path):
    data = tmp_path / "data"
    await (await Store.open(data)).close()
    old = data / "images" / ".tmp-old.png"
    young = data / "images" / ".tmp-young.png"
    old.write_bytes(b"partial")
    young.write_bytes(b"in progress elsewhere")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    await (await Store.open(data)).close()
    assert not old.exists() and young.exists()


# --- migrations, persistence, crashes ---------------------------------------------------------------


def version_rows(db: Path) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT version, name, applied_at FROM schema_version ORDER BY version").fetchall()


async def test_migrations_are_package_files():
    migrations = load_migrations()
    assert migrations and migrations[0].version == 1 and migrations[0].name == "001_initial.sql"
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})


async def test_fresh_db_gets_latest_version_and_pragmas(tmp_path):
    latest = load_migrations()[-1].version
    async with await Store.open(tmp_path / "new" / "dir") as store:
        assert store.schema_version == latest
        assert store.data_dir == (tmp_path / "new" / "dir").resolve()
        conn = store.db.connection
        assert (await conn.execute_fetchall("PRAGMA journal_mode"))[0][0] == "wal"
        assert (await conn.execute_fetchall("PRAGMA synchronous"))[0][0] == 1  # NORMAL
        assert (await conn.execute_fetchall("PRAGMA foreign_keys"))[0][0] == 1
        indexed = {r[0] for r in await conn.execute_fetchall("SELECT sql FROM sqlite_master WHERE type = 'index'")
                   if r[0]}
        for columns in ["(user_id, state)", "(result_message_id)", "(status_message_id)", "(parent_id)"]:
            assert any(columns in sql for sql in indexed), columns
    rows = version_rows(tmp_path / "new" / "dir" / DB_FILENAME)
    assert [(v, n) for v, n, _ in rows] == [(m.version, m.name) for m in load_migrations()]


async def test_reopen_applies_nothing(tmp_path):
    await (await Store.open(tmp_path)).close()
    rows = version_rows(tmp_path / DB_FILENAME)
    await (await Store.open(tmp_path)).close()
    assert version_rows(tmp_path / DB_FILENAME) == rows
    conn = storage.connect(tmp_path / DB_FILENAME)
    try:
        assert apply_migrations(conn) == []
    finally:
        conn.close()


async def test_newer_db_refused(tmp_path):
    await (await Store.open(tmp_path)).close()
    with contextlib.closing(sqlite3.connect(tmp_path / DB_FILENAME)) as conn, conn:
        conn.execute("INSERT INTO schema_version VALUES (999, '999_future.sql', 0)")
    with pytest.raises(SchemaTooNewError, match="999"):
        await Store.open(tmp_path)


def write_migrations(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir()
    for name, sql in files.items():
        (directory / name).write_text(textwrap.dedent(sql))
    return directory


def test_migrations_numeric_order_each_in_own_transaction(tmp_path):
    # 10 needs 2's table: lexical order (1, 10, 2) would fail.
    mig = write_migrations(tmp_path / "m", {
        "1_a.sql": "CREATE TABLE a (x INTEGER);",
        "10_c.sql": "ALTER TABLE b ADD COLUMN z TEXT; -- trailing comment",
        "2_b.sql": "CREATE TABLE b (y INTEGER);\nINSERT INTO b VALUES (1);",
        "notes.txt": "not a migration",
    })
    conn = storage.connect(tmp_path / "db.sqlite3")
    try:
        assert apply_migrations(conn, mig) == [1, 2, 10]
        assert [tuple(r) for r in conn.execute("SELECT y, z FROM b")] == [(1, None)]
        assert apply_migrations(conn, mig) == []
        (mig / "11_bad.sql").write_text("CREATE TABLE d (x INTEGER);\nINSERT INTO d VALUES (1);\nNOT SQL;\n")
        with pytest.raises(MigrationError, match="11_bad.sql"):
            apply_migrations(conn, mig)
        assert not conn.in_transaction
        assert storage.schema_version(conn) == 10
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'd'").fetchone() is None  # rolled back
        (mig / "11_bad.sql").write_text("CREATE TABLE d (x INTEGER);")
        assert apply_migrations(conn, mig) == [11]
    finally:
        conn.close()


@pytest.mark.parametrize("names", [["001_a.sql", "1_b.sql"], ["initial.sql"], ["000_zero.sql"]])
def test_bad_migration_files_refused(tmp_path, names):
    mig = write_migrations(tmp_path / "m", dict.fromkeys(names, "SELECT 1;"))
    conn = storage.connect(tmp_path / "db.sqlite3")
    try:
        with pytest.raises(MigrationError):
            apply_migrations(conn, mig)
    finally:
        conn.close()


def test_migration_with_commit_refused(tmp_path):
    mig = write_migrations(tmp_path / "m", {"001_a.sql": "CREATE TABLE a (x INTEGER); COMMIT;"})
    conn = storage.connect(tmp_path / "db.sqlite3")
    try:
        with pytest.raises(MigrationError, match="COMMIT"):
            apply_migrations(conn, mig)
        assert storage.schema_version(conn) == 0
    finally:
        conn.close()


async def test_close_and_reopen_keeps_data(tmp_path):
    store = await Store.open(tmp_path)
    job = await store.create_job(make_job(state="running"))
    await store.update_guild_settings(9, max_steps=12)
    await store.block_user(9, 3)
    relative = await store.save_image(job.id, "in", b"img")
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        await store.get_job(job.id)

    async with await Store.open(tmp_path) as reopened:
        assert await reopened.get_job(job.id) == job
        assert [j.id for j in await reopened.unfinished_jobs()] == [job.id]
        assert (await reopened.guild_settings(9)).max_steps == 12
        assert await reopened.blocked_users(9) == [3]
        assert await reopened.read_image(relative) == b"img"


async def test_second_store_without_closing_first(tmp_path):
    """Like a SIGKILL'd process whose successor opens the folder while the old handle is still around."""
    first = await Store.open(tmp_path)
    job = await first.create_job(make_job())
    second = await Store.open(tmp_path)
    try:
        assert await second.get_job(job.id) == job
        await second.update_job(job.id, state="failed", error="bot restarted")
        assert (await first.get_job(job.id)).state == "failed"
        other = await first.create_job(make_job())
        assert await second.get_job(other.id) == other
    finally:
        await second.close()
        await first.close()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
async def test_sigkill_mid_transaction_keeps_committed_data(tmp_path):
    script = textwrap.dedent(f"""
        import asyncio, os, signal
        from bot.storage import JobRecord, Store

        async def main():
            store = await Store.open({str(tmp_path)!r})
            job = await store.create_job(JobRecord(id="committed", user_id=1, channel_id=2, guild_id=None,
                                                   instruction="x", seed=1, text_cfg=7.0, image_cfg=1.5, steps=5))
            conn = store.db.connection
            await conn.execute("BEGIN IMMEDIATE")
            await conn.execute("UPDATE jobs SET state = 'done' WHERE id = 'committed'")
            await conn.execute("INSERT INTO jobs (id, user_id, channel_id, instruction, seed, text_cfg, image_cfg,"
                               " steps, created_at) VALUES ('uncommitted', 1, 2, 'y', 1, 7, 1.5, 5, 0)")
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
    """)
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script], cwd=REPO_ROOT,
                                   capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    async with await Store.open(tmp_path) as store:
        assert (await store.db.connection.execute_fetchall("PRAGMA integrity_check"))[0][0] == "ok"
        assert (await store.get_job("committed")).state == "queued"
        assert await store.get_job("uncommitted") is None
        await store.update_job("committed", state="failed")  # the write lock was released
        assert (await store.get_job("committed")).state == "failed"
