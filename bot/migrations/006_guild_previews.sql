-- Whether the progress message of this server's edits shows a live preview of the image being made
-- (1: on, the default; 0: off). /mgie-admin settings previews.
-- Applied inside a transaction by bot/storage.py: no BEGIN/COMMIT here.
ALTER TABLE guild_settings ADD COLUMN previews INTEGER NOT NULL DEFAULT 1;
