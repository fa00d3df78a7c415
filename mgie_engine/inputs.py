"""What an edit takes in: the prompt (image, instruction, earlier turns) and an image made ready for both stages."""

from __future__ import annotations

import concurrent.futures
import dataclasses

import PIL.Image
import torch

History = tuple[tuple[str, str], ...]  # earlier turns: (instruction, the model's answer)


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedImage:
    """A fitted input image with the CPU work both stages need done ahead: the LLM cache's key, CLIP's
    pixels and the VAE's. ``MgiePipeline.prepare`` makes it on any thread, so a worker does it beside its
    GPU thread (~15 ms a job on a small CPU: for a burst of 32, half a second the GPU would wait for).
    The VAE's pixels, needed only after the language stage, are made on another thread meanwhile."""

    image: PIL.Image.Image
    key: str  # sha256 of the pixels
    clip_pixels: torch.Tensor  # (3, h, w) float32: the vision processor's output
    vae_batch: concurrent.futures.Future  # of (1, 3, H, W) float32 in [-1, 1]: the VAE image processor's output
    # (width, height) the result is delivered at, when the image was snapped to a coarser working size
    # (``MgiePipeline.fit_and_prepare``); None: the image's own size.
    output_size: tuple[int, int] | None = None

    @property
    def vae_pixels(self) -> torch.Tensor:
        """The VAE's pixels (waits for the thread making them)."""
        return self.vae_batch.result()[0]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image the models work on."""
        return self.image.size

    @property
    def delivered_size(self) -> tuple[int, int]:
        """(width, height) of the result handed back: the fitted size, which the working size may round."""
        return self.output_size or self.image.size


ImageInput = PIL.Image.Image | PreparedImage


@dataclasses.dataclass(frozen=True, eq=False)
class Prompt:
    """What the language stage reads for one job: the image, the instruction and the earlier turns."""

    image: ImageInput
    instruction: str
    history: History = ()
