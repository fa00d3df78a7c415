"""Engine settings, read from the environment (and a `.env` file, loaded by the entry points)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .errors import BadRequestError

DEFAULT_CKPT_REPO = "tsujuifu/ml-mgie"
DEFAULT_IP2P = "timbrooks/instruct-pix2pix"

if TYPE_CHECKING:
    import torch

_DTYPES = {"fp16": "float16", "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp32": "float32", "float32": "float32"}


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """Where the weights are and how to run them.

    ``ckpt_dir`` is a folder laid out like the Hub repo ``tsujuifu/ml-mgie`` (``LLaVA-7B-v1/`` and
    ``mgie_7b/``); when it is None or incomplete the files come from ``ckpt_repo`` on the Hub.
    ``clip`` None means the vision tower named in ``LLaVA-7B-v1/config.json``.
    """

    ckpt_dir: str | None = None
    ckpt_repo: str = DEFAULT_CKPT_REPO
    ip2p: str = DEFAULT_IP2P
    clip: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_side: int = 512
    max_batch: int = 8  # jobs whose denoising steps share one UNet call
    compile: bool = False  # torch.compile the UNet, VAE and decoder on CUDA (minutes of warm-up, faster steps)
    compile_cache_dir: str | None = None  # where compiled kernels persist across restarts (else torch's /tmp)
    safety_checker: bool = False  # run instruct-pix2pix's NSFW checker on every output
    offload: bool = False  # keep the LLM and the UNet/VAE on the GPU in turn (16 GB cards)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EngineSettings:
        env = os.environ if env is None else env
        max_side = env.get("MGIE_MAX_SIDE", "512")
        try:
            max_side_int = int(max_side)
        except ValueError:
            raise BadRequestError(f"MGIE_MAX_SIDE must be a whole number of pixels, not {max_side!r}.") from None
        return cls(
            ckpt_dir=env.get("MGIE_CKPT_DIR") or None,
            ckpt_repo=env.get("MGIE_CKPT_REPO") or DEFAULT_CKPT_REPO,
            ip2p=env.get("MGIE_IP2P") or DEFAULT_IP2P,
            clip=env.get("MGIE_CLIP") or None,
            device=env.get("MGIE_DEVICE") or "auto",
            dtype=env.get("MGIE_DTYPE") or "auto",
            max_side=max_side_int,
            max_batch=_positive_int(env, "MGIE_MAX_BATCH", 8),
            compile=(env.get("MGIE_COMPILE") or "").strip().lower() in ("1", "true", "yes", "on"),
            compile_cache_dir=env.get("MGIE_COMPILE_CACHE_DIR") or None,
            safety_checker=(env.get("MGIE_SAFETY_CHECKER") or "").strip().lower() in ("1", "true", "yes", "on"),
            offload=(env.get("MGIE_OFFLOAD") or "").strip().lower() in ("1", "true", "yes", "on"),
        )

    def device_list(self) -> list[str]:
        """One entry per worker: "auto" means every visible GPU (or the CPU); a comma list names them."""
        import torch

        name = self.device.strip().lower()
        if name == "auto":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            return [f"cuda:{i}" for i in range(count)] or ["cpu"]
        names = [part.strip() for part in name.split(",") if part.strip()]
        for part in names:
            dataclasses.replace(self, device=part).torch_device()  # validates each
        return names

    def torch_device(self) -> torch.device:
        import torch

        name = self.device.strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if "," in name:
            raise BadRequestError("This setting names several devices; each worker takes one (see device_list).")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise BadRequestError(f"MGIE_DEVICE must be auto, cpu, cuda or cuda:N, not {self.device!r}.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BadRequestError(f"MGIE_DEVICE={self.device} but no CUDA GPU is visible to PyTorch.")
        return device

    def torch_dtype(self, device: torch.device | None = None) -> torch.dtype:
        """fp16 on GPU and fp32 on CPU unless MGIE_DTYPE says otherwise (CPU half math is slow)."""
        import torch

        name = self.dtype.strip().lower()
        if name == "auto":
            device = device or self.torch_device()
            return torch.float16 if device.type == "cuda" else torch.float32
        if name not in _DTYPES:
            raise BadRequestError(f"MGIE_DTYPE must be auto, fp16, bf16 or fp32, not {self.dtype!r}.")
        return getattr(torch, _DTYPES[name])


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name) or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"{name} must be a whole number, not {raw!r}.") from None
    if value < 1:
        raise BadRequestError(f"{name} must be at least 1.")
    return value
