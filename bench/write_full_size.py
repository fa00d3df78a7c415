"""Write full-size MGIE checkpoints with random fp16 weights, in the released layout, to a folder.

    python bench/write_full_size.py FOLDER [--tokenizer-dir DIR] [--small]

The folders, file names, formats and key names are those of ``mgie_engine.tiny`` (the layout the loader
reads: ``LLaVA-7B-v1/`` with two pickled ``pytorch_model-*.bin`` shards and their index, ``mgie_7b/mllm.pt``
and ``unet.pt``, instruct-pix2pix's configs and VAE safetensors, CLIP's safetensors), at the released sizes:
about 15.5 GB. It exists so that ``bench/load_weights.py`` and ``bench/coldstart.py`` time a load from disk.

Fast: modules are built on the meta device only to name and shape their tensors; each tensor is drawn once,
in fp16, on the GPU when there is one, and written as is (no fp32 copies, no module with real weights).
The LLM answers as ``bench/full_size.py``'s does (40 words, [IMG0]..[IMG7], </s>), so an edit decodes the ~48
tokens a trained MGIE writes. Not written, as the loader never reads them: a vision tower bundled in the
LLaVA shards and instruct-pix2pix's own UNet weights (``unet.pt`` replaces them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "bench") not in sys.path:
    sys.path.insert(0, str(ROOT / "bench"))

from full_size import LLAMA_7B, SMALL, plant_answer  # noqa: E402

from mgie_engine.models import IMG_TOKENS, RANDOM_WEIGHTS_MARKER, load_tokenizer  # noqa: E402
from mgie_engine.tiny.writer import LLAVA_VOCAB, TinyPaths  # noqa: E402

DTYPE = torch.float16
LLM_STD = 0.02  # LLaMA's initializer_range, as bench/full_size.py's modules get by default
CLIP_VISION_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14)
CLIP_TEXT_L14 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     max_position_embeddings=77, vocab_size=49408)
SMALL_CLIP_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       max_position_embeddings=77, vocab_size=1000)
UNET_SD15 = dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, layers_per_block=2)
VAE_SD = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
EDIT_HEAD = dict(width=512, num_queries=77, out_width=768, encoder_layers=4, decoder_layers=4, ffn_width=2048)
SMALL_EDIT_HEAD = dict(width=16, num_queries=77, out_width=768, encoder_layers=2, decoder_layers=2, ffn_width=32)
# The configs the released instruct-pix2pix folder holds beside the weights (as mgie_engine/tiny writes them).
SCHEDULER_CONFIG = {
    "_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.15.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None}
MODEL_INDEX = {
    "_class_name": "StableDiffusionInstructPix2PixPipeline", "_diffusers_version": "0.15.0.dev0",
    "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
    "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"], "text_encoder": [None, None],
    "tokenizer": [None, None], "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}

Progress = Callable[[str], None]


def _dump(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class RandomWeights:
    """Draws a module's state dict tensor by tensor: norms 1, biases 0, the rest normal with a std that keeps
    activations in range (``llm_std`` for the LLM, 1/sqrt(3 fan-in) like PyTorch's default init elsewhere)."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.gen = torch.Generator(device).manual_seed(seed)

    def state_dict(self, module: nn.Module, std: float | None = None) -> dict[str, torch.Tensor]:
        modules = dict(module.named_modules())
        out = {}
        for key, meta in module.state_dict().items():
            owner = modules.get(key.rpartition(".")[0])
            is_norm = isinstance(owner, nn.LayerNorm | nn.GroupNorm) or type(owner).__name__.endswith("RMSNorm")
            if meta.ndim == 0:
                out[key] = torch.tensor(math.log(1 / 0.07), dtype=DTYPE)  # CLIP's logit_scale, the only scalar
            elif is_norm or key.endswith(".bias"):
                out[key] = (torch.ones if is_norm and key.endswith("weight") else torch.zeros)(meta.shape, dtype=DTYPE)
            else:
                fan_in = meta.numel() // meta.shape[0] if meta.ndim > 1 else meta.shape[0]
                out[key] = self.normal(meta.shape, std if std is not None else 1 / math.sqrt(3 * fan_in))
        return out

    def normal(self, shape: torch.Size | tuple[int, ...], std: float) -> torch.Tensor:
        t = torch.empty(shape, dtype=DTYPE, device=self.device).normal_(0.0, std, generator=self.gen)
        return t.cpu() if t.device.type != "cpu" else t


def _nbytes(sd: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def _llava_config(llm: dict, clip_width: int) -> dict:
    """LLaVA-7B-v1's config.json, as released (``mgie_engine/tiny``'s keys) with these sizes."""
    return {
        "_name_or_path": "LLaVA-7B-v1", "architectures": ["LlavaLlamaForCausalLM"], "bos_token_id": 1,
        "eos_token_id": 2, "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": llm["hidden_size"],
        "initializer_range": 0.02, "intermediate_size": llm["intermediate_size"], "max_position_embeddings": 2048,
        "max_sequence_length": 2048, "mm_hidden_size": clip_width, "mm_use_im_start_end": True,
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14", "model_type": "llava",
        "num_attention_heads": llm["num_attention_heads"], "num_hidden_layers": llm["num_hidden_layers"],
        "pad_token_id": 0, "rms_norm_eps": 1e-06, "sep_image_conv_front": False, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.28.0.dev0", "tune_mm_mlp_adapter": False,
        "use_cache": True, "use_mm_proj": True, "vocab_size": LLAVA_VOCAB}


def _write_llava(folder: Path, llm: dict, clip_width: int, rnd: RandomWeights, shards: int,
                 say: Progress) -> dict[str, torch.Tensor]:
    """Config, index and the pickled shards, one shard in memory at a time; returns the embeddings and LM
    head (mllm.pt grows them by the [IMG] rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = _llava_config(llm, clip_width)
    _dump(folder / "config.json", config)
    _dump(folder / "generation_config.json", {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                                              "pad_token_id": 0, "transformers_version": "4.28.0.dev0"})
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=LLAVA_VOCAB, tie_word_embeddings=False, **llm))
    keys = list(model.state_dict())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    head_dim = llm["hidden_size"] // llm["num_attention_heads"]
    extra = {"model.mm_projector.weight": (llm["hidden_size"], clip_width), "model.mm_projector.bias": (llm["hidden_size"],)}
    keys += list(extra)
    shapes.update(extra)
    sizes = [math.prod(shapes[k]) for k in keys]
    per_shard = sum(sizes) / shards
    bounds, running = [0], 0
    for i, size in enumerate(sizes):
        running += size
        if running >= per_shard * len(bounds) and len(bounds) < shards:
            bounds.append(i + 1)
    bounds.append(len(keys))
    weight_map, total, kept = {}, 0, {}
    for n in range(shards):
        name = f"pytorch_model-{n + 1:05d}-of-{shards:05d}.bin"
        sd = {}
        for key in keys[bounds[n]:bounds[n + 1]]:
            if key.endswith(".bias"):
                sd[key] = torch.zeros(shapes[key], dtype=DTYPE)
            elif key.endswith("norm.weight"):
                sd[key] = torch.ones(shapes[key], dtype=DTYPE)
            else:
                sd[key] = rnd.normal(shapes[key], LLM_STD)
            if key.endswith("self_attn.o_proj.weight"):  # old LLaMA checkpoints carry it; the loader skips it
                inv = key.replace("o_proj.weight", "rotary_emb.inv_freq")
                sd[inv] = (1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(DTYPE)
        say(f"{name}: {_nbytes(sd) / 1e9:.2f} GB")
        torch.save(sd, folder / name)
        weight_map.update({k: name for k in sd})
        total += _nbytes(sd)
        kept.update({k: sd[k] for k in ("model.embed_tokens.weight", "lm_head.weight") if k in sd})
        del sd
    _dump(folder / "pytorch_model.bin.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return kept


def _write_clip(folder: Path, vision: dict, text: dict, rnd: RandomWeights) -> None:
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config={**text, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
                        vision_config=vision, projection_dim=768)
    with torch.device("meta"):
        model = CLIPModel(config)
    config.save_pretrained(folder)
    save_file(rnd.state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    side = vision["image_size"]
    _dump(folder / "preprocessor_config.json", {
        "crop_size": {"height": side, "width": side}, "do_center_crop": True, "do_normalize": True,
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": {"shortest_edge": side}})


def _unet_and_vae(unet_dims: dict, vae_dims: dict):
    import diffusers

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(
            sample_size=64, in_channels=8, out_channels=4, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **unet_dims)
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=512, scaling_factor=0.18215,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **vae_dims)
    return unet, vae


def _write_ip2p(folder: Path, unet: nn.Module, vae: nn.Module, rnd: RandomWeights) -> None:
    from safetensors.torch import save_file

    unet.save_config(folder / "unet")  # its weights are never read: mgie_7b/unet.pt replaces them
    vae.save_config(folder / "vae")
    save_file(rnd.state_dict(vae), str(folder / "vae" / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    _dump(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    _dump(folder / "model_index.json", MODEL_INDEX)


def _write_mllm(path: Path, llava: Path, llava_sd: dict[str, torch.Tensor], head_dims: dict, hidden: int,
                rnd: RandomWeights, seed: int) -> None:
    """Embeddings and LM head grown by the eight [IMG] rows (the answer planted), the edit head, ``emb``."""
    from mgie_engine.edit_head import EditHead

    embed = torch.cat([llava_sd["model.embed_tokens.weight"], rnd.normal((len(IMG_TOKENS), hidden), LLM_STD)])
    head = torch.cat([llava_sd["lm_head.weight"], rnd.normal((len(IMG_TOKENS), hidden), LLM_STD)])
    emb = embed[LLAVA_VOCAB:].clone().unsqueeze(0)  # the [IMG] embeddings as trained, before any planting
    tokenizer, _, ids = load_tokenizer(llava, {"eos_token_id": 2})
    colon = tokenizer.encode(":", add_special_tokens=False).ids[-1]
    plant_answer(embed, head, colon, 32000, ids.img, ids.eos[0], seed)
    with torch.device("meta"):
        edit_head = EditHead(llm_width=hidden, **head_dims)
    mllm = {"model.embed_tokens.weight": embed, "lm_head.weight": head}
    mllm.update({f"edit_head.{k}": v for k, v in rnd.state_dict(edit_head).items()})
    mllm["emb"] = emb
    torch.save(mllm, path)


def write_full_size(root: str | Path, *, small: bool = False, seed: int = 0, tokenizer_dir: Path | None = None,
                    device: torch.device | None = None, progress: Progress | None = None) -> tuple[TinyPaths, dict]:
    """Write the four folders under ``root`` (``small``: the shrunken dims of ``full_size.SMALL``, for a CPU dry
    run); returns their paths and what was written (seconds and GB per part)."""
    say = progress or (lambda msg: print(msg, flush=True))
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rnd = RandomWeights(seed, device)
    paths = TinyPaths.under(root)
    llava, mgie = paths.mgie / "LLaVA-7B-v1", paths.mgie / "mgie_7b"
    for folder in (llava, mgie, paths.ip2p, paths.clip):
        folder.mkdir(parents=True, exist_ok=True)
    llm = {**LLAMA_7B, **(SMALL["llm"] if small else {})}
    vision = {**CLIP_VISION_L14, **(SMALL["clip"] if small else {})}
    stats: dict = {"small": small, "seed": seed, "parts": {}}

    def timed(name: str, fn, files: Callable[[], list[Path]]):
        started = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - started
        gb = sum(f.stat().st_size for f in files()) / 1e9
        stats["parts"][name] = {"seconds": seconds, "gb": gb}
        say(f"wrote {name}: {gb:.2f} GB in {seconds:.1f} s")
        return result

    if tokenizer_dir is not None:
        for f in (Path(tokenizer_dir) / "LLaVA-7B-v1").iterdir():
            shutil.copy2(f, llava / f.name)
    else:
        from mgie_engine.tiny.tokenizer import write_llama_tokenizer

        write_llama_tokenizer(llava, seed=seed)
    kept = timed("llm", lambda: _write_llava(llava, llm, vision["hidden_size"], rnd, shards=2, say=say),
                 lambda: list(llava.glob("pytorch_model-*.bin")))
    timed("mllm", lambda: _write_mllm(mgie / "mllm.pt", llava, kept, SMALL_EDIT_HEAD if small else EDIT_HEAD,
                                      llm["hidden_size"], rnd, seed), lambda: [mgie / "mllm.pt"])
    kept.clear()  # the 0.5 GB of embeddings are no longer needed
    timed("clip", lambda: _write_clip(paths.clip, vision, SMALL_CLIP_TEXT if small else CLIP_TEXT_L14, rnd),
          lambda: [paths.clip / "model.safetensors"])
    unet, vae = _unet_and_vae(SMALL["unet"] if small else UNET_SD15, SMALL["vae"] if small else VAE_SD)
    timed("unet", lambda: torch.save(rnd.state_dict(unet), mgie / "unet.pt"), lambda: [mgie / "unet.pt"])
    timed("vae", lambda: _write_ip2p(paths.ip2p, unet, vae, rnd),
          lambda: [paths.ip2p / "vae" / "diffusion_pytorch_model.safetensors"])
    (paths.mgie / RANDOM_WEIGHTS_MARKER).write_text(
        "These checkpoints hold random weights written by bench/write_full_size.py, for benchmarks.\n", encoding="utf-8")
    stats["total_gb"] = sum(p["gb"] for p in stats["parts"].values())
    stats["total_seconds"] = sum(p["seconds"] for p in stats["parts"].values())
    return paths, stats


def evict_page_cache(root: Path) -> None:
    """Drop ``root``'s files from the page cache (per file, as their owner may; nothing machine-wide), so that
    the next load reads the disk, as a first start after a boot or a download does."""
    files = [f for f in Path(root).rglob("*") if f.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def ensure_full_size(root: Path, small: bool, tokenizer_dir: Path | None, progress: Progress | None = None) -> TinyPaths:
    """The checkpoint under ``root``, written first when it is not there yet (a finished write leaves a
    ``written.json`` beside it)."""
    done = Path(root) / "written.json"
    if done.is_file() and json.loads(done.read_text()).get("small") == small:
        return TinyPaths.under(root)
    paths, stats = write_full_size(root, small=small, tokenizer_dir=tokenizer_dir, progress=progress)
    done.write_text(json.dumps(stats, indent=2) + "\n")
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--tokenizer-dir", type=Path, default=None,
                   help="a folder holding LLaVA-7B-v1/tokenizer.json etc. (default: write the tiny tokenizer)")
    p.add_argument("--small", action="store_true", help="shrunken dims, for a dry run on a CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    paths, stats = write_full_size(args.folder, small=args.small, seed=args.seed, tokenizer_dir=args.tokenizer_dir)
    (args.folder / "written.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"wrote {stats['total_gb']:.2f} GB in {stats['total_seconds']:.1f} s", flush=True)
    for key, value in paths.env().items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
