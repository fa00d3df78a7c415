"""Write the four checkpoint folders (LLaVA-7B-v1/, mgie_7b/, instruct-pix2pix, CLIP) with tiny sizes.

File names, key names, dtypes and shapes (up to the sizes) follow the released files, so the loader
cannot tell them apart from the real ones except by size and the RANDOM_WEIGHTS marker.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..models import IMG_TOKENS, RANDOM_WEIGHTS_MARKER
from .tokenizer import write_llama_tokenizer

BASE_VOCAB = 32000
LLAVA_VOCAB = BASE_VOCAB + 3  # + <im_patch> <im_start> <im_end>
MGIE_VOCAB = LLAVA_VOCAB + len(IMG_TOKENS)


@dataclasses.dataclass(frozen=True)
class TinySizes:
    hidden: int = 32
    intermediate: int = 64
    layers: int = 2
    heads: int = 4
    clip_width: int = 32
    clip_layers: int = 3
    clip_image: int = 56
    clip_patch: int = 14
    head_width: int = 16
    head_queries: int = 77
    head_layers: int = 2
    cross_attention: int = 32


@dataclasses.dataclass(frozen=True)
class TinyPaths:
    root: Path
    mgie: Path  # MGIE_CKPT_DIR: holds LLaVA-7B-v1/ and mgie_7b/
    ip2p: Path  # MGIE_IP2P
    clip: Path  # MGIE_CLIP

    @classmethod
    def under(cls, root: str | Path) -> TinyPaths:
        """The released layout's folders under ``root`` (not created)."""
        root = Path(root)
        return cls(root=root, mgie=root / "ml-mgie", ip2p=root / "instruct-pix2pix", clip=root / "clip-vit-large-patch14")

    def env(self) -> dict[str, str]:
        """The settings that use these folders, as absolute paths: `.env` lines must work from any folder."""
        return {"MGIE_CKPT_DIR": str(self.mgie.resolve()), "MGIE_IP2P": str(self.ip2p.resolve()),
                "MGIE_CLIP": str(self.clip.resolve())}


def _dump(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fp16(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}


def _write_clip(folder: Path, s: TinySizes, seed: int) -> None:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed + 1)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 1000, "max_position_embeddings": 77,
                     "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
        vision_config={"hidden_size": s.clip_width, "intermediate_size": 2 * s.clip_width,
                       "num_hidden_layers": s.clip_layers, "num_attention_heads": 4, "image_size": s.clip_image,
                       "patch_size": s.clip_patch},
        projection_dim=16,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Writing model shards" bar for a 100 kB file is only noise
    try:
        CLIPModel(config).save_pretrained(folder)
    finally:
        hf_logging.enable_progress_bar()
    _dump(folder / "preprocessor_config.json", {
        "crop_size": {"height": s.clip_image, "width": s.clip_image}, "do_center_crop": True, "do_normalize": True,
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": {"shortest_edge": s.clip_image},
    })


def _unet(s: TinySizes):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=s.cross_attention, attention_head_dim=8, norm_num_groups=16,
    )


def _write_ip2p(folder: Path, s: TinySizes, seed: int) -> dict[str, torch.Tensor]:
    """instruct-pix2pix's scheduler, VAE and UNet config; returns a second, independent UNet for unet.pt."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 2)
    _unet(s).save_pretrained(folder / "unet")  # these UNet weights must never be used: unet.pt replaces them
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).save_pretrained(folder / "vae")
    _dump(folder / "scheduler" / "scheduler_config.json", {
        "_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.15.0.dev0",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    })
    _dump(folder / "model_index.json", {
        "_class_name": "StableDiffusionInstructPix2PixPipeline", "_diffusers_version": "0.15.0.dev0",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"], "text_encoder": [None, None],
        "tokenizer": [None, None], "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    })
    torch.manual_seed(seed + 3)
    return _fp16(_unet(s).state_dict())


def _llava_state(s: TinySizes, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    h, f = s.hidden, s.intermediate
    sd = {"model.embed_tokens.weight": rnd(LLAVA_VOCAB, h, std=1.0), "model.norm.weight": torch.ones(h),
          "lm_head.weight": rnd(LLAVA_VOCAB, h, std=1.0)}
    for i in range(s.layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = rnd(h, h, std=0.2)
        sd[p + "mlp.gate_proj.weight"] = rnd(f, h, std=0.2)
        sd[p + "mlp.up_proj.weight"] = rnd(f, h, std=0.2)
        sd[p + "mlp.down_proj.weight"] = rnd(h, f, std=0.2)
        sd[p + "input_layernorm.weight"] = torch.ones(h)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h)
        # Old LLaMA checkpoints carry this buffer; the loader must skip it.
        sd[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, h // s.heads, 2).float() / (h // s.heads)))
    sd["model.mm_projector.weight"] = rnd(h, s.clip_width, std=0.2)
    sd["model.mm_projector.bias"] = torch.zeros(h)
    return sd


def _write_llava(folder: Path, s: TinySizes, seed: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    write_llama_tokenizer(folder, seed=seed)
    _dump(folder / "config.json", {
        "_name_or_path": "LLaVA-7B-v1", "architectures": ["LlavaLlamaForCausalLM"], "bos_token_id": 1,
        "eos_token_id": 2, "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": s.hidden,
        "initializer_range": 0.02, "intermediate_size": s.intermediate, "max_position_embeddings": 2048,
        "max_sequence_length": 2048, "mm_hidden_size": s.clip_width, "mm_use_im_start_end": True,
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14", "model_type": "llava",
        "num_attention_heads": s.heads, "num_hidden_layers": s.layers, "pad_token_id": 0, "rms_norm_eps": 1e-06,
        "sep_image_conv_front": False, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.28.0.dev0", "tune_mm_mlp_adapter": False, "use_cache": True,
        "use_mm_proj": True, "vocab_size": LLAVA_VOCAB,
    })
    _dump(folder / "generation_config.json", {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                                              "pad_token_id": 0, "transformers_version": "4.28.0.dev0"})
    sd = _fp16(_llava_state(s, gen))
    keys = list(sd)
    half = len(keys) // 2
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        torch.save({k: sd[k] for k in shard_keys}, folder / name)
        weight_map.update({k: name for k in shard_keys})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    _dump(folder / "pytorch_model.bin.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return sd


def _edit_head_state(s: TinySizes, gen: torch.Generator) -> dict[str, torch.Tensor]:
    from ..edit_head import EditHead

    head = EditHead(llm_width=s.hidden, width=s.head_width, num_queries=s.head_queries, out_width=s.cross_attention,
                    encoder_layers=s.head_layers, decoder_layers=s.head_layers, ffn_width=2 * s.head_width)
    sd = head.state_dict()
    return {k: torch.randn(v.shape, generator=gen) * (0.2 if v.ndim > 1 else 0.05) if "norm" not in k else v
            for k, v in sd.items()}


def _plant_visual_tokens(embed: torch.Tensor, head: torch.Tensor, chain: list[int], gen: torch.Generator) -> None:
    """Make greedy decoding follow ``chain`` (each token predicts the next), like a trained MGIE answer.

    A large embedding along a fresh direction dominates the final normalized state at that position;
    the next token's LM-head row points the same way, so it wins the argmax.
    """
    h = embed.shape[1]
    for cur, nxt in zip(chain, chain[1:], strict=False):
        direction = torch.randn(h, generator=gen)
        direction /= direction.norm()
        embed[cur] = direction * 60.0
        head[nxt] = direction * 40.0


def write_tiny_checkpoints(root: str | Path, seed: int = 0, plant_visual_tokens: bool = True,
                           sizes: TinySizes | None = None) -> TinyPaths:
    """Write all four folders under ``root``; deterministic in ``seed``. A few MB, a few seconds.

    With ``plant_visual_tokens`` the language model is wired to answer with a short sentence, then
    [IMG0]..[IMG7] and </s>, as the trained model does; without it, it babbles for all 96 tokens and
    never emits [IMG0] (the demo's fallback path).
    """
    from tokenizers import Tokenizer

    s = sizes or TinySizes()
    paths = TinyPaths.under(root)
    llava, mgie = paths.mgie / "LLaVA-7B-v1", paths.mgie / "mgie_7b"
    for folder in (llava, mgie, paths.ip2p, paths.clip):
        folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    llava_sd = _write_llava(llava, s, seed, gen)
    _write_clip(paths.clip, s, seed)
    unet_sd = _write_ip2p(paths.ip2p, s, seed)
    torch.save(unet_sd, mgie / "unet.pt")

    # mllm.pt: embeddings and LM head grown by the eight [IMG] rows, the edit head, and `emb`.
    embed = torch.cat([llava_sd["model.embed_tokens.weight"].float(), torch.randn(8, s.hidden, generator=gen)])
    head = torch.cat([llava_sd["lm_head.weight"].float(), torch.randn(8, s.hidden, generator=gen)])
    img_rows = embed[LLAVA_VOCAB:].clone()  # `emb`: the [IMG] embeddings as trained, before any planting
    if plant_visual_tokens:
        tok = Tokenizer.from_file(str(llava / "tokenizer.json"))
        words = tok.encode("The image will be more colorful.", add_special_tokens=False).ids
        colon = tok.encode(":", add_special_tokens=False).ids[-1]
        chain = [colon, *words, *range(LLAVA_VOCAB, MGIE_VOCAB), 2]
        _plant_visual_tokens(embed, head, chain, gen)
    mllm = {"model.embed_tokens.weight": embed, "lm_head.weight": head}
    mllm.update({f"edit_head.{k}": v for k, v in _edit_head_state(s, gen).items()})
    mllm["emb"] = img_rows.unsqueeze(0)
    torch.save(_fp16(mllm), mgie / "mllm.pt")
    (paths.mgie / RANDOM_WEIGHTS_MARKER).write_text(
        "These checkpoints hold random weights written by mgie_engine.tiny, for tests and trying the flow.\n"
        "Edits made with them are noise. Real weights: see README.md.\n", encoding="utf-8")
    return paths
