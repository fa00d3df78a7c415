"""Discord features of the MGIE bot, one cog per feature."""
