-- Whether the safety check flagged a job's output: a result delivered again after a restart (its first
-- delivery cut off by the shutdown) must get the same spoiler / withhold treatment.
-- Applied inside a transaction by bot/storage.py: no BEGIN/COMMIT here.
ALTER TABLE jobs ADD COLUMN flagged INTEGER NOT NULL DEFAULT 0;
