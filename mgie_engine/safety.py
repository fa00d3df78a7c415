"""The optional output safety check: instruct-pix2pix's own NSFW classifier, loaded only when asked for.

The worker calls the returned function on each edited image; the bot decides what a flag means
(spoiler or withhold, per server, outside age-restricted channels).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL.Image
import torch

from . import checkpoints as ck
from .errors import CheckpointError
from .settings import EngineSettings

SAFETY_FILES = ("safety_checker/config.json", "feature_extractor/preprocessor_config.json")
SAFETY_PATTERNS = ["safety_checker/*", "feature_extractor/*"]


def load_safety_checker(settings: EngineSettings, device: torch.device,
                        dtype: torch.dtype) -> Callable[[PIL.Image.Image], bool]:
    """Stable Diffusion's safety checker as a function: image -> flagged."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    folder = ck.resolve_component(settings.ip2p, SAFETY_FILES, SAFETY_PATTERNS, "instruct-pix2pix safety checker")
    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(str(folder / "safety_checker"), dtype=dtype)
        processor = CLIPImageProcessor.from_pretrained(str(folder / "feature_extractor"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"The safety checker in {folder} could not be loaded: {err}") from err
    checker = checker.to(device).eval()

    @torch.inference_mode()
    def is_flagged(image: PIL.Image.Image) -> bool:
        clip_input = processor(image, return_tensors="pt").pixel_values.to(device, dtype)
        pixels = np.asarray(image, dtype=np.float32)[None] / 255.0
        _, flags = checker(images=pixels, clip_input=clip_input)
        return bool(flags[0])

    return is_flagged
