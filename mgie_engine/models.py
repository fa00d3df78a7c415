"""Load every MGIE part from the released layout, with sizes taken from the files themselves.

The same code loads the real 7B weights and the tiny random checkpoints of ``mgie_engine.tiny``.
Differences from Apple's demo that do not change the math: the LLaMA is plain ``LlamaForCausalLM``
(the name "llava" belongs to transformers' own class now) built on the meta device and filled shard by
shard; the 8 ``[IMG]`` rows come straight from ``mllm.pt`` instead of a mean-resize; the tokenizer is
``tokenizer.json`` as released; the instruct-pix2pix UNet weights are never read (``unet.pt`` replaces
them) and neither are its text encoder or safety checker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer
from torch import nn

from . import checkpoints as ck
from .conversation import IMAGE_END_TOKEN, IMAGE_PATCH_TOKEN, IMAGE_START_TOKEN, PromptPart
from .edit_head import EditHead
from .errors import CheckpointError
from .prompt_tokens import PromptEncoder
from .settings import EngineSettings
from .weight_copies import WeightCopier

log = logging.getLogger(__name__)

IMG_TOKENS = tuple(f"[IMG{i}]" for i in range(8))
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"
_LLAMA_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
               "rope_scaling", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias",
               "head_dim", "initializer_range")

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """The token ids the engine relies on."""

    bos: int
    eos: tuple[int, ...]
    im_patch: int
    im_start: int
    im_end: int
    img: tuple[int, ...]


@dataclasses.dataclass
class MgieModels:
    """Everything one loaded engine holds; read-only after load so jobs can share it."""

    tokenizer: Tokenizer
    add_bos: bool
    token_ids: TokenIds
    llm: nn.Module
    projector: nn.Linear
    vision: nn.Module
    vision_processor: Any
    vision_select_layer: int
    num_patches: int
    edit_head: EditHead
    img_embeds: torch.Tensor
    null_embeds: torch.Tensor
    unet: nn.Module
    vae: nn.Module
    scheduler_class: type
    scheduler_config: dict[str, Any]
    vae_scale_factor: int
    device: torch.device
    dtype: torch.dtype
    random_weights: bool
    sources: dict[str, str]
    prompt_encoder: PromptEncoder = dataclasses.field(init=False, repr=False)

    def new_scheduler(self) -> Any:
        """A fresh scheduler per job: schedulers keep per-run state (timesteps, step index)."""
        return self.scheduler_class.from_config(self.scheduler_config)

    def __post_init__(self) -> None:
        self.prompt_encoder = PromptEncoder(self.tokenizer, self.add_bos, self.token_ids.bos)

    def encode_prompt(self, parts: Sequence[PromptPart]) -> list[int]:
        """A prompt's ids; its ``UserText`` parts never yield a special token (``prompt_tokens.py``)."""
        return self.prompt_encoder.encode(parts)

    def decode(self, ids: list[int]) -> str:
        """Token ids back to text, special tokens included."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)


@contextlib.contextmanager
def _quiet_transformers():
    """from_pretrained warns about every unused CLIP text weight; that is expected here."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _token_id(tokenizer: Tokenizer, token: str, path: Path) -> int:
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise CheckpointError(f"{path} has no token {token}; is it the LLaVA-7B-v1 tokenizer?")
    return tid


def _special(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(llava: Path, config: dict[str, Any]) -> tuple[Tokenizer, bool, TokenIds]:
    """tokenizer.json as released, plus MGIE's eight [IMG] tokens appended as the demo does."""
    path = llava / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{path} could not be read ({err}); download it again.") from err
    tok_config = ck.read_json(llava / "tokenizer_config.json")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMG_TOKENS])
    bos = _token_id(tokenizer, _special(tok_config.get("bos_token")) or "<s>", path)
    eos_cfg = config.get("eos_token_id", tokenizer.token_to_id("</s>"))
    eos = tuple(eos_cfg) if isinstance(eos_cfg, list) else (int(eos_cfg),)
    ids = TokenIds(
        bos=bos, eos=eos,
        im_patch=_token_id(tokenizer, IMAGE_PATCH_TOKEN, path),
        im_start=_token_id(tokenizer, IMAGE_START_TOKEN, path),
        im_end=_token_id(tokenizer, IMAGE_END_TOKEN, path),
        img=tuple(_token_id(tokenizer, t, path) for t in IMG_TOKENS),
    )
    return tokenizer, bool(tok_config.get("add_bos_token", True)), ids


def _llama_config(raw: dict[str, Any], vocab_size: int, path: Path):
    from transformers import LlamaConfig

    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if not isinstance(raw.get(key), int):
            raise CheckpointError(f"{path} lacks '{key}'; is it LLaVA-7B-v1's config.json?")
    kwargs = {k: raw[k] for k in _LLAMA_KEYS if k in raw}
    if isinstance(kwargs.get("pad_token_id"), int) and kwargs["pad_token_id"] < 0:
        kwargs["pad_token_id"] = None  # the release's -1 means "no pad token"; transformers warns on every load
    return LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=False, **kwargs)


def _no_meta_left(module: nn.Module, what: str, path: Path) -> None:
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_meta:
            raise CheckpointError(f"{path} has no weights for {what} '{name}'; the file is incomplete.")


def load_llm(llava: Path, raw_config: dict[str, Any], mllm: dict[str, Any], mllm_path: Path,
             dtype: torch.dtype, progress: Progress, copier: WeightCopier | None = None) -> tuple[nn.Module, nn.Linear]:
    """LLaMA + the multimodal projector, filled shard by shard without a random init: each tensor goes from
    its memory-mapped file to ``copier``'s device in ``dtype`` (default: stays on the CPU)."""
    copier = copier or WeightCopier(torch.device("cpu"), dtype, staged=False)
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    embed = ck.require_tensor(mllm, "model.embed_tokens.weight", mllm_path, ndim=2)
    head = ck.require_tensor(mllm, "lm_head.weight", mllm_path, ndim=2)
    if embed.shape != head.shape:
        raise CheckpointError(f"{mllm_path}: embed_tokens {tuple(embed.shape)} and lm_head {tuple(head.shape)} differ.")
    config = _llama_config(raw_config, embed.shape[0], llava / "config.json")
    if embed.shape[1] != config.hidden_size:
        raise CheckpointError(f"{mllm_path}: embeddings are {embed.shape[1]} wide but config.json says "
                              f"hidden_size {config.hidden_size}; the two come from different models.")
    with torch.device("meta"):
        llm = LlamaForCausalLM(config)
    expected = set(llm.state_dict().keys())
    loaded: set[str] = set()
    projector_sd: dict[str, torch.Tensor] = {}

    def assign(sd: dict[str, torch.Tensor]) -> None:
        llm.load_state_dict(copier.place(sd), strict=False, assign=True)
        loaded.update(sd)

    for shard, tensors in ck.iter_sharded_state_dict(llava):
        progress(f"language model: {shard}")
        keep = {}
        for key, value in tensors.items():
            if key.startswith("model.mm_projector."):
                projector_sd[key.removeprefix("model.mm_projector.")] = value
            elif key in expected and key not in ("model.embed_tokens.weight", "lm_head.weight"):
                keep[key] = value
            # rotary inv_freq buffers, a bundled vision tower and the pre-MGIE embeddings are not needed
        assign(keep)
        del tensors, keep
    assign({"model.embed_tokens.weight": embed, "lm_head.weight": head})
    missing = sorted(expected - loaded)
    if missing:
        raise CheckpointError(f"{llava / 'pytorch_model.bin.index.json'}: no weights for '{missing[0]}' "
                              f"({len(missing)} missing); the LLaVA-7B-v1 download is incomplete.")
    llm.model.rotary_emb = LlamaRotaryEmbedding(config=config).to(copier.device)
    _no_meta_left(llm, "the language model", llava)

    if "weight" not in projector_sd or "bias" not in projector_sd:
        raise CheckpointError(f"{llava}: no model.mm_projector weights in the shards; is it LLaVA-7B-v1?")
    out_features, in_features = projector_sd["weight"].shape
    if out_features != config.hidden_size:
        raise CheckpointError(f"{llava}: mm_projector outputs {out_features}, hidden_size is {config.hidden_size}.")
    projector = nn.Linear(in_features, out_features, dtype=dtype, device="meta")
    projector.load_state_dict(copier.place(projector_sd), assign=True)
    return llm.eval(), projector.eval()


def load_vision(spec: str, dtype: torch.dtype) -> tuple[nn.Module, Any, Path]:
    """CLIP's vision tower and its image processor, from a local folder or the Hub."""
    from transformers import CLIPVisionModel

    try:  # transformers >= 5.2x: the PIL backend has its own class; older 5.x: the slow processor is PIL
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor as CLIPImageProcessorPil

    folder = ck.resolve_component(spec, ck.CLIP_FILES, ck.CLIP_PATTERNS, "CLIP vision tower")
    try:
        with _quiet_transformers():
            vision = CLIPVisionModel.from_pretrained(str(folder), dtype=dtype)
            # The PIL processor is the one the demo used; the torchvision one resizes slightly differently.
            processor = CLIPImageProcessorPil.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"The CLIP vision tower in {folder} could not be loaded: {err}") from err
    return vision.eval(), processor, folder


def load_diffusion(folder: Path, unet_path: Path, dtype: torch.dtype, copier: WeightCopier | None = None,
                   progress: Progress | None = None):
    """The InstructPix2Pix UNet (from ``unet.pt``, placed by ``copier`` as ``load_llm``'s weights are), VAE and
    scheduler of the instruct-pix2pix folder."""
    import diffusers

    copier = copier or WeightCopier(torch.device("cpu"), dtype, staged=False)
    sched_cfg = ck.read_json(folder / "scheduler" / "scheduler_config.json")
    class_name = sched_cfg.get("_class_name", "")
    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise CheckpointError(f"{folder / 'scheduler/scheduler_config.json'} names an unknown scheduler {class_name!r}.")
    scheduler_config = dict(scheduler_class.from_config(sched_cfg).config)

    unet_config = diffusers.UNet2DConditionModel.load_config(str(folder), subfolder="unet")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(unet_config)
    sd = ck.load_torch_file(unet_path)
    conv_in = ck.require_tensor(sd, "conv_in.weight", unet_path, ndim=4)
    if conv_in.shape[1] != unet.config.in_channels:
        raise CheckpointError(f"{unet_path}: conv_in takes {conv_in.shape[1]} channels, the instruct-pix2pix "
                              f"UNet config says {unet.config.in_channels}.")
    try:
        unet.load_state_dict(copier.place(sd), strict=True, assign=True)
    except RuntimeError as err:
        raise CheckpointError(f"{unet_path} does not fit the instruct-pix2pix UNet in {folder}: {err}") from err
    _no_meta_left(unet, "the UNet", unet_path)
    del sd
    if progress is not None:
        progress("VAE")
    try:
        with _quiet_transformers():
            vae = diffusers.AutoencoderKL.from_pretrained(str(folder), subfolder="vae", torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"The VAE in {folder / 'vae'} could not be loaded: {err}") from err
    return unet.eval(), vae.eval(), scheduler_class, scheduler_config


def load_models(settings: EngineSettings, progress: Progress | None = None, staged: bool | None = None) -> MgieModels:
    """Load all parts onto the configured device. Slow for real weights (15 GB); call once.

    The LLM and UNet weights go from their memory-mapped files straight to where they run (the device, or
    the CPU under offload) in the target dtype (``weight_copies.py``; ``staged`` False forces plain copies,
    for ``bench/load_weights.py``'s comparison)."""
    say = progress or (lambda msg: log.info("loading %s", msg))
    device = settings.torch_device()
    dtype = settings.torch_dtype(device)
    # With offload the pipeline brings the LLM and the UNet/VAE to the GPU in turn; they load to the CPU.
    big_device = torch.device("cpu") if settings.offload and device.type == "cuda" else device
    with WeightCopier(big_device, dtype, staged=staged) as copier:
        return _load_models(settings, say, device, dtype, copier)


def _load_models(settings: EngineSettings, say: Progress, device: torch.device, dtype: torch.dtype,
                 copier: WeightCopier) -> MgieModels:
    root = ck.resolve_mgie_dir(settings.ckpt_dir, settings.ckpt_repo)
    llava, mgie = root / ck.LLAVA_DIR, root / ck.MGIE_DIR
    raw_config = ck.read_json(llava / "config.json")
    if raw_config.get("model_type") not in ("llava", "llama"):
        log.warning("%s has model_type %r; expected 'llava'.", llava / "config.json", raw_config.get("model_type"))
    select_layer = int(raw_config.get("mm_vision_select_layer", -1))
    if not raw_config.get("mm_use_im_start_end", False):
        raise CheckpointError(f"{llava / 'config.json'}: MGIE needs mm_use_im_start_end true.")

    say("tokenizer")
    tokenizer, add_bos, token_ids = load_tokenizer(llava, raw_config)
    mllm_path = mgie / "mllm.pt"
    say("mllm.pt")
    mllm = ck.load_torch_file(mllm_path)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    rows = ck.require_tensor(mllm, "model.embed_tokens.weight", mllm_path, ndim=2).shape[0]
    if rows != vocab:
        raise CheckpointError(f"{mllm_path} has {rows} token embeddings but the tokenizer with MGIE's [IMG] tokens "
                              f"has {vocab}; the two files do not belong together.")
    llm, projector = load_llm(llava, raw_config, mllm, mllm_path, dtype, say, copier)

    say("edit head")
    head_sd = {k.removeprefix("edit_head."): v for k, v in mllm.items() if k.startswith("edit_head.")}
    edit_head = EditHead.from_state_dict(head_sd, mllm_path).to(dtype).eval()
    img_embeds = ck.require_tensor(mllm, "emb", mllm_path).reshape(1, len(IMG_TOKENS), -1).to(dtype)
    if img_embeds.shape[-1] != llm.config.hidden_size:
        raise CheckpointError(f"{mllm_path}: 'emb' is {img_embeds.shape[-1]} wide, the LLM {llm.config.hidden_size}.")
    del mllm, head_sd

    clip_spec = settings.clip or raw_config.get("mm_vision_tower")
    if not clip_spec:
        raise CheckpointError(f"{llava / 'config.json'} names no mm_vision_tower; set MGIE_CLIP.")
    say(f"vision tower ({clip_spec})")
    vision, processor, clip_folder = load_vision(clip_spec, dtype)
    vcfg = vision.config
    if vcfg.hidden_size != projector.in_features:
        raise CheckpointError(f"The CLIP tower in {clip_folder} is {vcfg.hidden_size} wide but LLaVA's mm_projector "
                              f"expects {projector.in_features}; set MGIE_CLIP to the tower LLaVA was trained with.")
    num_patches = (vcfg.image_size // vcfg.patch_size) ** 2

    say(f"instruct-pix2pix ({settings.ip2p})")
    ip2p = ck.resolve_component(settings.ip2p, ck.IP2P_FILES, ck.IP2P_PATTERNS, "instruct-pix2pix")
    unet, vae, scheduler_class, scheduler_config = load_diffusion(ip2p, mgie / "unet.pt", dtype, copier, say)
    if unet.config.cross_attention_dim != edit_head.hid2feat.out_features:
        raise CheckpointError(f"{mllm_path}: the edit head writes {edit_head.hid2feat.out_features}-wide features "
                              f"but the UNet attends over {unet.config.cross_attention_dim}.")

    say(f"the weights onto {device}")
    # With offload the pipeline brings the LLM and the UNet/VAE to the GPU in turn; never both at once.
    big = (lambda module: module) if settings.offload and device.type == "cuda" else (lambda module: module.to(device))
    models = MgieModels(
        tokenizer=tokenizer, add_bos=add_bos, token_ids=token_ids,
        llm=big(llm), projector=projector.to(device), vision=vision.to(device),
        vision_processor=processor, vision_select_layer=select_layer, num_patches=num_patches,
        edit_head=edit_head.to(device), img_embeds=img_embeds.to(device), null_embeds=torch.empty(0),
        unet=big(unet), vae=big(vae),
        scheduler_class=scheduler_class, scheduler_config=scheduler_config,
        vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
        device=device, dtype=dtype,
        random_weights=(root / RANDOM_WEIGHTS_MARKER).exists(),
        sources={"mgie": str(root), "clip": str(clip_folder), "ip2p": str(ip2p)},
    )
    with torch.inference_mode():
        zeros = torch.zeros(1, len(IMG_TOKENS), llm.config.hidden_size, dtype=dtype, device=device)
        models.null_embeds = models.edit_head(zeros, models.img_embeds)
    if models.random_weights:
        log.warning("These checkpoints in %s hold RANDOM weights (written by mgie_engine.tiny): "
                    "edits will be noise. Get the real weights for real edits.", root)
    return models
