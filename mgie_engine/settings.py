"""Engine settings, read from the environment and a `.env` file, every value checked before anything loads.

The parsers here are shared with the bot's settings (``bot.config``) so that a malformed value, engine or bot,
ends the same way: one :class:`SettingsError` naming the setting and what it accepts. Nothing here imports
torch: a typo must be reported in a fraction of a second, not after the models load.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BadRequestError, SettingsError

DEFAULT_CKPT_REPO = "tsujuifu/ml-mgie"
DEFAULT_IP2P = "timbrooks/instruct-pix2pix"
MAX_SIDE_RANGE = (64, 2048)  # the UNet was trained at 256-512 px; memory grows as the side squared
MAX_BATCH_RANGE = (1, 256)
SIZE_STEP_RANGE = (8, 256)  # px; a multiple of 8, the VAE's factor

if TYPE_CHECKING:
    import torch

_DTYPES = {"fp16": "float16", "float16": "float16", "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp32": "float32", "float32": "float32"}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_ONE_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def load_env_file(start: Path | None = None) -> Path | None:
    """Load the first `.env` found from ``start`` (default: the current directory) upwards; return its path.

    Values already in the environment win. Searching from the current directory, not from the installed
    package's folder (python-dotenv's default), is what makes a non-editable install find the user's `.env`.
    """
    from dotenv import load_dotenv

    folder = (start or Path.cwd()).resolve()
    for candidate in (folder, *folder.parents):
        path = candidate / ".env"
        if path.is_file():
            load_dotenv(path, override=False)
            return path
    return None


def _raw(env: Mapping[str, str], name: str) -> str:
    return (env.get(name) or "").strip()


def read_int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """A whole number within [low, high]; empty or unset means ``default``."""
    raw = _raw(env, name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number from {low} to {high}, not {raw[:40]!r}.") from None
    if not low <= value <= high:
        raise SettingsError(f"{name} must be a whole number from {low} to {high}, not {value}.")
    return value


def read_float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    """A finite number of seconds (or the like) within [low, high]; empty or unset means ``default``."""
    raw = _raw(env, name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number from {low:g} to {high:g}, not {raw[:40]!r}.") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise SettingsError(f"{name} must be a number from {low:g} to {high:g}, not {raw[:40]}.")
    return value


def read_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """true/false, 1/0, yes/no or on/off; anything else is refused rather than silently read as false."""
    raw = _raw(env, name).lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise SettingsError(f"{name} must be true or false (or 1/0), not {raw[:40]!r}.")


def read_device(env: Mapping[str, str], name: str = "MGIE_DEVICE") -> str:
    """auto, cpu, cuda, cuda:N or a comma list of those; whether the GPU exists is checked when workers start."""
    raw = _raw(env, name) or "auto"
    parts = [part.strip() for part in raw.lower().split(",")]
    if raw.lower() == "auto" or (all(_ONE_DEVICE.fullmatch(part) for part in parts)):
        return raw
    raise SettingsError(f"{name} must be auto, cpu, cuda, cuda:N or a list such as cuda:0,cuda:1, "
                        f"not {raw[:40]!r}.")


def read_dtype(env: Mapping[str, str], name: str = "MGIE_DTYPE") -> str:
    raw = _raw(env, name) or "auto"
    if raw.lower() != "auto" and raw.lower() not in _DTYPES:
        raise SettingsError(f"{name} must be auto, fp16, bf16 or fp32, not {raw[:40]!r}.")
    return raw


def read_compile(env: Mapping[str, str], name: str = "MGIE_COMPILE") -> bool | None:
    """auto (None: decided per device, ``EngineSettings.compile_on``) or a flag that forces it."""
    raw = _raw(env, name).lower()
    if raw in ("", "auto"):
        return None
    if raw in _TRUE or raw in _FALSE:
        return raw in _TRUE
    raise SettingsError(f"{name} must be auto, 1 (on) or 0 (off), not {raw[:40]!r}.")


def read_size_step(env: Mapping[str, str], name: str = "MGIE_SIZE_STEP") -> int | None:
    """auto (None: ``EngineSettings.working_step`` decides) or a whole number of pixels, a multiple of 8."""
    raw = _raw(env, name)
    if raw.lower() in ("", "auto"):
        return None
    low, high = SIZE_STEP_RANGE
    accepted = f"{name} must be auto or a multiple of 8 from {low} to {high}"
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{accepted}, not {raw[:40]!r}.") from None
    if not low <= value <= high or value % 8:
        raise SettingsError(f"{accepted}, not {value}.")
    return value


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
    # The working sizes' grid in px (images.snap_size; results come back at the fitted size). None
    # (MGIE_SIZE_STEP=auto): coarse on compiling workers, the VAE's factor elsewhere (``working_step``).
    size_step: int | None = None
    # torch.compile the UNet, VAE and decoder (faster steps; compiled in the background while eager serves).
    # None (MGIE_COMPILE=auto): on for CUDA, off for the CPU and under offload (``compile_on``).
    compile: bool | None = None
    # Compile in a child process while this one serves eagerly (compile_child.py). None (MGIE_COMPILE_CHILD=auto):
    # when the card has room for a second copy of the models and the compile cache is not warm yet.
    compile_child: bool | None = None
    # At most this many compile children side by side, one per independent warm-up group (0: as many as the
    # free memory holds; compile_child.how_many).
    compile_children: int = 0
    # sys.setswitchinterval while the compile thread runs beside the serving thread (serving_modes.py); 0: as is.
    compile_switch_interval: float = 0.0005
    # Before the compile children start and before each warm-up batch compiled in this process, wait up to this many
    # seconds while the serving loop has edits, so they run at eager speed, not beside the compile (serving_modes.py;
    # 0: never wait).
    compile_give_way: float = 10.0
    compile_cache_dir: str | None = None  # root of the kept compile caches (else <data_dir>/compile-cache)
    # The denoising steps compiled ahead of time, saved in the compile cache and loaded by later starts instead
    # of traced again (saved_steps.py). Experimental, off by default: it crashed workers on torch 2.11 (bench/NOTES.md).
    compile_aot: bool = False
    data_dir: str = "./data"  # MGIE_DATA_DIR, as the bot reads it: the compile cache lives under it by default
    safety_checker: bool = False  # run instruct-pix2pix's NSFW checker on every output
    offload: bool = False  # keep the LLM and the UNet/VAE on the GPU in turn (16 GB cards)
    preview_seconds: float = 3.0  # live previews: one per job every this many seconds (0: none from this worker)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EngineSettings:
        """Every MGIE_* engine setting, checked; raises SettingsError naming the first bad one."""
        env = os.environ if env is None else env
        return cls(
            ckpt_dir=_raw(env, "MGIE_CKPT_DIR") or None,
            ckpt_repo=_raw(env, "MGIE_CKPT_REPO") or DEFAULT_CKPT_REPO,
            ip2p=_raw(env, "MGIE_IP2P") or DEFAULT_IP2P,
            clip=_raw(env, "MGIE_CLIP") or None,
            device=read_device(env),
            dtype=read_dtype(env),
            max_side=read_int(env, "MGIE_MAX_SIDE", 512, *MAX_SIDE_RANGE),
            max_batch=read_int(env, "MGIE_MAX_BATCH", 8, *MAX_BATCH_RANGE),
            size_step=read_size_step(env),
            compile=read_compile(env),
            compile_child=read_compile(env, "MGIE_COMPILE_CHILD"),
            compile_children=read_int(env, "MGIE_COMPILE_CHILDREN", 0, 0, 16),
            compile_switch_interval=read_float(env, "MGIE_COMPILE_SWITCH_INTERVAL", 0.0005, 0.0, 0.1),
            compile_give_way=read_float(env, "MGIE_COMPILE_GIVE_WAY", 10.0, 0.0, 600.0),
            compile_cache_dir=_raw(env, "MGIE_COMPILE_CACHE_DIR") or None,
            compile_aot=read_flag(env, "MGIE_COMPILE_AOT", False),
            data_dir=_raw(env, "MGIE_DATA_DIR") or "./data",
            safety_checker=read_flag(env, "MGIE_SAFETY_CHECKER", False),
            offload=read_flag(env, "MGIE_OFFLOAD", False),
            preview_seconds=read_float(env, "MGIE_PREVIEW_SECONDS", 3.0, 0.0, 3600.0),
        )

    def compile_on(self, device: torch.device) -> bool:
        """Whether a worker on ``device`` compiles: MGIE_COMPILE=1/0 decide; auto is on for CUDA without
        offload (offloaded weights move, so compiled CUDA graphs could not keep their addresses)."""
        if self.compile is not None:
            return self.compile
        return device.type == "cuda" and not self.offload

    def working_step(self, compiles: bool, vae_factor: int) -> int:
        """The grid the working sizes are snapped to (``images.snap_size``), a multiple of ``vae_factor``.

        MGIE_SIZE_STEP when set. Otherwise a compiling worker keeps each side to at most 16 lengths (32 px at
        a 512 max side): every new latent size records CUDA graphs that are never freed, so a fine grid grows
        its memory for months and keeps edits waiting on recordings. Eager workers record nothing and keep the
        VAE's own grid, their output unchanged.
        """
        if self.size_step is not None:
            step = self.size_step
        elif compiles:
            step = max(vae_factor, self.max_side // 16 // vae_factor * vae_factor)
        else:
            step = vae_factor
        return -(-step // vae_factor) * vae_factor

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
            raise SettingsError(f"MGIE_DEVICE must be auto, cpu, cuda or cuda:N, not {self.device!r}.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SettingsError(f"MGIE_DEVICE={self.device} but no CUDA GPU is visible to PyTorch "
                                "(set MGIE_DEVICE=cpu, or install the CUDA build of torch).")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise SettingsError(f"MGIE_DEVICE={self.device} but PyTorch sees only {torch.cuda.device_count()} GPU(s) "
                                "(numbered from cuda:0).")
        return device

    def torch_dtype(self, device: torch.device | None = None) -> torch.dtype:
        """fp16 on GPU and fp32 on CPU unless MGIE_DTYPE says otherwise (CPU half math is slow)."""
        import torch

        name = self.dtype.strip().lower()
        if name == "auto":
            device = device or self.torch_device()
            return torch.float16 if device.type == "cuda" else torch.float32
        if name not in _DTYPES:
            raise SettingsError(f"MGIE_DTYPE must be auto, fp16, bf16 or fp32, not {self.dtype!r}.")
        return getattr(torch, _DTYPES[name])

