"""Tiny random-weight MGIE checkpoints in exactly the released layout.

Tests load them through the same code as the real weights, and a newcomer without a GPU can try the
whole flow (`python -m mgie_engine.tiny ./tiny-ckpt`). The weights are random: edits are noise.
"""

from .writer import TinyPaths, write_tiny_checkpoints

__all__ = ["TinyPaths", "write_tiny_checkpoints"]
