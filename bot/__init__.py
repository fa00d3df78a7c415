"""Discord front end for the MGIE image-editing bot."""
