"""The reference flow: Apple's demo written plainly on stock pieces, kept to hold the engine to it.

Stock ``generate`` (no early stop, hidden states returned), the demo's slice and ``remove_alter``,
and diffusers' own ``StableDiffusionInstructPix2PixPipeline`` fed with ``prompt_embeds`` /
``negative_prompt_embeds``. The prompt is spelled out here rather than built by the engine's template
module, so the test checks that module too. Only the loaded weights are shared with the engine.
"""

from __future__ import annotations

import dataclasses

import PIL.Image
import torch

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclasses.dataclass
class ReferenceOutput:
    sequence: list[int]
    new_token_ids: list[int]
    expressive_instruction: str
    prompt_embeds: torch.Tensor
    latents: torch.Tensor | None
    image: PIL.Image.Image | None


def demo_prompt(instruction: str, num_patches: int) -> str:
    txt = "what will this image be like if '" + instruction + "'"
    txt = txt + "\n" + "<im_start>" + "<im_patch>" * num_patches + "<im_end>"
    return SYSTEM + " " + "USER: " + txt + " " + "ASSISTANT:"


def remove_alter(s: str) -> str:
    """The demo's clean-up of the decoded sequence, step by step."""
    if "ASSISTANT:" in s:
        s = s[s.index("ASSISTANT:") + 10:].strip()
    if "</s>" in s:
        s = s[:s.index("</s>")].strip()
    if "alternative" in s.lower():
        s = s[:s.lower().index("alternative")]
    if "[IMG0]" in s:
        s = s[:s.index("[IMG0]")]
    s = ".".join([part.strip() for part in s.split(".")[:2]])
    if s[-1] != ".":
        s += "."
    return s.strip()


def reference_tokenizer(models):
    """transformers' fast tokenizer on tokenizer.json as is, plus the demo's add_tokens call."""
    from pathlib import Path

    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(models.sources["mgie"]) / "LLaVA-7B-v1" / "tokenizer.json"))
    tok.add_tokens([f"[IMG{i}]" for i in range(8)], special_tokens=True)
    return tok


@torch.inference_mode()
def reference_generate(models, input_ids: list[int], inputs_embeds: torch.Tensor):
    llm = models.llm
    ids = torch.tensor([input_ids], device=models.device)
    out = llm.generate(input_ids=ids, inputs_embeds=inputs_embeds, attention_mask=torch.ones_like(ids),
                       do_sample=False, max_new_tokens=96, num_beams=1, no_repeat_ngram_size=3,
                       return_dict_in_generate=True, output_hidden_states=True,
                       eos_token_id=list(models.token_ids.eos), pad_token_id=0)
    seq = out["sequences"][0].tolist()
    hid = torch.cat([x[-1] for x in out["hidden_states"]], dim=1)[0]
    img0 = models.token_ids.img[0]
    p = min(seq.index(img0) - 1 if img0 in seq else len(hid) - 9, len(hid) - 9)
    return seq, hid[p:p + 8]


@torch.inference_mode()
def reference_edit(models, image: PIL.Image.Image, instruction: str, seed: int, text_cfg: float,
                   image_cfg: float, steps: int, run_diffusion: bool = True) -> ReferenceOutput:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    tok = reference_tokenizer(models)
    enc = tok(demo_prompt(instruction, models.num_patches))
    input_ids = enc["input_ids"]

    pixels = models.vision_processor.preprocess(image, return_tensors="pt")["pixel_values"]
    vision_out = models.vision(pixels.to(models.device, models.dtype), output_hidden_states=True)
    features = models.projector(vision_out.hidden_states[models.vision_select_layer][:, 1:])
    embeds = models.llm.get_input_embeddings()(torch.tensor([input_ids], device=models.device))[0]
    start = input_ids.index(models.token_ids.im_start)
    n = features.shape[1]
    embeds = torch.cat([embeds[:start + 1], features[0], embeds[start + n + 1:]], dim=0).unsqueeze(0)

    seq, states = reference_generate(models, input_ids, embeds)
    text = remove_alter(tok.decode(seq))
    prompt_embeds = models.edit_head(states.unsqueeze(0), models.img_embeds)
    latents = result = None
    if run_diffusion:
        pipe = StableDiffusionInstructPix2PixPipeline(
            vae=models.vae, text_encoder=None, tokenizer=None, unet=models.unet, scheduler=models.new_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        latents = pipe(image=image, prompt_embeds=prompt_embeds, negative_prompt_embeds=models.null_embeds,
                       generator=torch.Generator(device=models.device).manual_seed(seed), output_type="latent",
                       num_inference_steps=steps, guidance_scale=text_cfg, image_guidance_scale=image_cfg).images
        # The rest of the pipeline's __call__ (no safety checker: every image is denormalized).
        decoded = models.vae.decode(latents / models.vae.config.scaling_factor, return_dict=False)[0]
        result = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
    return ReferenceOutput(sequence=seq, new_token_ids=seq[len(input_ids):], expressive_instruction=text,
                           prompt_embeds=prompt_embeds, latents=latents, image=result)
