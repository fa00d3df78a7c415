"""Gateway intent bits (what the bot asked for in IDENTIFY decides which events it gets)."""

GUILDS = 1 << 0
GUILD_MEMBERS = 1 << 1
GUILD_MODERATION = 1 << 2
GUILD_PRESENCES = 1 << 8
GUILD_MESSAGES = 1 << 9
GUILD_MESSAGE_REACTIONS = 1 << 10
GUILD_MESSAGE_TYPING = 1 << 11
DIRECT_MESSAGES = 1 << 12
DIRECT_MESSAGE_REACTIONS = 1 << 13
DIRECT_MESSAGE_TYPING = 1 << 14
MESSAGE_CONTENT = 1 << 15

PRIVILEGED = GUILD_MEMBERS | GUILD_PRESENCES | MESSAGE_CONTENT

# Application flags that tell the bot which privileged intents are switched on in the portal.
APP_FLAG_PRESENCE_LIMITED = 1 << 13
APP_FLAG_GUILD_MEMBERS_LIMITED = 1 << 15
APP_FLAG_MESSAGE_CONTENT_LIMITED = 1 << 19
APP_FLAG_COMMAND_BADGE = 1 << 23


def application_flags(privileged: int) -> int:
    """Application ``flags`` for an unverified app with ``privileged`` intents enabled."""
    flags = APP_FLAG_COMMAND_BADGE
    if privileged & GUILD_PRESENCES:
        flags |= APP_FLAG_PRESENCE_LIMITED
    if privileged & GUILD_MEMBERS:
        flags |= APP_FLAG_GUILD_MEMBERS_LIMITED
    if privileged & MESSAGE_CONTENT:
        flags |= APP_FLAG_MESSAGE_CONTENT_LIMITED
    return flags
