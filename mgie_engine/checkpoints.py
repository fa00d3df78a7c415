"""Finding and reading checkpoint files in the layouts the weights were released in.

Everything here works on paths and state dicts; building modules is `models.py`'s job. Each problem
raises an error that names the file and says how to get it, since a self-hoster's first run is
usually where a checkpoint goes missing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, ModelUnavailableError

log = logging.getLogger(__name__)

LLAVA_DIR = "LLaVA-7B-v1"
MGIE_DIR = "mgie_7b"
LLAVA_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "pytorch_model.bin.index.json")
MGIE_FILES = ("mllm.pt", "unet.pt")
IP2P_FILES = ("scheduler/scheduler_config.json", "unet/config.json", "vae/config.json")
IP2P_PATTERNS = ["model_index.json", "scheduler/*", "unet/config.json", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors"]
CLIP_FILES = ("config.json", "preprocessor_config.json")
CLIP_PATTERNS = ["config.json", "preprocessor_config.json", "model.safetensors"]

MGIE_PATTERNS = [f"{LLAVA_DIR}/*", f"{MGIE_DIR}/*"]


def download_command(repo: str, patterns: Iterable[str]) -> str:
    """The `hf download` line that fetches the files we use from ``repo`` (huggingface_hub's CLI is `hf`;
    the old `huggingface-cli` is gone). The README shows the same commands; a test keeps them in step."""
    include = " ".join(f'--include "{p}"' if "*" in p else f"--include {p}" for p in patterns)
    return f"hf download {repo} {include} --local-dir ./ckpt/{repo.rsplit('/', 1)[-1]}"


def get_weights_hint(setting: str, repo: str, patterns: Iterable[str]) -> str:
    """How to put one part on disk, and exactly which setting to point at it."""
    folder = repo.rsplit("/", 1)[-1]
    return (f"run `{download_command(repo, patterns)}` on a machine with internet access, copy the ckpt/{folder} "
            f"folder to this machine and set {setting}=/full/path/to/ckpt/{folder} in .env.")


def mgie_weights_hint(repo: str) -> str:
    return ("To get the MGIE weights (CC-BY-NC; LLaMA's terms apply), "
            + get_weights_hint("MGIE_CKPT_DIR", repo, MGIE_PATTERNS)
            + " Or leave MGIE_CKPT_DIR empty to fetch them into the Hugging Face cache on first run.")


def _reason(err: BaseException) -> str:
    """An exception as one short clause: one line, no trailing period (the caller's sentence goes on)."""
    text = " ".join(str(err).split()).rstrip(".") or "no details"
    return f"{type(err).__name__}: {text[:300]}"


def _download(repo_id: str, allow_patterns: list[str], local_dir: Path | None, what: str, setting: str) -> Path:
    """snapshot_download with a message a self-hoster can act on when it fails."""
    from huggingface_hub import snapshot_download

    log.info("Fetching %s from the Hugging Face Hub (%s); this happens once.", what, repo_id)
    try:
        path = snapshot_download(repo_id=repo_id, allow_patterns=allow_patterns,
                                 local_dir=str(local_dir) if local_dir else None)
    except Exception as err:  # offline, gated, missing repo, disk full: all end the same way for the user
        raise ModelUnavailableError(
            f"Could not get {what} from the Hugging Face Hub repo '{repo_id}' ({_reason(err)}). "
            f"If this machine is offline, {get_weights_hint(setting, repo_id, allow_patterns)}"
        ) from err
    return Path(path)


def _missing(folder: Path, names: Iterable[str]) -> list[str]:
    return [name for name in names if not (folder / name).is_file()]


def resolve_mgie_dir(ckpt_dir: str | None, repo: str) -> Path:
    """The folder holding ``LLaVA-7B-v1/`` and ``mgie_7b/``; fetched from the Hub when absent."""
    required = [f"{LLAVA_DIR}/{n}" for n in LLAVA_FILES] + [f"{MGIE_DIR}/{n}" for n in MGIE_FILES]
    patterns = MGIE_PATTERNS
    if ckpt_dir is None:
        return _download(repo, patterns, None, "the MGIE checkpoints", "MGIE_CKPT_DIR")
    folder = Path(ckpt_dir).expanduser()
    missing = _missing(folder, required)
    if missing:
        log.warning("MGIE_CKPT_DIR=%s lacks %s; trying the Hub.", folder, ", ".join(missing))
        try:
            _download(repo, patterns, folder, "the MGIE checkpoints", "MGIE_CKPT_DIR")
        except ModelUnavailableError as err:
            raise CheckpointError(
                f"{folder / missing[0]} is missing (MGIE_CKPT_DIR={folder}) and the Hub could not fill it in "
                f"({_reason(err.__cause__ or err)}). " + mgie_weights_hint(repo)
            ) from err
        still = _missing(folder, required)
        if still:
            raise CheckpointError(f"{folder / still[0]} is missing (MGIE_CKPT_DIR={folder}). "
                                  + mgie_weights_hint(repo))
    return folder


def resolve_component(spec: str, required: Iterable[str], patterns: list[str], what: str) -> Path:
    """A local folder as is, or a Hub id fetched (only the files we use) into the HF cache."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        missing = _missing(folder, required)
        if missing:
            raise CheckpointError(f"{folder / missing[0]} is missing from the {what} folder.")
        return folder
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        setting = "MGIE_CLIP" if "CLIP" in what else "MGIE_IP2P"
        raise CheckpointError(f"The {what} folder {spec} does not exist (and it is not a Hub repo id); "
                              f"check {setting}.")
    folder = _download(spec, patterns, None, what, "MGIE_CLIP" if "CLIP" in what else "MGIE_IP2P")
    missing = _missing(folder, required)
    if missing:
        raise CheckpointError(f"The Hub repo {spec} has no {missing[0]}; is it really a {what} repo?")
    return folder


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing.") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); download it again.") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object.")
    return data


def load_torch_file(path: Path) -> dict[str, Any]:
    """A pickled state dict, read with weights_only (no code runs) and memory-mapped when possible."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing. " + mgie_weights_hint("tsujuifu/ml-mgie"))
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint ({err}); download it again.") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a state dict (a mapping of names to tensors).")
    return data


def iter_sharded_state_dict(folder: Path) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield (shard name, tensors) for a ``pytorch_model.bin.index.json`` checkpoint, one shard at a time."""
    index = read_json(folder / "pytorch_model.bin.index.json")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{folder / 'pytorch_model.bin.index.json'} has no weight_map.")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        tensors = load_torch_file(folder / shard)
        expected = {k for k, v in weight_map.items() if v == shard}
        absent = expected - tensors.keys()
        if absent:
            raise CheckpointError(f"{folder / shard} lacks {sorted(absent)[0]} (listed in the index); download it again.")
        yield shard, tensors


def require_tensor(sd: dict[str, Any], key: str, path: Path, ndim: int | None = None) -> torch.Tensor:
    value = sd.get(key)
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{path} has no tensor '{key}'; is it the right file?")
    if ndim is not None and value.ndim != ndim:
        raise CheckpointError(f"{path}: '{key}' has shape {tuple(value.shape)}, expected {ndim} dimensions.")
    return value
