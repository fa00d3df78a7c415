"""The MGIE edit, top to bottom: image -> expressive instruction + visual tokens -> edited image.

One readable ``__call__`` in the spirit of diffusers' pipelines. Its denoising steps reproduce
``StableDiffusionInstructPix2PixPipeline`` (the parity test holds them to it) and its language stage is
the demo's ``generate`` call (greedy, ``no_repeat_ngram_size=3``), stopping as soon as the eight
``[IMG]`` tokens are out. Both stages also run several jobs at once (see ``worker.py``).
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
from transformers import StoppingCriteria

from .conversation import build_edit_prompt
from .errors import JobCancelledError
from .images import prepare_image
from .instructions import clean_expressive, normalize_instruction
from .models import MgieModels
from .options import DEFAULT_SEED, check_options

MAX_NEW_TOKENS = 96
NO_REPEAT_NGRAM = 3
ROW_BUCKETS = (1, 3, 6, 12, 24, 48, 96, 192)  # UNet batch sizes that get their own CUDA graph


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


def _visual_tokens_complete(new: Sequence[int], img: Sequence[int]) -> bool:
    """[IMG7] just came out, at least seven tokens after the first [IMG0], before the token limit.

    From there the demo's slice (just before [IMG0], eight states) is fixed and every state it needs
    exists, so decoding on to </s> could not change the result.
    """
    return (len(new) < MAX_NEW_TOKENS and new[-1] == img[-1] and img[0] in new
            and len(new) - 1 >= new.index(img[0]) + 7)


def _answer(tokens: list[int], eos: Sequence[int], img: Sequence[int]) -> tuple[list[int], bool]:
    """One row's new tokens up to where it stopped (padding after that is dropped), and whether early."""
    new: list[int] = []
    for token in tokens:
        new.append(token)
        if token in eos:
            return new, False
        if _visual_tokens_complete(new, img):
            return new, True
    return new, False


class _VisualTokensDone(StoppingCriteria):
    """A stopping criterion for generate: per row, stop once the visual tokens are complete."""

    def __init__(self, img: Sequence[int], prompt_width: int, cancel: CancelToken | None) -> None:
        self.img, self.width, self.cancel = tuple(img), prompt_width, cancel

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        rows = input_ids[:, self.width:].tolist()
        done = [_visual_tokens_complete(row, self.img) for row in rows]
        if self.cancel is not None and self.cancel.is_set():
            done = [True] * len(rows)
        return torch.tensor(done, device=input_ids.device)


class MgiePipeline:
    """Runs edits on loaded models. Thread-safe for one caller at a time per GPU (the worker's job)."""

    def __init__(self, models: MgieModels, max_side: int = 512, guidance_cache_size: int = 64,
                 compile_unet: bool = False) -> None:
        self.models = models
        self.max_side = max_side
        self.unet = models.unet
        self._graphs = compile_unet and models.device.type == "cuda"
        if models.device.type == "cuda":
            # Same math, faster kernels: NHWC convolutions, and optionally a compiled UNet replayed as
            # CUDA graphs (one per batch bucket: a UNet call at batch 3 is mostly launch overhead).
            models.unet.to(memory_format=torch.channels_last)
            models.vae.to(memory_format=torch.channels_last)
            if self._graphs:
                self.unet = torch.compile(models.unet, mode="reduce-overhead")
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
    def _cache_key(self, image: PIL.Image.Image, instruction: str, history: tuple[tuple[str, str], ...]) -> tuple:
        return (hashlib.sha256(image.tobytes()).hexdigest(), image.size, instruction, history)

    def guidance(self, image: PIL.Image.Image, instruction: str, history: tuple[tuple[str, str], ...] = (),
                 cancel: CancelToken | None = None) -> tuple[Guidance, bool]:
        """LLM output for this (image, instruction, history), from the cache when seen before."""
        return self.guidance_many([(image, instruction, history)], cancel)[0]

    def guidance_many(self, items: Sequence[tuple[PIL.Image.Image, str, tuple[tuple[str, str], ...]]],
                      cancel: CancelToken | None = None) -> list[tuple[Guidance, bool]]:
        """Several jobs' LLM outputs: cached ones looked up, the rest decoded together in one batch."""
        keys = [self._cache_key(*item) for item in items]
        found: dict[tuple, Guidance] = {}
        with self._cache_lock:
            for key in keys:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    found[key] = self._cache[key]
        todo = {key: item for key, item in zip(keys, items, strict=True) if key not in found}
        fresh = dict(zip(todo, self.run_language_models(list(todo.values()), cancel), strict=True)) if todo else {}
        with self._cache_lock:
            for key, result in fresh.items():
                self._cache[key] = result
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return [(found[k], True) if k in found else (fresh[k], False) for k in keys]

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

    def run_language_model(self, image: PIL.Image.Image, instruction: str,
                           history: tuple[tuple[str, str], ...] = (), cancel: CancelToken | None = None) -> Guidance:
        return self.run_language_models([(image, instruction, history)], cancel)[0]

    @torch.inference_mode()
    def run_language_models(self, items: Sequence[tuple[PIL.Image.Image, str, tuple[tuple[str, str], ...]]],
                            cancel: CancelToken | None = None) -> list[Guidance]:
        """Greedy decoding of several prompts at once (left-padded), each stopping on its own.

        This is the demo's ``generate`` call (greedy, no_repeat_ngram_size=3, up to 96 new tokens) plus a
        stopping rule that ends a sequence as soon as [IMG7] completes the eight visual tokens. On CUDA it
        uses a static KV cache, which makes transformers compile the decoding step (CUDA graphs); prompts
        are padded to a multiple of 64 tokens so a handful of shapes cover every request.
        """
        m = self.models
        prompts = [self.prompt_inputs(*item) for item in items]
        lengths = [len(ids) for ids, _ in prompts]
        cuda = m.device.type == "cuda"
        width = -(-max(lengths) // 64) * 64 if cuda else max(lengths)
        n, pad = len(prompts), m.llm.config.pad_token_id or 0
        ids = torch.full((n, width), pad, device=m.device, dtype=torch.long)
        embeds = torch.zeros(n, width, prompts[0][1].shape[-1], device=m.device, dtype=prompts[0][1].dtype)
        mask = torch.zeros(n, width, device=m.device, dtype=torch.long)
        for i, (prompt_ids, emb) in enumerate(prompts):
            ids[i, width - lengths[i]:] = torch.tensor(prompt_ids, device=m.device)
            embeds[i, width - lengths[i]:] = emb[0]
            mask[i, width - lengths[i]:] = 1
        stop = _VisualTokensDone(m.token_ids.img, width, cancel)
        out = m.llm.generate(
            input_ids=ids, inputs_embeds=embeds, attention_mask=mask, do_sample=False, num_beams=1,
            max_new_tokens=MAX_NEW_TOKENS, no_repeat_ngram_size=NO_REPEAT_NGRAM, eos_token_id=list(m.token_ids.eos),
            pad_token_id=pad, stopping_criteria=[stop], return_dict_in_generate=True,
            cache_implementation="static" if cuda else None)
        if cancel is not None and cancel.is_set():
            raise JobCancelledError("The edit was cancelled.")
        answers = [_answer(row, m.token_ids.eos, m.token_ids.img) for row in out.sequences[:, width:].tolist()]

        # The last-layer states of every position but the last, from one causal pass over prompt + answer:
        # the same states the incremental decode computed (it need not keep them, so its CUDA graphs can
        # reuse their buffers). Left-padded like the prompts.
        total = [lengths[i] + len(new) - 1 for i, (new, _) in enumerate(answers)]
        full = max(total)
        seq_embeds = torch.zeros(n, full, embeds.shape[-1], device=m.device, dtype=embeds.dtype)
        seq_mask = torch.zeros(n, full, device=m.device, dtype=torch.long)
        table = m.llm.get_input_embeddings()
        for i, (new, _) in enumerate(answers):
            answer = table(torch.tensor(new[:-1], device=m.device, dtype=torch.long))
            row = torch.cat([prompts[i][1][0], answer])
            seq_embeds[i, full - total[i]:] = row
            seq_mask[i, full - total[i]:] = 1
        states = m.llm.model(inputs_embeds=seq_embeds, attention_mask=seq_mask,
                             position_ids=(seq_mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        results = []
        for i, ((prompt_ids, _), (new, early)) in enumerate(zip(prompts, answers, strict=True)):
            seq = list(prompt_ids) + new
            visual = select_visual_states(seq, states[i, full - total[i]:], m.token_ids.img[0], early)
            results.append(Guidance(expressive_instruction=clean_expressive(m.decode(new)), new_token_ids=tuple(new),
                                    prompt_embeds=m.edit_head(visual.unsqueeze(0), m.img_embeds),
                                    stopped_early=early))
        return results

    # -- stage 3: diffusion side ------------------------------------------------------------------
    @torch.inference_mode()
    def start_denoising(self, image: PIL.Image.Image, prompt_embeds: torch.Tensor, seed: int, text_cfg: float,
                        image_cfg: float, steps: int, tag: object = None) -> DenoiseState:
        """Everything one job needs to take denoising steps, alone or batched with others."""
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
        return DenoiseState(tag=tag, scheduler=scheduler, latents=latents, image_latents=image_latents, cond=cond,
                            guided=guided, text_cfg=text_cfg, image_cfg=image_cfg, step_kwargs=extra)

    @torch.inference_mode()
    def denoise_step(self, states: Sequence[DenoiseState]) -> None:
        """One denoising step for each state, with a single UNet call for all of them.

        States must share a latent size. Each keeps its own scheduler, generator, timestep and CFG
        scales, so a job's result does not depend on what else is in the batch.
        """
        rows, timesteps, conds, sizes = [], [], [], []
        for s in states:
            t = s.scheduler.timesteps[s.index]
            x = torch.cat([s.latents] * 3) if s.guided else s.latents
            rows.append(torch.cat([s.scheduler.scale_model_input(x, t), s.image_latents], dim=1))
            timesteps.append(t.reshape(1).expand(x.shape[0]))
            conds.append(s.cond)
            sizes.append(x.shape[0])
        sample, timestep, cond = torch.cat(rows), torch.cat(timesteps), torch.cat(conds)
        if self._graphs:
            noise = self._unet_graphed(sample, timestep, cond)
        else:
            noise = self.unet(sample, timestep, encoder_hidden_states=cond, return_dict=False)[0]
        for s, pred in zip(states, noise.split(sizes), strict=True):
            if s.guided:
                text, img, uncond = pred.chunk(3)
                pred = uncond + s.text_cfg * (text - img) + s.image_cfg * (img - uncond)
            t = s.scheduler.timesteps[s.index]
            s.latents = s.scheduler.step(pred, t, s.latents, **s.step_kwargs, return_dict=False)[0]
            s.index += 1

    def _unet_graphed(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Pad the batch to a bucket so a few recorded CUDA graphs serve every batch size."""
        rows = sample.shape[0]
        bucket = next((b for b in ROW_BUCKETS if b >= rows), rows)
        if bucket > rows:
            extra = bucket - rows
            sample = torch.cat([sample, sample.new_zeros(extra, *sample.shape[1:])])
            timestep = torch.cat([timestep, timestep.new_zeros(extra)])
            cond = torch.cat([cond, cond.new_zeros(extra, *cond.shape[1:])])
        torch.compiler.cudagraph_mark_step_begin()
        out = self.unet(sample, timestep, encoder_hidden_states=cond, return_dict=False)[0]
        return out[:rows].clone()  # the graph's output buffer is reused by the next replay

    def denoise(self, image: PIL.Image.Image, prompt_embeds: torch.Tensor, seed: int, text_cfg: float,
                image_cfg: float, steps: int, progress: ProgressFn | None = None,
                cancel: CancelToken | None = None) -> torch.Tensor:
        state = self.start_denoising(image, prompt_embeds, seed, text_cfg, image_cfg, steps)
        while not state.done:
            self.denoise_step([state])
            if progress is not None:
                progress("denoise", state.index, state.total)
            if cancel is not None and cancel.is_set():
                raise JobCancelledError("The edit was cancelled.")
        return state.latents

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> list[PIL.Image.Image] | PIL.Image.Image:
        """VAE decode; a batch of latents gives a list of images, a single one an image."""
        vae = self.models.vae
        decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        images = self.image_processor.postprocess(decoded, output_type="pil")
        return images if latents.shape[0] > 1 else images[0]


@dataclasses.dataclass(eq=False)
class DenoiseState:
    """One job part-way through denoising."""

    tag: object
    scheduler: object
    latents: torch.Tensor
    image_latents: torch.Tensor
    cond: torch.Tensor
    guided: bool
    text_cfg: float
    image_cfg: float
    step_kwargs: dict
    index: int = 0

    @property
    def total(self) -> int:
        return len(self.scheduler.timesteps)

    @property
    def done(self) -> bool:
        return self.index >= self.total

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.latents.shape[-2:])


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
