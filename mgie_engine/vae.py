"""The VAE codec: input images to latents when jobs start, latents to images (as bytes) when they finish."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from .compilation import mark_sizes_dynamic
from .graphs import GraphedCall
from .inputs import PreparedImage

ENCODE_BATCH = 8  # same-size images VAE-encoded in one call when a batch of jobs starts
DECODE_BATCH = 4  # finished jobs whose latents share one VAE decode (each adds its decoder activations)


def vae_functions(vae: torch.nn.Module, compiled: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], ...]:
    """The VAE's encode (pixels -> latent mode) and decode (latents -> pixels), compiled or not.

    Compiled, each GroupNorm becomes a split reduction fused with its SiLU (eager runs one CUDA block per
    group and image and leaves the GPU mostly idle; timings in bench/NOTES.md, "VAE"). No CUDA graphs:
    decode batches and sizes vary and their activations are large.
    """
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels).latent_dist.mode()

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]

    return (torch.compile(encode), torch.compile(decode)) if compiled else (encode, decode)


class VaeCodec:
    """Batched VAE encodes and decodes; one job's are replayed as CUDA graphs where ``recorded``."""

    def __init__(self, vae: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 image_processor: VaeImageProcessor, compiled: bool, recorded: bool) -> None:
        self.device, self.dtype = device, dtype
        self.image_processor = image_processor
        self._encode, self._decode = vae_functions(vae, compiled=compiled)

        def decode_to_bytes(latents: torch.Tensor) -> torch.Tensor:
            # diffusers' postprocess (denormalize, x255 in float32, round half to even, uint8) on the GPU,
            # so only bytes cross to the CPU and the GPU thread skips ~3 ms of numpy per 512x512 image.
            decoded = self._decode(latents)
            return (self.image_processor.denormalize(decoded).float() * 255).round().to(torch.uint8)

        self._decode_bytes = decode_to_bytes
        self._decode_one = GraphedCall(decode_to_bytes, "VAE decode", keep=4, enabled=recorded, mark=mark_sizes_dynamic)
        self._encode_one = GraphedCall(self._encode, "VAE encode", keep=4, enabled=recorded,
                                       mark=mark_sizes_dynamic)

    @torch.inference_mode()
    def encode(self, images: Sequence[PreparedImage]) -> list[torch.Tensor]:
        """Each image's latents (1, c, h, w), images of one size encoded together (a burst's encodes are
        otherwise 32 small launch-bound calls)."""
        latents_of: dict[int, torch.Tensor] = {}
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), ENCODE_BATCH):
                chunk = indices[start:start + ENCODE_BATCH]
                pixels = torch.stack([images[i].vae_pixels for i in chunk]).to(self.device, self.dtype)
                mark_sizes_dynamic(pixels)
                encode = self._encode_one if len(chunk) == 1 else self._encode
                for i, latents in zip(chunk, encode(pixels), strict=True):
                    latents_of[i] = latents.unsqueeze(0)
        return [latents_of[i] for i in range(len(images))]

    @torch.inference_mode()
    def decode_queued(self, latents: Sequence[torch.Tensor]) -> Callable[[], list[PIL.Image.Image]]:
        """Queue one VAE decode of several jobs' latents (one size) without waiting for it; the function
        returned waits and gives the images. A worker queues the next group's decode before it collects
        this one, so the GPU does not wait while the CPU launches a decode's ~230 kernels and builds the
        images of the one before (a burst's 32 results are 8 decodes)."""
        batch = torch.cat(list(latents))
        mark_sizes_dynamic(batch)
        pixels = (self._decode_one if batch.shape[0] == 1 else self._decode_bytes)(batch).permute(0, 2, 3, 1)
        if pixels.device.type != "cuda":
            return lambda: [PIL.Image.fromarray(a) for a in pixels.numpy()]
        host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        copied = torch.cuda.current_stream(pixels.device).record_event()

        def collect() -> list[PIL.Image.Image]:
            copied.synchronize()
            return [PIL.Image.fromarray(a) for a in host.numpy()]

        return collect
