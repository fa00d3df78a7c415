"""How the diffusion side is made fast on CUDA: NHWC layouts, torch.compile options, dynamic-size marks.

The figures behind each choice are in bench/NOTES.md ("Compile options").
"""

from __future__ import annotations

import torch

from .models import MgieModels

# CUDA graphs, 1x1 convolutions as matmuls (inductor fuses their epilogues), no layout optimization
# (it only ever applies to static shapes): see bench/NOTES.md, "Compile options".
UNET_COMPILE_OPTIONS = {"triton.cudagraphs": True, "conv_1x1_as_mm": True, "layout_optimization": False}
# The static step also groups independent small kernels into combined launches (bench/NOTES.md).
STATIC_STEP_OPTIONS = {**UNET_COMPILE_OPTIONS, "combo_kernels": True}


def always_pass_upsample_size(unet: torch.nn.Module) -> None:
    """Make diffusers' UNet give every upsampler its skip connection's size, as it already does whenever a
    latent side is not a multiple of ``2**num_upsamplers``. For other sizes the result is the same (nearest
    neighbour, exactly twice the size), but the choice is a shape guard: compiled, each divisibility class
    of the height and width would compile again. No side is a multiple of 2**62."""
    unet.num_upsamplers = 62


def mark_sizes_dynamic(*tensors: torch.Tensor) -> None:
    """Compile for any batch and image size on first sight, rather than once per shape until dynamo notices
    (no effect outside ``torch.compile``).

    The batch dim, and a latent's or image's height and width. A batch of one stays specialised (its own
    compile): dynamo never lets a symbolic size stand for 1, so the warm-up runs one job and then several.
    """
    for t in tensors:
        dims = [d for d in ((0, 2, 3) if t.dim() == 4 else (0,)) if t.shape[d] > 1]
        if dims:
            torch._dynamo.maybe_mark_dynamic(t, dims)


def prepare_for_cuda(models: MgieModels, graphs: bool) -> torch.nn.Module:
    """Same math, faster kernels: NHWC convolutions, and with ``graphs`` a compiled UNet replayed as CUDA
    graphs (one per batch bucket: a UNet call at batch 3 is mostly launch overhead). Returns the UNet to
    call (compiled or the model itself); a no-op off CUDA."""
    unet = models.unet
    if models.device.type != "cuda":
        return unet
    torch.backends.cudnn.benchmark = True  # UNet and VAE shapes repeat: pick the fastest conv kernels
    models.unet.to(memory_format=torch.channels_last)
    if graphs:
        unet = torch.compile(models.unet, options=UNET_COMPILE_OPTIONS)
        always_pass_upsample_size(models.unet)
        # The VAE goes NHWC only compiled: eager GroupNorms copy NHWC activations to NCHW and back
        # (bench/NOTES.md, "VAE").
        models.vae.to(memory_format=torch.channels_last)
    return unet
