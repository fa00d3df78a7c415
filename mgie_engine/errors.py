"""Typed errors whose messages are fit to show a user as they are.

Callers (the CLI, the bot) catch :class:`MgieError` and show ``str(err)``; anything else is a bug.
``str(err)`` is English (logs, the CLI). Errors a Discord user may see also carry a stable message ``key``
and its ``params``, so the bot can show them in the reader's language (its catalogue, ``bot/i18n``, holds
the English text under the same key); the engine itself knows nothing of languages.
"""

from __future__ import annotations


class MgieError(Exception):
    """Base class: the message is written for the person who made the request.

    ``key`` (e.g. ``"engine.image_empty"``) names the message for translation, ``params`` fill its
    placeholders; both are optional (an error without a key is shown in English). A class may name why it
    fails a job in ``failure_cause`` (a word of ``bot/failure_causes``): the bot's metrics count it by that,
    and a worker over Redis sends it along (``redis_pool/payloads.py: failure_of``); none means an engine error.
    """

    failure_cause: str | None = None

    def __init__(self, message: str = "", *, key: str | None = None, **params: object) -> None:
        super().__init__(message)
        self.key = key
        self.params = params


class BadImageError(MgieError):
    """The input is not an image we can edit (unreadable, corrupt, empty, too large)."""

    failure_cause = "bad_input"


class BadRequestError(MgieError):
    """An option is out of range or the instruction is unusable."""

    failure_cause = "bad_input"


class SettingsError(BadRequestError):
    """A setting (environment or `.env`) is malformed; the message names it and what it accepts."""


class CheckpointError(MgieError):
    """A checkpoint file is missing or malformed; the message names the file and how to get it."""


class ModelUnavailableError(MgieError):
    """Weights are neither on disk nor reachable on the Hub (offline, gated, no such repo)."""


class JobCancelledError(MgieError):
    """The job was cancelled before it finished."""
