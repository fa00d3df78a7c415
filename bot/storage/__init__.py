"""The bot's storage: SQLite (through aiosqlite) for jobs, server settings and bans; files for images.

- :mod:`.database`: the connection, one transaction at a time, writes that finish even if cancelled;
- :mod:`.migrations`: the schema's ``bot/migrations/NNN_name.sql`` files and their runner;
- :mod:`.opening`: folders, migrations and locks at open, and what to tell the operator when it fails;
- :mod:`.jobs`, :mod:`.guilds`, :mod:`.images`: what the store holds, one part each;
- :mod:`.store`: :class:`Store`, the one object the bot uses.

Durability: WAL journal with ``synchronous=NORMAL`` and one explicit transaction per write. A killed
process loses nothing that was committed, and even a power cut can at worst drop the last few commits;
it never leaves a half-written update or a corrupt file behind.
"""

from .database import BUSY_TIMEOUT_S, Database, connect
from .guilds import (
    FLAGGED_OUTPUT_CHOICES,
    MAX_BAN_REASON_CHARS,
    MAX_BLOCKED_WORD_CHARS,
    MAX_BLOCKED_WORDS,
    GuildSettings,
)
from .images import IMAGES_DIRNAME, TMP_PREFIX
from .jobs import JOB_STATES, UNFINISHED_STATES, JobRecord
from .migrations import (
    Migration,
    MigrationError,
    SchemaTooNewError,
    apply_migrations,
    load_migrations,
    schema_version,
)
from .opening import DB_FILENAME, OPEN_LOCK_WAIT_S, DatabaseUnavailableError
from .store import Store

__all__ = [
    "BUSY_TIMEOUT_S",
    "DB_FILENAME",
    "FLAGGED_OUTPUT_CHOICES",
    "IMAGES_DIRNAME",
    "JOB_STATES",
    "MAX_BAN_REASON_CHARS",
    "MAX_BLOCKED_WORDS",
    "MAX_BLOCKED_WORD_CHARS",
    "OPEN_LOCK_WAIT_S",
    "TMP_PREFIX",
    "UNFINISHED_STATES",
    "Database",
    "DatabaseUnavailableError",
    "GuildSettings",
    "JobRecord",
    "Migration",
    "MigrationError",
    "SchemaTooNewError",
    "Store",
    "apply_migrations",
    "connect",
    "load_migrations",
    "schema_version",
]
