"""Full-size MGIE parts with random weights: the released architecture and dims, built in memory.

Built in memory, for the speed benchmarks; ``bench/write_full_size.py`` writes the same dims to disk in the
released layout, for the load and start-up benchmarks. The LLM is wired (as the tiny checkpoints are) to answer with 40 tokens, then
[IMG0]..[IMG7] and </s>, so both flows decode the ~48 tokens a trained MGIE writes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mgie_engine.edit_head import EditHead
from mgie_engine.models import IMG_TOKENS, MgieModels, load_tokenizer

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                rms_norm_eps=1e-6, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ANSWER_TOKENS = 40


def plant_answer(embed: torch.Tensor, head: torch.Tensor, colon: int, vocab_base: int, img_ids: tuple[int, ...],
                 eos: int, seed: int) -> None:
    """Wire the embeddings and LM head so that greedy decoding after ":" writes 40 words, the [IMG] tokens, </s>."""
    gen = torch.Generator().manual_seed(seed)
    words = torch.randperm(vocab_base - 2000, generator=gen)[:ANSWER_TOKENS] + 1000
    chain = [colon, *words.tolist(), *img_ids, eos]
    with torch.no_grad():
        for cur, nxt in zip(chain, chain[1:], strict=False):
            d = torch.randn(embed.shape[1], generator=gen)
            d /= d.norm()
            embed[cur] = (d * 5000.0).to(embed)  # dominates what 32 random layers add to the residual
            head[nxt] = d.to(head)


SMALL = dict(llm=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
             clip=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
             unet=dict(block_out_channels=(32, 64, 64, 64), attention_head_dim=8, layers_per_block=1, norm_num_groups=16),
             vae=dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8))


def build(device: torch.device, dtype: torch.dtype, tokenizer_dir: Path, seed: int = 0,
          small: bool = False) -> MgieModels:
    """The released dims, or (small=True) the same shapes shrunk, to dry-run the benchmark on a CPU."""
    import diffusers
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor

    torch.manual_seed(seed)
    config = {"mm_use_im_start_end": True, "eos_token_id": 2}
    tokenizer, add_bos, token_ids = load_tokenizer(tokenizer_dir / "LLaVA-7B-v1", config)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            llm_dims = {**LLAMA_7B, **(SMALL["llm"] if small else {})}
            hidden = llm_dims["hidden_size"]
            llm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **llm_dims)).eval()
            clip_dims = SMALL["clip"] if small else dict(hidden_size=1024, intermediate_size=4096,
                                                         num_hidden_layers=24, num_attention_heads=16)
            projector = torch.nn.Linear(clip_dims["hidden_size"], hidden)
            vision = CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=14, projection_dim=768,
                                                      **clip_dims)).eval()
            head = EditHead(llm_width=hidden, width=512, num_queries=77, out_width=768, encoder_layers=4,
                            decoder_layers=4, ffn_width=2048).eval()
            unet_dims = SMALL["unet"] if small else dict(block_out_channels=(320, 640, 1280, 1280),
                                                         attention_head_dim=8, layers_per_block=2)
            unet = diffusers.UNet2DConditionModel(
                sample_size=64, in_channels=8, out_channels=4, cross_attention_dim=768,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **unet_dims).eval()
            vae_dims = SMALL["vae"] if small else dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2)
            vae = diffusers.AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                scaling_factor=0.18215, **vae_dims).eval()
    finally:
        torch.set_default_dtype(previous)
    colon = tokenizer.encode(":", add_special_tokens=False).ids[-1]
    plant_answer(llm.get_input_embeddings().weight, llm.lm_head.weight, colon, 32000, token_ids.img, token_ids.eos[0],
                 seed)
    img_embeds = llm.get_input_embeddings().weight[-len(IMG_TOKENS):].detach().clone().unsqueeze(0) / 5000.0
    hidden = llm.config.hidden_size
    scheduler_config = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                        "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1}
    processor = Processor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                          image_mean=[0.48145466, 0.4578275, 0.40821073],
                          image_std=[0.26862954, 0.26130258, 0.27577711], resample=3)
    models = MgieModels(
        tokenizer=tokenizer, add_bos=add_bos, token_ids=token_ids, llm=llm, projector=projector, vision=vision,
        vision_processor=processor, vision_select_layer=-2, num_patches=256, edit_head=head, img_embeds=img_embeds,
        null_embeds=torch.empty(0), unet=unet, vae=vae, scheduler_class=diffusers.EulerAncestralDiscreteScheduler,
        scheduler_config=dict(diffusers.EulerAncestralDiscreteScheduler.from_config(scheduler_config).config),
        vae_scale_factor=8, device=device, dtype=dtype, random_weights=True,
        sources={"mgie": str(tokenizer_dir), "clip": "random", "ip2p": "random"})
    with torch.inference_mode():
        models.null_embeds = head(torch.zeros(1, 8, hidden, device=device, dtype=dtype), img_embeds)
    return models
