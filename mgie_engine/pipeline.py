"""The MGIE edit, top to bottom: image -> expressive instruction + visual tokens -> edited image.

One readable ``__call__`` in the spirit of diffusers' pipelines. Its denoising steps reproduce
``StableDiffusionInstructPix2PixPipeline`` (the parity test holds them to it) and its language stage is
the demo's ``generate`` call (greedy, ``no_repeat_ngram_size=3``), stopping as soon as the eight
``[IMG]`` tokens are out. Both stages also run several jobs at once (see ``worker.py``).
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import hashlib
import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .conversation import build_edit_prompt_parts
from .cpu_pools import cpu_pool
from .decoding import GreedyDecoder
from .errors import JobCancelledError
from .graphs import GraphedCall
from .images import fit_size, prepare_image
from .instructions import clean_expressive, normalize_instruction
from .models import MgieModels
from .offload import StageResidency
from .options import DEFAULT_SEED, check_options

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 96
NO_REPEAT_NGRAM = 3
ROW_BUCKETS = (1, 3, 6, 12, 24, 48, 96, 192)  # UNet batch sizes that get their own CUDA graph
JOB_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # job counts that get their own graph of the fused guided step
# mode="reduce-overhead" (CUDA graphs) plus 1x1 convolutions as matmuls, whose epilogues inductor can
# fuse. H100, one UNet call: 9.9 against 11.0 ms at batch 3, 195.9 against 203.4 ms at batch 96
# (bench/results/NVIDIA_H100-x1-unet-variants.log; coordinate-descent tuning gained nothing for 3 more minutes).
# Without inductor's layout optimization (which it only ever applies to static shapes): static, one call
# took 9.65 against 9.88 ms at batch 3 and 194.8 against 204.3 ms at batch 96, where the card runs at its
# 700 W cap (bench/results/NVIDIA_H100-x1-unet-layout*.log).
UNET_COMPILE_OPTIONS = {"triton.cudagraphs": True, "conv_1x1_as_mm": True, "layout_optimization": False}
# The static home step also groups independent small kernels into combined launches: 9.51 against 9.65 ms
# at batch 3, where most of a call's ~650 kernels are small (no gain at 96 rows).
HOME_STEP_OPTIONS = {**UNET_COMPILE_OPTIONS, "combo_kernels": True}
ENCODE_BATCH = 8  # same-size images VAE-encoded in one call when a batch of jobs starts
DECODE_BATCH = 4  # finished jobs whose latents share one VAE decode (each adds its decoder activations)
_PAD_SCALARS = (500.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0)  # a harmless step for the rows that pad a bucket


def vae_functions(vae: torch.nn.Module, compiled: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], ...]:
    """The VAE's encode (pixels -> latent mode) and decode (latents -> pixels), compiled or not.

    Compiled, each GroupNorm becomes a split reduction fused with its SiLU: eager runs one CUDA block
    per group and image, which left the H100 mostly idle (22 of a 512x512 decode's 28 ms GPU time were
    GroupNorm); compiled, the decode takes 9.7 against 25.0 ms, the encode 4.4 against 12.1 ms. No CUDA
    graphs: decode batches and sizes vary and their activations are large.
    """
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        return vae.encode(pixels).latent_dist.mode()

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]

    return (torch.compile(encode), torch.compile(decode)) if compiled else (encode, decode)


def guided_euler_ancestral_step(unet: torch.nn.Module, latents: torch.Tensor, image_latents: torch.Tensor,
                                cond: torch.Tensor, scalars: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One InstructPix2Pix step for n guided jobs at once: UNet, 3-way CFG and the Euler-ancestral update.

    The same arithmetic as diffusers' pipeline + ``EulerAncestralDiscreteScheduler.step``, rounded to the
    model dtype where they round, but with every job's timestep, sigmas and CFG scales as tensors, so one
    call (and one CUDA graph) serves any mix of jobs and steps. ``scalars`` holds per job: timestep, input
    scale denominator, sigma, dt, sigma_up, text CFG, image CFG; ``noise`` is the job's ancestral noise
    for this step, drawn ahead from its own generator in the order the scheduler would draw it.
    """
    n, dtype = latents.shape[0], latents.dtype

    def col(k: int) -> torch.Tensor:
        return scalars[:, k].view(n, 1, 1, 1)

    scaled = (latents.float() / col(1)).to(dtype).repeat_interleave(3, dim=0)  # rows: text, image, none
    eps = unet(torch.cat([scaled, image_latents], dim=1), scalars[:, 0].repeat_interleave(3),
               encoder_hidden_states=cond, return_dict=False)[0]
    text, image, uncond = eps.view(n, 3, *eps.shape[1:]).unbind(1)
    guided = (uncond + (col(5) * (text - image)).to(dtype)) + (col(6) * (image - uncond)).to(dtype)
    sample = latents.float()
    denoised = sample - (col(2) * guided).to(dtype)
    moved = sample + (sample - denoised) / col(2) * col(3)
    return (moved + (noise * col(4)).to(dtype)).to(dtype)


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


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedImage:
    """A fitted input image with the CPU work both stages need done ahead: the LLM cache's key, CLIP's
    pixels and the VAE's. ``MgiePipeline.prepare`` makes it on any thread, so a worker does it beside its
    GPU thread (~15 ms a job on a small CPU: for a burst of 32, half a second the GPU would wait for).
    The VAE's pixels, needed only after the language stage, are made on another thread meanwhile."""

    image: PIL.Image.Image
    key: str  # sha256 of the pixels
    clip_pixels: torch.Tensor  # (3, h, w) float32: the vision processor's output
    vae_batch: concurrent.futures.Future  # of (1, 3, H, W) float32 in [-1, 1]: the VAE image processor's output

    @property
    def vae_pixels(self) -> torch.Tensor:
        return self.vae_batch.result()[0]

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


ImageInput = PIL.Image.Image | PreparedImage


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


def select_visual_states(prompt_length: int, new: Sequence[int], hidden: torch.Tensor, img0: int,
                         stopped_early: bool) -> torch.Tensor:
    """The eight hidden states that produced [IMG0]..[IMG7] (the demo's slice, fallback included).

    ``hidden`` holds one last-layer state per position of the prompt and its answer ``new`` except the
    last. [IMG0] is looked for in the answer only: the demo searched the whole sequence, so an [IMG0] in
    the prompt would have been read instead (the prompt encoder keeps users from writing one anyway).
    An early stop only happens once all eight exist and more tokens would have followed, so the demo's
    clamp to ``len(hidden) - 9`` cannot bite and the slice starts just before [IMG0].
    """
    n = hidden.shape[0]
    first = prompt_length + new.index(img0) - 1 if img0 in new else None
    if stopped_early:
        p = first
    else:
        p = min(n - 9 if first is None else first, n - 9)
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


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, without the copy for a lone tensor (a lone job's step inputs, 100 steps an edit)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def always_pass_upsample_size(unet: torch.nn.Module) -> None:
    """Make diffusers' UNet give every upsampler its skip connection's size, as it already does whenever a
    latent side is not a multiple of ``2**num_upsamplers``. For other sizes the result is the same (nearest
    neighbour, exactly twice the size), but the choice is a shape guard: compiled, each divisibility class
    of the height and width would compile again. No side is a multiple of 2**62."""
    unet.num_upsamplers = 62


def mark_sizes_dynamic(*tensors: torch.Tensor) -> None:
    """Compile for any batch and image size on first sight, rather than once per shape until dynamo notices
    (no effect outside ``torch.compile``).

    The batch dim, and a latent's or image's height and width. A batch of one stays specialised (its own
    compile): dynamo never lets a symbolic size stand for 1, so the warm-up runs one job and then several.
    """
    for t in tensors:
        dims = [d for d in ((0, 2, 3) if t.dim() == 4 else (0,)) if t.shape[d] > 1]
        if dims:
            torch._dynamo.maybe_mark_dynamic(t, dims)


# The warm-up's prompts: a short one, and (second batch) one over 64 tokens longer, a full-length instruction
# after an earlier turn. On CUDA prompts are padded to a multiple of 64 tokens, so the decoder's compiled
# layers meet a second prompt width during the warm-up and not at a user's first long prompt.
_WARM_UP_PROMPTS = (
    ("make it brighter", ()),
    ("replace the grey winter sky behind the old stone bridge with a warm orange and pink sunset, add soft "
     "golden light on the water, keep the people walking on the bridge and the trees on both banks as they "
     "are, and make the lamps along the railing glow as if evening has just begun", (
         ("make it brighter", "The photo is brighter, with more light on the bridge and the water."),)),
)


def warm_up_batches(side: int, max_jobs: int) -> list[tuple[int, tuple[int, int], bool]]:
    """(job count, image size, guided) of ``MgiePipeline.warm_up``'s batches.

    Guided jobs (the fused step): the home shape (a ``side`` square) alone and at ``max_jobs``, for the
    static step; then, for the symbolic one, two and one jobs at another size (a symbolic size never
    stands for 1), and ``max_jobs`` at a small size (a UNet batch of 64 rows or more takes other code in
    diffusers' upsampler: a guard). Unguided jobs (a CFG of 1, or an image CFG below 1) take the plain
    UNet call: two jobs, then one.
    """
    square, other = (side, side), (side * 3 // 4 // 8 * 8, side * 5 // 8 // 8 * 8)
    if max_jobs == 1:
        guided, plain = [(1, square), (1, other)], [(1, other)]
    else:
        guided = [(1, square), (max_jobs, square), (2, other), (1, other)] + [(max_jobs, (64, 64))] * (max_jobs > 2)
        plain = [(2, other), (1, other)]
    return [(n, size, True) for n, size in guided] + [(n, size, False) for n, size in plain]


class MgiePipeline:
    """Runs edits on loaded models. Thread-safe for one caller at a time per GPU (the worker's job)."""

    def __init__(self, models: MgieModels, max_side: int = 512, guidance_cache_size: int = 64,
                 compile_unet: bool = False, offload: bool = False) -> None:
        self.models = models
        self.max_side = max_side
        self.unet = models.unet
        cuda = models.device.type == "cuda"
        self._graphs = compile_unet and cuda and not offload
        if cuda:
            # Same math, faster kernels: NHWC convolutions, and optionally a compiled UNet replayed as
            # CUDA graphs (one per batch bucket: a UNet call at batch 3 is mostly launch overhead).
            torch.backends.cudnn.benchmark = True  # UNet and VAE shapes repeat: pick the fastest conv kernels
            models.unet.to(memory_format=torch.channels_last)
            if self._graphs:
                self.unet = torch.compile(models.unet, options=UNET_COMPILE_OPTIONS)
                always_pass_upsample_size(models.unet)
                # The VAE goes NHWC only compiled: eager GroupNorms copy NHWC activations to NCHW and back.
                # H100, 512x512 decode at batch 1 / 4 / 8: eager NCHW 25.0 / 68.2 / 122.3 ms, compiled NCHW
                # 10.2 / 42.1 / 81.8, compiled NHWC 9.7 / 37.2 / 72.6 (bench/results/NVIDIA_H100-x1-vae.log).
                models.vae.to(memory_format=torch.channels_last)
        self._decoder = GreedyDecoder(models.llm, NO_REPEAT_NGRAM, graphs=cuda, compile_layers=compile_unet and cuda)
        self._decoder.pack()  # before the residency takes its host copies, so packed blocks move as one
        # Offload: the LLM and the UNet/VAE take turns on the GPU (StageResidency); the UNet then runs
        # eagerly, since its CUDA graphs would hold the addresses of weights that come and go.
        self._residency = None
        if offload:
            self._residency = StageResidency({"language": [models.llm], "diffusion": [models.unet, models.vae]},
                                             models.device)
            self._decoder.forget_graphs()  # its packed weights are the GPU copies the residency just let go
        unet = models.unet

        def guided_step(*tensors: torch.Tensor) -> torch.Tensor:
            return guided_euler_ancestral_step(unet, *tensors)

        def home_step(*tensors: torch.Tensor) -> torch.Tensor:  # its own code object, so its own compiled cache
            return guided_euler_ancestral_step(unet, *tensors)

        # The whole guided step (UNet, CFG, scheduler update) as one graph: per-job Python and the ~20
        # small kernels of CFG and the update would otherwise run for every job at every step. Compiled
        # twice: with symbolic sizes for any shape, and with static ones for the home shape (a max-side
        # square) at the job counts the warm-up ran. Static kernels are faster: one edit's 100 steps took
        # 0.88 s static and 1.03 s symbolic (H100). Dynamo tries its newest entry first, so one compiled
        # function would run the home shape on the symbolic graph once that exists.
        self._guided_step = torch.compile(guided_step, options=UNET_COMPILE_OPTIONS) if self._graphs else guided_step
        self._home_step = torch.compile(home_step, options=HOME_STEP_OPTIONS, dynamic=False) if self._graphs \
            else home_step
        side = fit_size(max_side, max_side, max_side, models.vae_scale_factor)[0] // models.vae_scale_factor
        self._home_latents = (side, side)
        self._home_jobs: set[int] = set()  # padded job counts the static step serves (set by warm_up)
        self._vae_encode, self._vae_decode = vae_functions(models.vae, compiled=self._graphs)
        # The small eager parts of an edit replayed as CUDA graphs (graphs.py): CLIP and its projector,
        # the edit head, and one job's VAE encode and decode (larger batches keep the GPU busy as they are).
        # Not under offload, where the weights they read come and go.
        recorded = cuda and not offload

        def vision_features(pixels: torch.Tensor) -> torch.Tensor:
            states = models.vision(pixels, output_hidden_states=True).hidden_states[models.vision_select_layer]
            return models.projector(states[:, 1:].to(models.dtype))

        def decode_to_bytes(latents: torch.Tensor) -> torch.Tensor:
            # diffusers' postprocess (denormalize, x255 in float32, round half to even, uint8) on the GPU,
            # so only bytes cross to the CPU and the GPU thread skips ~3 ms of numpy per 512x512 image.
            decoded = self._vae_decode(latents)
            return (self.image_processor.denormalize(decoded).float() * 255).round().to(torch.uint8)

        self._vision_features = GraphedCall(vision_features, "CLIP", enabled=recorded)
        self._edit_head = GraphedCall(lambda hidden: models.edit_head(hidden, models.img_embeds), "edit head",
                                      enabled=recorded)
        self._decode_bytes = decode_to_bytes
        self._decode_one = GraphedCall(decode_to_bytes, "VAE decode", keep=4, enabled=recorded, mark=mark_sizes_dynamic)
        self._encode_one = GraphedCall(self._vae_encode, "VAE encode", keep=4, enabled=recorded,
                                       mark=mark_sizes_dynamic)
        self._pads: dict[tuple, tuple[list[torch.Tensor], ...]] = {}
        self._schedulers: dict[int, Any] = {}
        self._schedules: dict[int, torch.Tensor] = {}  # step count -> _step_scalars' first five columns
        self.image_processor = VaeImageProcessor(vae_scale_factor=models.vae_scale_factor)
        self._fusable = (models.scheduler_class.__name__ == "EulerAncestralDiscreteScheduler"
                         and models.scheduler_config.get("prediction_type", "epsilon") == "epsilon")
        step_params = set(inspect.signature(models.scheduler_class.step).parameters)
        self._step_takes_generator = "generator" in step_params
        self._step_takes_eta = "eta" in step_params
        self._cache: OrderedDict[tuple, Guidance] = OrderedDict()
        self._cache_size = guidance_cache_size
        self._cache_lock = threading.Lock()

    @property
    def compiles(self) -> bool:
        """True when steps run compiled CUDA graphs, whose first use of a shape compiles or records."""
        return self._graphs

    def prepare(self, image: PIL.Image.Image) -> PreparedImage:
        """The CPU side of both stages for an image already fitted (``images.prepare_image``); thread-safe."""
        vae_batch = cpu_pool("vae-pixels").submit(self.image_processor.preprocess, [image])
        return PreparedImage(
            image=image, key=hashlib.sha256(image.tobytes()).hexdigest(),
            clip_pixels=self.models.vision_processor.preprocess([image], return_tensors="pt")["pixel_values"][0],
            vae_batch=vae_batch)

    def fit_and_prepare(self, image: PIL.Image.Image) -> PreparedImage:
        """Any input image, fitted to this pipeline's size (``images.prepare_image``), then ``prepare``d."""
        return self.prepare(prepare_image(image, self.max_side, self.models.vae_scale_factor))

    def _as_prepared(self, image: ImageInput) -> PreparedImage:
        return image if isinstance(image, PreparedImage) else self.prepare(image)

    def warm_up(self, max_jobs: int = 1) -> None:
        """Throwaway batches of two steps each (``warm_up_batches``) that compile every class of shape a
        worker taking up to ``max_jobs`` jobs a step will meet. After it, new shapes only record CUDA graphs
        (about a second), and no user's edit waits minutes for a compile (tests/test_warm_up.py)."""
        self._home_jobs = {1, self._padded(max_jobs)}
        batches = warm_up_batches(self.max_side, max_jobs)
        for k, (count, size, guided) in enumerate(batches):
            started = time.perf_counter()
            images = [self.fit_and_prepare(PIL.Image.new("RGB", size, (40 * i, 90, 160))) for i in range(count)]
            instruction, history = _WARM_UP_PROMPTS[k == 1]
            guidance = self.run_language_models([(image, instruction, history) for image in images])
            states = self.start_denoising_many([DenoiseJob(image, g.prompt_embeds, i, 7.5 if guided else 1.0, 1.5, 2)
                                                for i, (image, g) in enumerate(zip(images, guidance, strict=True))])
            while not states[0].done:
                self.denoise_step(states)
            for start in range(0, count, DECODE_BATCH):
                self.decode_many([s.latents for s in states[start:start + DECODE_BATCH]])
            # A self-hoster watches minutes of this on a first start: say how far it is.
            log.info("warm-up %d/%d: %d %s job(s) at %dx%d in %.0f s", k + 1, len(batches), count,
                     "guided" if guided else "unguided", *size, time.perf_counter() - started)

    # -- the whole edit ---------------------------------------------------------------------------
    def __call__(self, request: EditRequest, progress: ProgressFn | None = None,
                 cancel: CancelToken | None = None) -> EditResult:
        timings: dict[str, float] = {}
        clock = _StageClock(self.models.device, timings)
        progress = progress or (lambda stage, k, n: None)

        # 1. Check the options and fit the image (aspect ratio kept, sides a multiple of the VAE factor).
        request = check_request(request)
        with clock("preprocess"):
            image = self.fit_and_prepare(request.image)

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
    def guidance(self, image: ImageInput, instruction: str, history: tuple[tuple[str, str], ...] = (),
                 cancel: CancelToken | None = None) -> tuple[Guidance, bool]:
        """LLM output for this (image, instruction, history), from the cache when seen before."""
        return self.guidance_many([(image, instruction, history)], cancel)[0]

    def guidance_many(self, items: Sequence[tuple[ImageInput, str, tuple[tuple[str, str], ...]]],
                      cancel: CancelToken | None = None) -> list[tuple[Guidance, bool]]:
        """Several jobs' LLM outputs: cached ones looked up, the rest decoded together in one batch."""
        items = [(self._as_prepared(image), instruction, history) for image, instruction, history in items]
        keys = [(image.key, image.size, instruction, history) for image, instruction, history in items]
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
    def prompt_inputs(self, image: ImageInput, instruction: str,
                      history: tuple[tuple[str, str], ...] = ()) -> tuple[list[int], torch.Tensor]:
        """Token ids and input embeddings with CLIP patch features in place of the <im_patch> tokens."""
        return self.prompt_inputs_many([(image, instruction, history)])[0]

    @torch.inference_mode()
    def prompt_inputs_many(self, items: Sequence[tuple[ImageInput, str, tuple[tuple[str, str], ...]]]
                           ) -> list[tuple[list[int], torch.Tensor]]:
        """``prompt_inputs`` for several jobs, with one CLIP call for all their images."""
        m = self.models
        pixels = torch.stack([self._as_prepared(image).clip_pixels for image, _, _ in items]).to(m.device, m.dtype)
        features = self._vision_features(pixels)
        table = m.llm.get_input_embeddings()
        prompts = []
        for (_, instruction, history), feature in zip(items, features, strict=True):
            ids = m.encode_prompt(build_edit_prompt_parts(instruction, m.num_patches, history))
            start = ids.index(m.token_ids.im_start)
            if ids[start + 1:start + m.num_patches + 2] != [m.token_ids.im_patch] * m.num_patches + [m.token_ids.im_end]:
                raise RuntimeError("the tokenizer split the image placeholder; check tokenizer.json")
            embeds = table(torch.tensor([ids], device=m.device))
            embeds[0, start + 1:start + 1 + m.num_patches] = feature
            prompts.append((ids, embeds))
        return prompts

    def run_language_model(self, image: ImageInput, instruction: str,
                           history: tuple[tuple[str, str], ...] = (), cancel: CancelToken | None = None) -> Guidance:
        return self.run_language_models([(image, instruction, history)], cancel)[0]

    @torch.inference_mode()
    def run_language_models(self, items: Sequence[tuple[ImageInput, str, tuple[tuple[str, str], ...]]],
                            cancel: CancelToken | None = None) -> list[Guidance]:
        """Greedy decoding of several prompts at once (left-padded), each stopping on its own.

        This is the demo's ``generate`` call (greedy, no_repeat_ngram_size=3, up to 96 new tokens) plus a
        stopping rule that ends a sequence as soon as [IMG7] completes the eight visual tokens. On CUDA
        each token is one CUDA graph replay (``decoding.py``); prompts are padded to a multiple of 64
        tokens so a handful of shapes cover every request.
        """
        m = self.models
        self._stage("language")
        with torch.profiler.record_function("llm.prompt"):  # sub-stages are named for bench/profile_engine.py
            prompts = self.prompt_inputs_many(items)
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
        eos, img = m.token_ids.eos, m.token_ids.img
        rows, states = self._decoder.decode(
            ids, embeds, mask, MAX_NEW_TOKENS, lambda row: row[-1] in eos or _visual_tokens_complete(row, img), cancel,
            run=img)
        answers, visual = [], []
        with torch.profiler.record_function("llm.edit_head"):
            for i, row in enumerate(rows):
                new, early = _answer(row, eos, img)
                # One last-layer state per position but the last: the prompt's, then those its answer gave.
                hidden = states[i, width - lengths[i]:width + len(new) - 1]
                visual.append(select_visual_states(lengths[i], new, hidden, img[0], early))
                answers.append((new, early))
            embeds = self._edit_head(torch.stack(visual))  # one call for the batch, not one per job
        return [Guidance(expressive_instruction=clean_expressive(m.decode(new)), new_token_ids=tuple(new),
                         prompt_embeds=embeds[i:i + 1].clone(), stopped_early=early)
                for i, (new, early) in enumerate(answers)]

    # -- stage 3: diffusion side ------------------------------------------------------------------
    def start_denoising(self, image: ImageInput, prompt_embeds: torch.Tensor, seed: int, text_cfg: float,
                        image_cfg: float, steps: int, tag: object = None) -> DenoiseState:
        """Everything one job needs to take denoising steps, alone or batched with others."""
        return self.start_denoising_many([DenoiseJob(image, prompt_embeds, seed, text_cfg, image_cfg, steps, tag)])[0]

    @torch.inference_mode()
    def start_denoising_many(self, jobs: Sequence[DenoiseJob]) -> list[DenoiseState]:
        """``start_denoising`` for several jobs, VAE-encoding images of one size together (a burst's
        encodes are otherwise 32 small launch-bound calls)."""
        m = self.models
        self._stage("diffusion")
        images = [self._as_prepared(job.image) for job in jobs]
        latents_of: dict[int, torch.Tensor] = {}
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)
        for indices in by_size.values():
            for start in range(0, len(indices), ENCODE_BATCH):
                chunk = indices[start:start + ENCODE_BATCH]
                pixels = torch.stack([images[i].vae_pixels for i in chunk]).to(m.device, m.dtype)
                mark_sizes_dynamic(pixels)
                encode = self._encode_one if len(chunk) == 1 else self._vae_encode
                for i, latents in zip(chunk, encode(pixels), strict=True):
                    latents_of[i] = latents.unsqueeze(0)
        return [self._denoise_state(job, latents_of[i]) for i, job in enumerate(jobs)]

    def _denoise_state(self, job: DenoiseJob, image_latents: torch.Tensor) -> DenoiseState:
        m = self.models
        scheduler = self._scheduler_for(job.steps)
        # As in diffusers: guidance is on only when text_cfg > 1 and image_cfg >= 1.
        text_cfg, image_cfg = job.text_cfg, job.image_cfg
        guided = text_cfg > 1.0 and image_cfg >= 1.0
        cond = job.prompt_embeds.to(m.dtype)
        if guided:
            cond = torch.cat([cond, m.null_embeds, m.null_embeds])
            image_latents = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])

        generator = torch.Generator(device=m.device).manual_seed(job.seed)
        shape = (1, m.vae.config.latent_channels, *image_latents.shape[-2:])
        latents = randn_tensor(shape, generator=generator, device=m.device, dtype=m.dtype) * scheduler.init_noise_sigma
        if guided and self._fusable:
            # Each step draws its ancestral noise from the job's generator (``_fused_step``), in the order the
            # scheduler would: drawn here ahead, a burst's start would launch 3200 of them at once.
            return DenoiseState(tag=job.tag, scheduler=scheduler, latents=latents, image_latents=image_latents,
                                cond=cond, guided=True, text_cfg=text_cfg, image_cfg=image_cfg, step_kwargs={},
                                generator=generator, scalars=self._step_scalars(scheduler, text_cfg, image_cfg))
        extra = {}
        if self._step_takes_generator:
            extra["generator"] = generator
        if self._step_takes_eta:
            extra["eta"] = 0.0
        return DenoiseState(tag=job.tag, scheduler=scheduler, latents=latents, image_latents=image_latents, cond=cond,
                            guided=guided, text_cfg=text_cfg, image_cfg=image_cfg, step_kwargs=extra)

    def _scheduler_for(self, steps: int) -> Any:
        """A fresh scheduler set to ``steps``: a copy of one configured per step count, since building
        one from its config (signature inspection) costs milliseconds a job, and a burst starts 32."""
        template = self._schedulers.get(steps)
        if template is None:
            template = self.models.new_scheduler()
            template.set_timesteps(steps, device=self.models.device)
            self._schedulers[steps] = template
        return copy.deepcopy(template)

    def _stage(self, group: str) -> None:
        """With offload, bring this stage's models to the GPU. The decoder lets go of its graphs, cache
        and packed weights first: they point at the copies about to leave, and would keep them on the card
        (9 GiB of the LLM, next to the copy coming in: out of memory on a 16 GB card)."""
        if self._residency is not None and self._residency.active != group:
            self._decoder.forget_graphs()
            self._residency.use(group)

    def _step_scalars(self, scheduler, text_cfg: float, image_cfg: float) -> torch.Tensor:
        """Per step: timestep, input scale, sigma, dt, sigma_up, CFGs (``guided_euler_ancestral_step``'s
        ``scalars``), computed in float32 on the CPU as the scheduler computes them, once per step count (reading
        the scheduler's sigmas back from the GPU would wait for all queued work)."""
        steps = len(scheduler.timesteps)
        schedule = self._schedules.get(steps)
        if schedule is None:
            sigma, sigma_to = scheduler.sigmas[:-1].float().cpu(), scheduler.sigmas[1:].float().cpu()
            sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
            sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
            schedule = torch.stack([scheduler.timesteps.float().cpu(), (sigma**2 + 1) ** 0.5, sigma, sigma_down - sigma,
                                    sigma_up], dim=1)
            self._schedules[steps] = schedule
        cfgs = torch.tensor([[float(text_cfg), float(image_cfg)]]).expand(steps, 2)
        return torch.cat([schedule, cfgs], dim=1).to(self.models.device)

    @torch.inference_mode()
    def denoise_step(self, states: Sequence[DenoiseState]) -> None:
        """One denoising step for each state: guided jobs in one fused call, any others in one UNet call.

        States must share a latent size. Each keeps its own generator, timestep and CFG scales, so a
        job's result does not depend on what else is in the batch.
        """
        self._stage("diffusion")
        fused = [s for s in states if s.scalars is not None]
        if fused:
            self._fused_step(fused)
        others = [s for s in states if s.scalars is None]
        if others:
            self._scheduler_step(others)

    def _padded(self, jobs: int) -> int:
        """The job count a fused step runs ``jobs`` at: compiled, the next bucket (one CUDA graph each)."""
        return next((b for b in JOB_BUCKETS if b >= jobs), jobs) if self._graphs else jobs

    def _fused_step(self, states: Sequence[DenoiseState]) -> None:
        n = len(states)
        pad = self._padded(n) - n
        pads = self._bucket_padding(states[0], pad) if pad else ([], [], [], [], [])
        latents = _joined([s.latents for s in states] + pads[0])
        image_latents = _joined([s.image_latents for s in states] + pads[1])
        cond = _joined([s.cond for s in states] + pads[2])
        # Always a fresh tensor: a row of a job's table sits at an unaligned offset, a new input to the compiler.
        scalars = torch.cat([s.scalars[s.index:s.index + 1] for s in states] + pads[3])
        # torch.randn is what randn_tensor (the scheduler's draw) calls for one generator on the job's device.
        noise = _joined([torch.randn(s.latents.shape, generator=s.generator, device=s.latents.device,
                                     dtype=s.latents.dtype) for s in states] + pads[4])
        home = n + pad in self._home_jobs and tuple(latents.shape[-2:]) == self._home_latents
        if not home:
            mark_sizes_dynamic(latents, image_latents, cond, scalars, noise)
        if self._graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = (self._home_step if home else self._guided_step)(latents, image_latents, cond, scalars, noise)
        out = out[:n].clone() if self._graphs else out  # the graph's output buffer is reused by the next replay
        for i, s in enumerate(states):
            s.latents = out[i:i + 1]
            s.index += 1

    def _bucket_padding(self, first: DenoiseState, pad: int) -> tuple[list[torch.Tensor], ...]:
        """Rows that fill a job bucket, made once per shape (never written to: torch.cat copies them)."""
        key = (pad, tuple(first.latents.shape[1:]), tuple(first.cond.shape[1:]))
        if key not in self._pads:
            self._pads[key] = ([first.latents.new_zeros(pad, *first.latents.shape[1:])],
                               [first.image_latents.new_zeros(3 * pad, *first.image_latents.shape[1:])],
                               [first.cond.new_zeros(3 * pad, *first.cond.shape[1:])],
                               [first.scalars.new_tensor([_PAD_SCALARS] * pad)],
                               [first.latents.new_zeros(pad, *first.latents.shape[1:])])
        return self._pads[key]

    def _scheduler_step(self, states: Sequence[DenoiseState]) -> None:
        """The general path: any scheduler, unguided jobs; one UNet call, then each job's own step."""
        rows, timesteps, conds, sizes = [], [], [], []
        for s in states:
            t = s.scheduler.timesteps[s.index]
            x = torch.cat([s.latents] * 3) if s.guided else s.latents
            rows.append(torch.cat([s.scheduler.scale_model_input(x, t), s.image_latents], dim=1))
            timesteps.append(t.reshape(1).expand(x.shape[0]))
            conds.append(s.cond)
            sizes.append(x.shape[0])
        noise = self._unet_call(torch.cat(rows), torch.cat(timesteps), torch.cat(conds))
        for s, pred in zip(states, noise.split(sizes), strict=True):
            if s.guided:
                text, img, uncond = pred.chunk(3)
                pred = uncond + s.text_cfg * (text - img) + s.image_cfg * (img - uncond)
            t = s.scheduler.timesteps[s.index]
            s.latents = s.scheduler.step(pred, t, s.latents, **s.step_kwargs, return_dict=False)[0]
            s.index += 1

    def _unet_call(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One UNet call; compiled, the batch is padded to a bucket so a few recorded CUDA graphs serve
        every batch size."""
        rows = sample.shape[0]
        if not self._graphs:
            mark_sizes_dynamic(sample, timestep, cond)
            return self.unet(sample, timestep, encoder_hidden_states=cond, return_dict=False)[0]
        bucket = next((b for b in ROW_BUCKETS if b >= rows), rows)
        if bucket > rows:
            extra = bucket - rows
            sample = torch.cat([sample, sample.new_zeros(extra, *sample.shape[1:])])
            timestep = torch.cat([timestep, timestep.new_zeros(extra)])
            cond = torch.cat([cond, cond.new_zeros(extra, *cond.shape[1:])])
        mark_sizes_dynamic(sample, timestep, cond)
        torch.compiler.cudagraph_mark_step_begin()
        out = self.unet(sample, timestep, encoder_hidden_states=cond, return_dict=False)[0]
        return out[:rows].clone()  # the graph's output buffer is reused by the next replay

    def denoise(self, image: ImageInput, prompt_embeds: torch.Tensor, seed: int, text_cfg: float,
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

    def decode_many(self, latents: Sequence[torch.Tensor]) -> list[PIL.Image.Image]:
        """Several jobs' latents (one size) through one VAE decode."""
        return self.decode_queued(latents)()

    def decode_latents(self, latents: torch.Tensor) -> list[PIL.Image.Image] | PIL.Image.Image:
        """VAE decode; a batch of latents gives a list of images, a single one an image."""
        images = self.decode_queued([latents])()
        return images if latents.shape[0] > 1 else images[0]

    @torch.inference_mode()
    def decode_queued(self, latents: Sequence[torch.Tensor]) -> Callable[[], list[PIL.Image.Image]]:
        """Queue one VAE decode of several jobs' latents (one size) without waiting for it; the function
        returned waits and gives the images. A worker queues the next group's decode before it collects
        this one, so the GPU does not wait while the CPU launches a decode's ~230 kernels and builds the
        images of the one before (a burst's 32 results are 8 decodes)."""
        self._stage("diffusion")
        batch = torch.cat(list(latents))
        mark_sizes_dynamic(batch)
        pixels = (self._decode_one if batch.shape[0] == 1 else self._decode_bytes)(batch).permute(0, 2, 3, 1)
        if pixels.device.type != "cuda":
            return lambda: [PIL.Image.fromarray(a) for a in pixels.numpy()]
        host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        copied = torch.cuda.current_stream(pixels.device).record_event()

        def collect() -> list[PIL.Image.Image]:
            copied.synchronize()
            return [PIL.Image.fromarray(a) for a in host.numpy()]

        return collect


@dataclasses.dataclass(frozen=True, eq=False)
class DenoiseJob:
    """What ``start_denoising_many`` needs of one job."""

    image: ImageInput
    prompt_embeds: torch.Tensor
    seed: int
    text_cfg: float
    image_cfg: float
    steps: int
    tag: object = None


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
    generator: torch.Generator | None = None  # fused path: the job's, for each step's ancestral noise
    scalars: torch.Tensor | None = None  # fused path: per-step timestep, sigmas and CFGs

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
        self.label = torch.profiler.record_function(self.stage)  # names the stage in any profile
        self.label.__enter__()
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[self.stage] = self.timings.get(self.stage, 0.0) + time.perf_counter() - self.start
        self.label.__exit__(*exc)
