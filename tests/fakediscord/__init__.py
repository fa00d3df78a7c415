"""Loopback fake Discord (placeholder docstring; filled in below)."""

from .clock import FakeClock
from .models import AppCommand, Attachment, Callback, Channel, Guild, InteractionRecord, Member, Message, Role, User
from .server import FakeDiscord

__all__ = [
    "AppCommand", "Attachment", "Callback", "Channel", "FakeClock", "FakeDiscord", "Guild",
    "InteractionRecord", "Member", "Message", "Role", "User",
]
