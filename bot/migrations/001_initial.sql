-- Initial schema. Applied inside a transaction by bot/storage.py: no BEGIN/COMMIT here.
-- Times are REAL seconds since the epoch (time.time()); booleans are INTEGER 0/1.

CREATE TABLE jobs (
    id                  TEXT PRIMARY KEY NOT NULL,   -- uuid4 hex
    user_id             INTEGER NOT NULL,
    channel_id          INTEGER NOT NULL,
    guild_id            INTEGER,                     -- NULL in DMs
    instruction         TEXT NOT NULL,
    seed                INTEGER NOT NULL,
    text_cfg            REAL NOT NULL,
    image_cfg           REAL NOT NULL,
    steps               INTEGER NOT NULL,
    preset              TEXT NOT NULL DEFAULT 'balanced',
    preset_reason       TEXT NOT NULL DEFAULT '',
    kind                TEXT NOT NULL DEFAULT 'edit',
    -- No foreign key: old jobs may be pruned while their children live on, and
    -- Store.chain() treats a missing parent as the start of the chain.
    parent_id           TEXT,
    input_image         TEXT NOT NULL DEFAULT '',
    output_image        TEXT,
    expressive          TEXT,
    error               TEXT,
    state               TEXT NOT NULL DEFAULT 'queued',
    created_at          REAL NOT NULL,
    started_at          REAL,
    finished_at         REAL,
    application_id      INTEGER,
    interaction_token   TEXT,
    token_created_at    REAL,
    status_message_id   INTEGER,
    result_message_id   INTEGER,
    reply_to_message_id INTEGER,
    history_depth       INTEGER NOT NULL DEFAULT 0,
    llm_cached          INTEGER NOT NULL DEFAULT 0 CHECK (llm_cached IN (0, 1))
);

CREATE INDEX idx_jobs_user_state ON jobs (user_id, state);
CREATE INDEX idx_jobs_result_message ON jobs (result_message_id);
CREATE INDEX idx_jobs_status_message ON jobs (status_message_id);
CREATE INDEX idx_jobs_parent ON jobs (parent_id);
-- Restart recovery (queued/running by age) and ETA estimates (last finished jobs).
CREATE INDEX idx_jobs_state_created ON jobs (state, created_at);
CREATE INDEX idx_jobs_state_finished ON jobs (state, finished_at);

CREATE TABLE guild_settings (
    guild_id            INTEGER PRIMARY KEY NOT NULL,
    allowed_channel_ids TEXT NOT NULL DEFAULT '[]',  -- JSON list of ints; empty = every channel
    max_steps           INTEGER NOT NULL,
    user_pending_cap    INTEGER NOT NULL,
    refine_depth        INTEGER NOT NULL
);

CREATE TABLE blocked_users (
    guild_id            INTEGER NOT NULL,
    user_id             INTEGER NOT NULL,
    blocked_at          REAL NOT NULL,
    PRIMARY KEY (guild_id, user_id)
) WITHOUT ROWID;
