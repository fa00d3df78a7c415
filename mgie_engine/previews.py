"""Live previews: a small picture of an edit as it forms, from its latents, with no extra weights.

The SD-1.5 VAE's 4 latent channels map to RGB roughly linearly, so one fixed 4x3 matrix (no decoder)
gives a recognisable thumbnail. The factors are the ones ComfyUI ships for SD 1.x
(``comfy/latent_formats.py``, ``SD15.latent_rgb_factors``), a refit of the approximation keturn published
in "Decoding latents to RGB without upscaling" (discuss.huggingface.co/t/23204); they apply to latents in
the UNet's scale (VAE output times 0.18215), which is what the denoiser holds. The code here is our own.

Cost: the latents are resized to the preview's size first (a linear map commutes with bilinear resizing),
then one 4x3 matmul, all on the job's device; the copy to the host is queued without waiting, and JPEG
encoding runs on a CPU thread (``encode_preview`` after ``PendingPreview.wait``).
"""

from __future__ import annotations

import dataclasses
import io
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

PREVIEW_SIDE = 256  # the preview's longest side in pixels: readable on a phone, ~10 KB as JPEG
PREVIEW_QUALITY = 80
DEFAULT_PREVIEW_SECONDS = 3.0  # one preview per job every this many seconds of denoising (MGIE_PREVIEW_SECONDS)

#: Latent channel -> (R, G, B) contribution; ComfyUI's SD15.latent_rgb_factors (see the module docstring).
LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def preview_size(height: int, width: int, side: int = PREVIEW_SIDE) -> tuple[int, int]:
    """(height, width) of a preview of an ``height`` x ``width`` image (or latent): longest side ``side``."""
    scale = side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def latent_rgb(latents: torch.Tensor, noise_scale: torch.Tensor | float = 1.0,
               side: int = PREVIEW_SIDE, like: tuple[int, int] | None = None) -> torch.Tensor:
    """One job's latents ``(1, 4, h, w)`` as an ``(H, W, 3)`` uint8 image on the same device.

    ``noise_scale`` divides the latents first: a noisy latent at sigma has a spread of sqrt(sigma^2 + 1),
    and dividing by it keeps the early previews grey noise rather than saturated colour. ``like``: the
    (height, width) of the image the preview stands for, whose shape it takes when the latents' working
    size rounds it (``images.snap_size``); None: the latents' own.
    """
    import torch
    import torch.nn.functional as F

    x = latents[:1].float() / noise_scale
    size = preview_size(*(like or x.shape[-2:]), side=side)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    factors = torch.tensor(LATENT_RGB, device=x.device, dtype=x.dtype)
    rgb = torch.einsum("chw,cr->hwr", x, factors)
    return ((rgb + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


@dataclasses.dataclass
class PendingPreview:
    """A preview on its way to the host: the copy is queued behind the step, and waited for off the GPU
    thread, so the thread that steps the jobs never blocks on it."""

    pixels: torch.Tensor  # (H, W, 3) uint8 on the host (pinned when it comes from a GPU)
    ready: object | None = None  # a torch.cuda.Event recorded after the copy; None on the CPU

    def wait(self) -> np.ndarray:
        """The pixels, once the copy has landed."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.pixels.numpy()


def start_preview(latents: torch.Tensor, noise_scale: torch.Tensor | float = 1.0,
                  side: int = PREVIEW_SIDE, like: tuple[int, int] | None = None) -> PendingPreview:
    """Compute the preview on the latents' device and queue its copy to the host (never waits); ``like``
    as in ``latent_rgb``."""
    import torch

    rgb = latent_rgb(latents, noise_scale, side, like)
    if rgb.device.type != "cuda":
        return PendingPreview(rgb.cpu())
    host = torch.empty(rgb.shape, dtype=rgb.dtype, pin_memory=True)
    host.copy_(rgb, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(rgb.device))  # the stream the copy was queued on
    return PendingPreview(host, event)


def encode_preview(pixels: np.ndarray, quality: int = PREVIEW_QUALITY) -> bytes:
    """The preview as a small JPEG (a few KB: it travels through Discord, and Redis for remote workers)."""
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class PreviewThrottle:
    """When a job's next preview is due: every ``interval`` seconds from the start of its denoising (so
    an edit shorter than that sends none). ``ready()`` answers and, when due, starts the next interval."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.clock = interval, clock
        self.next_at = clock() + interval

    def ready(self) -> bool:
        """Whether a preview is due now; if so the next one is due ``interval`` from now."""
        now = self.clock()
        if now < self.next_at:
            return False
        self.next_at = now + self.interval
        return True
