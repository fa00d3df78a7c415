"""MGIE image editing engine: models, pipeline, GPU workers. Never imports discord.

Heavy modules (torch, transformers, diffusers) load lazily so that the bot starts fast.

The path of an edit, module by module:

- ``protocol``: what crosses the worker boundary (EditJob in; JobProgress, EditOutcome out) and the
  ``Worker`` protocol the bot's queue relies on.
- ``worker`` (LocalWorker: one device, one thread), ``inbox`` (jobs handed in, batch window),
  ``worker_loop`` (the thread's batch loop: admit, step, finish), ``faults`` (what a failure costs and
  what the user is told), ``lifecycle`` (load, compile warm-up), ``pool`` (one worker per device).
- ``pipeline``: ``MgiePipeline``, the one-edit ``__call__`` and the batched calls it and the worker make:
  ``inputs`` (Prompt, PreparedImage), ``language`` (CLIP + LLM + edit head, guidance cache),
  ``denoiser`` (InstructPix2Pix steps, fused guided step, buckets), ``vae`` (encode/decode),
  ``compilation`` and ``warm_up`` (the CUDA fast paths and their load-time compile).
- ``decoding`` (greedy decode, one graph replay per token), ``decode_graphs``, ``decode_buffers``,
  ``run_check`` ([IMG]-run check), ``llama_layer`` (the re-implemented Llama layer), ``graphs``
  (small eager calls as CUDA graphs), ``offload`` (stage residency for small cards).
- ``models`` and ``checkpoints`` (loading), ``conversation``, ``prompt_tokens`` and ``instructions``
  (the prompt), ``images`` (safe decoding, sizes) and ``png`` (the fast encoder), ``options``,
  ``settings``, ``errors``, ``safety``, ``cpu_pools``, ``edit_head``; ``tiny`` writes random-weight
  checkpoints with the real file layout.
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
