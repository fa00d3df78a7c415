"""The MGIE edit, top to bottom: image -> expressive instruction + visual tokens -> edited image.

One readable ``__call__`` in the spirit of diffusers' pipelines. Its denoising loop reproduces
``StableDiffusionInstructPix2PixPipeline`` step for step (the parity test holds it to that), and its
decoding loop reproduces ``generate`` with greedy search and ``no_repeat_ngram_size=3``, stopping as
soon as the eight ``[IMG]`` tokens are out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .conversation import build_edit_prompt
from .errors import JobCancelledError
from .images import prepare_image
from .instructions import clean_expressive, normalize_instruction
from .models import MgieModels
from .options import DEFAULT_SEED, check_options

MAX_NEW_TOKENS = 96
NO_REPEAT_NGRAM = 3


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


ProgressFn = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class EditRequest:
    image: PIL.Image.Image
    instruction: str
    seed: int = DEFAULT_SEED
    text_cfg: float = 7.5
    image_cfg: float = 1.5
    steps: int = 100
    history: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Guidance:
    """What the LLM side produces for one (image, instruction, history); reusable across seeds and CFGs."""

    expressive_instruction: str
    new_token_ids: tuple[int, ...]
    prompt_embeds: torch.Tensor
    stopped_early: bool


@dataclasses.dataclass
class EditResult:
    image: PIL.Image.Image
    expressive_instruction: str
    instruction: str
    seed: int
    text_cfg: float
    image_cfg: float
    steps: int
    width: int
    height: int
    timings: dict[str, float]
    llm_cached: bool


def check_request(request: EditRequest) -> EditRequest:
    """Range checks with messages fit for a user; returns the request with a normalized instruction."""
    check_options(request.text_cfg, request.image_cfg, request.steps, request.seed)
    history = tuple((normalize_instruction(i), str(a)) for i, a in request.history)
    return dataclasses.replace(request, instruction=normalize_instruction(request.instruction), history=history)


def select_visual_states(seq: Sequence[int], hidden: torch.Tensor, img0: int, stopped_early: bool) -> torch.Tensor:
    """The eight hidden states that produced [IMG0]..[IMG7] (the demo's slice, fallback included).

    ``hidden`` holds one last-layer state per position of ``seq`` except the last. An early stop only
    happens once all eight exist and more tokens would have followed, so the demo's clamp to
    ``len(hidden) - 9`` cannot bite and the slice starts just before [IMG0].
    """
    n = hidden.shape[0]
    if stopped_early:
        p = seq.index(img0) - 1
    else:
        p = min(seq.index(img0) - 1 if img0 in seq else n - 9, n - 9)
    return hidden[p:p + 8]


class _NGramBan:
    """Tokens that would repeat an n-gram already in the sequence (prompt included, as in generate)."""

    def __init__(self, n: int, seq: Sequence[int]) -> None:
        self.n, self.seq, self.seen = n, list(seq), {}
        for end in range(n, len(self.seq) + 1):
            self._record(end)

    def _record(self, end: int) -> None:
        gram = self.seq[end - self.n:end]
        self.seen.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def append(self, token: int) -> None:
        self.seq.append(token)
        if len(self.seq) >= self.n:
            self._record(len(self.seq))

    def banned(self) -> list[int]:
        if len(self.seq) + 1 < self.n:
            return []
        return sorted(self.seen.get(tuple(self.seq[len(self.seq) - self.n + 1:]), ()))


class MgiePipeline:
    """Runs edits on loaded models. Thread-safe for one caller at a time per GPU (the worker's job)."""

    def __init__(self, models: MgieModels, max_side: int = 512, guidance_cache_size: int = 64) -> None:
        self.models = models
        self.max_side = max_side
        self.image_processor = VaeImageProcessor(vae_scale_factor=models.vae_scale_factor)
        step_params = set(inspect.signature(models.scheduler_class.step).parameters)
        self._step_takes_generator = "generator" in step_params
        self._step_takes_eta = "eta" in step_params
        self._cache: OrderedDict[tuple, Guidance] = OrderedDict()
        self._cache_size = guidance_cache_size
        self._cache_lock = threading.Lock()
        # transformers renamed `past_key_values` to `cache` in 5.2x; accept either release.
        forward_params = inspect.signature(models.llm.model.forward).parameters
        self._kv_kwarg = "cache" if "cache" in forward_params else "past_key_values"

    # -- the whole edit ---------------------------------------------------------------------------
    def __call__(self, request: EditRequest, progress: ProgressFn | None = None,
                 cancel: CancelToken | None = None) -> EditResult:
        timings: dict[str, float] = {}
        clock = _StageClock(self.models.device, timings)
        progress = progress or (lambda stage, k, n: None)

        # 1. Check the options and fit the image (aspect ratio kept, sides a multiple of the VAE factor).
        request = check_request(request)
        with clock("preprocess"):
            image = prepare_image(request.image, self.max_side, self.models.vae_scale_factor)

        # 2. CLIP + LLaVA write the expressive instruction; the edit head turns it into UNet conditioning.
        progress("language", 0, 1)
        with clock("llm"):
            guidance, cached = self.guidance(image, request.instruction, request.history, cancel)
        progress("language", 1, 1)

        # 3. InstructPix2Pix denoising with 3-way classifier-free guidance, then the VAE decode.
        with clock("denoise"):
            latents = self.denoise(image, guidance.prompt_embeds, request.seed, request.text_cfg,
                                   request.image_cfg, request.steps, progress, cancel)
        progress("decode", 0, 1)
        with clock("vae_decode"):
            edited = self.decode_latents(latents)
        timings["total"] = sum(timings.values())
        return EditResult(
            image=edited, expressive_instruction=guidance.expressive_instruction, instruction=request.instruction,
            seed=request.seed, text_cfg=request.text_cfg, image_cfg=request.image_cfg, steps=request.steps,
            width=edited.width, height=edited.height, timings=timings, llm_cached=cached,
        )

    # -- stage 2: language side -------------------------------------------------------------------
    def guidance(self, image: PIL.Image.Image, instruction: str, history: tuple[tuple[str, str], ...] = (),
                 cancel: CancelToken | None = None) -> tuple[Guidance, bool]:
        """LLM output for this (image, instruction, history), from the cache when seen before."""
        key = (hashlib.sha256(image.tobytes()).hexdigest(), image.size, instruction, history)
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit, True
        result = self.run_language_model(image, instruction, history, cancel)
        with self._cache_lock:
            self._cache[key] = result
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return result, False

    @torch.inference_mode()
    def prompt_inputs(self, image: PIL.Image.Image, instruction: str,
                      history: tuple[tuple[str, str], ...] = ()) -> tuple[list[int], torch.Tensor]:
        """Token ids and input embeddings with CLIP patch features in place of the <im_patch> tokens."""
        m = self.models
        pixels = m.vision_processor.preprocess(image, return_tensors="pt")["pixel_values"].to(m.device, m.dtype)
        states = m.vision(pixels, output_hidden_states=True).hidden_states[m.vision_select_layer][:, 1:]
        features = m.projector(states.to(m.dtype))
        ids = m.encode(build_edit_prompt(instruction, m.num_patches, history))
        start = ids.index(m.token_ids.im_start)
        if ids[start + m.num_patches + 1] != m.token_ids.im_end:
            raise RuntimeError("the tokenizer split the image placeholder; check tokenizer.json")
        ids_t = torch.tensor([ids], device=m.device)
        embeds = m.llm.get_input_embeddings()(ids_t)
        embeds[0, start + 1:start + 1 + m.num_patches] = features[0]
        return ids, embeds

    @torch.inference_mode()
    def run_language_model(self, image: PIL.Image.Image, instruction: str,
                           history: tuple[tuple[str, str], ...] = (), cancel: CancelToken | None = None) -> Guidance:
        from transformers import DynamicCache

        m = self.models
        ids, embeds = self.prompt_inputs(image, instruction, history)
        eos, img = set(m.token_ids.eos), m.token_ids.img
        cache = DynamicCache(config=m.llm.config)
        seq, new = list(ids), []
        ban = _NGramBan(NO_REPEAT_NGRAM, seq)
        out = m.llm.model(inputs_embeds=embeds, attention_mask=torch.ones(1, len(seq), device=m.device, dtype=torch.long),
                          use_cache=True, **{self._kv_kwarg: cache})
        hidden = [out.last_hidden_state[0]]
        stopped_early = False
        while True:
            logits = m.llm.lm_head(hidden[-1][-1:]).float()[0]
            banned = ban.banned()
            if banned:
                logits[banned] = -float("inf")
            token = int(torch.argmax(logits))
            seq.append(token)
            new.append(token)
            ban.append(token)
            if token in eos or len(new) >= MAX_NEW_TOKENS:
                break
            if token == img[-1] and img[0] in new and len(seq) - 1 >= seq.index(img[0]) + 7:
                stopped_early = True
                break
            if cancel is not None and cancel.is_set():
                raise JobCancelledError("The edit was cancelled.")
            out = m.llm.model(input_ids=torch.tensor([[token]], device=m.device),
                              attention_mask=torch.ones(1, len(seq), device=m.device, dtype=torch.long),
                              use_cache=True, **{self._kv_kwarg: cache})
            hidden.append(out.last_hidden_state[0])
        states = select_visual_states(seq, torch.cat(hidden, dim=0), img[0], stopped_early)
        prompt_embeds = m.edit_head(states.unsqueeze(0), m.img_embeds)
        return Guidance(expressive_instruction=clean_expressive(m.decode(new)), new_token_ids=tuple(new),
                        prompt_embeds=prompt_embeds, stopped_early=stopped_early)

    # -- stage 3: diffusion side ------------------------------------------------------------------
    @torch.inference_mode()
    def denoise(self, image: PIL.Image.Image, prompt_embeds: torch.Tensor, seed: int, text_cfg: float,
                image_cfg: float, steps: int, progress: ProgressFn | None = None,
                cancel: CancelToken | None = None) -> torch.Tensor:
        m = self.models
        scheduler = m.new_scheduler()
        scheduler.set_timesteps(steps, device=m.device)
        # As in diffusers: guidance is on only when text_cfg > 1 and image_cfg >= 1.
        guided = text_cfg > 1.0 and image_cfg >= 1.0

        pixels = self.image_processor.preprocess(image).to(m.device, m.dtype)
        image_latents = m.vae.encode(pixels).latent_dist.mode()
        cond = prompt_embeds.to(m.dtype)
        if guided:
            cond = torch.cat([cond, m.null_embeds, m.null_embeds])
            image_latents = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])

        generator = torch.Generator(device=m.device).manual_seed(seed)
        shape = (1, m.vae.config.latent_channels, *image_latents.shape[-2:])
        latents = randn_tensor(shape, generator=generator, device=m.device, dtype=m.dtype) * scheduler.init_noise_sigma
        extra = {}
        if self._step_takes_generator:
            extra["generator"] = generator
        if self._step_takes_eta:
            extra["eta"] = 0.0

        for i, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([latents] * 3) if guided else latents
            model_input = torch.cat([scheduler.scale_model_input(model_input, t), image_latents], dim=1)
            noise = m.unet(model_input, t, encoder_hidden_states=cond, return_dict=False)[0]
            if guided:
                text, img, uncond = noise.chunk(3)
                noise = uncond + text_cfg * (text - img) + image_cfg * (img - uncond)
            latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
            if progress is not None:
                progress("denoise", i + 1, len(scheduler.timesteps))
            if cancel is not None and cancel.is_set():
                raise JobCancelledError("The edit was cancelled.")
        return latents

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> PIL.Image.Image:
        vae = self.models.vae
        decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(decoded, output_type="pil")[0]


class _StageClock:
    """Wall time per stage; synchronizes CUDA so GPU work is charged to the stage that queued it."""

    def __init__(self, device: torch.device, timings: dict[str, float]) -> None:
        self.device, self.timings = device, timings

    def __call__(self, stage: str) -> _StageClock:
        self.stage = stage
        return self

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[self.stage] = self.timings.get(self.stage, 0.0) + time.perf_counter() - self.start
