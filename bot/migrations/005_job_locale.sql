-- The Discord locale of the user who asked for a job ("de", "ja", "pt-BR"...): its status lines, result and
-- failure are written later, without an interaction at hand, in that user's language (bot/i18n).
-- NULL (jobs from before this column): English.
-- Applied inside a transaction by bot/storage.py: no BEGIN/COMMIT here.
ALTER TABLE jobs ADD COLUMN locale TEXT;
