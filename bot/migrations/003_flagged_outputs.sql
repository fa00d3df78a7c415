-- What to do with an output the safety check flags, in channels not marked age-restricted:
-- 'spoiler' (send it behind a spoiler) or 'withhold' (don't send it).
-- Applied inside a transaction by bot/storage.py: no BEGIN/COMMIT here.
ALTER TABLE guild_settings ADD COLUMN flagged_outputs TEXT NOT NULL DEFAULT 'spoiler';
