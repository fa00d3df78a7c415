"""MGIE image editing engine: models, pipeline, job queue. Never imports discord.

Heavy modules (torch, transformers, diffusers) load lazily so that the bot starts fast.
"""

from .errors import (
           BadImageError,
           BadRequestError,
           CheckpointError,
           JobCancelledError,
           MgieError,
           ModelUnavailableError,
)
from .settings import EngineSettings

__all__ = ["BadImageError", "BadRequestError", "CheckpointError", "EngineSettings", "JobCancelledError",
           "MgieError", "ModelUnavailableError"]
