-- Abuse controls: a per-server word block-list for instructions, and why (and by whom) a user was banned.
-- Applied inside a transaction by bot/storage.py: no BEGIN/COMMIT here.

-- JSON list of casefolded words/phrases; empty = nothing blocked.
ALTER TABLE guild_settings ADD COLUMN blocked_words TEXT NOT NULL DEFAULT '[]';

-- So a moderator can later see why someone was banned; '' / NULL for bans made before this migration.
ALTER TABLE blocked_users ADD COLUMN reason TEXT NOT NULL DEFAULT '';
ALTER TABLE blocked_users ADD COLUMN blocked_by INTEGER;
